"""GET /metrics: request metrics from every gunicorn process, plus the ledger's task metrics.

Under gunicorn, `asyncproc.api.server` gives each run a fresh directory in
PROMETHEUS_MULTIPROC_DIR before the workers fork. prometheus_client then keeps
each process's counters in memory-mapped files there, and a scrape, whichever
process serves it, adds up all of them. Without it (an app made in-process, as
in tests), the counters are this process's own.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from asyncproc.api import resources
from asyncproc.metrics import LedgerCollector

bp = Blueprint("metrics", __name__)

LABELS = ("method", "route", "status")
# Routes, not paths, as labels: one series per endpoint however many task ids exist.
UNMATCHED_ROUTE = "unmatched"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_process_registry = CollectorRegistry()
REQUESTS = Counter("asyncproc_http_requests", "HTTP requests answered", LABELS, registry=_process_registry)
LATENCY = Histogram(
    "asyncproc_http_request_duration_seconds",
    "Time to answer an HTTP request",
    LABELS,
    buckets=LATENCY_BUCKETS,
    registry=_process_registry,
)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start_timer)
    app.after_request(_observe)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("metrics_started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    labels = (request.method, route, str(response.status_code))
    REQUESTS.labels(*labels).inc()
    LATENCY.labels(*labels).observe(elapsed)
    return response


def _request_registry() -> CollectorRegistry:
    if not getattr(values.ValueClass, "_multiprocess", False):
        return _process_registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


@bp.get("/metrics")
def metrics():
    ledger = CollectorRegistry()
    ledger.register(LedgerCollector(resources().pool))
    body = generate_latest(_request_registry()) + generate_latest(ledger)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
