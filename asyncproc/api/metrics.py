"""GET /metrics: request metrics from every gunicorn process, plus the ledger's task metrics.

Under gunicorn, `asyncproc.api.server` gives each run a fresh directory in
PROMETHEUS_MULTIPROC_DIR before the workers fork. prometheus_client then keeps
each process's counters in memory-mapped files there, and a scrape, whichever
process serves it, adds up all of them. Without it (an app made in-process, as
in tests), the counters are this process's own.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from asyncproc.app_resources import resources
from asyncproc.metrics import LedgerCollector

bp = Blueprint("metrics", __name__)

# The classic text format, which every Prometheus version reads; generate_latest writes it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("method", "route", "status")
# Routes, not paths, as labels: one series per endpoint however many task ids exist.
UNMATCHED_ROUTE = "unmatched"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HttpMetrics:
    """One app's request metrics. In multiprocess mode the values live in the
    shared directory; otherwise in this object's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("asyncproc_http_requests", "HTTP requests answered", LABELS, registry=self.registry)
        self.latency = Histogram(
            "asyncproc_http_request_duration_seconds",
            "Time to answer an HTTP request",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, labels: tuple[str, str, str], seconds: float) -> None:
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def exposition_registry(self) -> CollectorRegistry:
        if not getattr(values.ValueClass, "_multiprocess", False):
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry


def init_app(app: Flask) -> None:
    app.extensions["asyncproc_http_metrics"] = HttpMetrics()
    app.register_blueprint(bp)
    app.before_request(_start_timer)
    app.after_request(_observe)


def _http_metrics() -> HttpMetrics:
    return current_app.extensions["asyncproc_http_metrics"]


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("metrics_started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    _http_metrics().observe((request.method, route, str(response.status_code)), elapsed)
    return response


@bp.get("/metrics")
def metrics():
    ledger = CollectorRegistry()
    ledger.register(LedgerCollector(resources().pool))
    body = generate_latest(_http_metrics().exposition_registry()) + generate_latest(ledger)
    return Response(body, content_type=CONTENT_TYPE)
