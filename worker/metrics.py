"""The worker's own metrics, served over HTTP on the port it is given.

Each worker process observes the tasks it runs: how long they waited in the
queue and how long they ran. Prometheus scrapes every worker and sums them.
"""

from __future__ import annotations

import logging
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from asyncproc.loops import LoopHealth
from asyncproc.metrics import SECONDS_BUCKETS

log = logging.getLogger(__name__)



class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "asyncproc_task_queue_wait_seconds",
            "From when a task became due (scheduled_at) to when a worker started it",
            ["operation"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "asyncproc_task_run_seconds",
            "How long a handler ran; outcome is ok when it returned, error when it raised",
            ["operation", "outcome"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "asyncproc_worker_tasks",
            "Task runs this worker finished, by outcome: completed, failed, retried, interrupted,"
            " unknown_operation (put back for a worker that knows it)",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.handler_stops = Counter(
            "asyncproc_worker_handler_stops",
            "Handler attempts ended by force, by kind: crash (its process died), timeout, memory",
            ["operation", "kind"],
            registry=self.registry,
        )
        self.running = Gauge("asyncproc_worker_tasks_running", "Handlers running now", registry=self.registry)
        self._loops: list[LoopHealth] = []
        self.registry.register(_LoopCollector(self._loops))

    def watch_loop(self, health: LoopHealth) -> None:
        self._loops.append(health)

    def serve(self, port: int) -> None:
        # All interfaces, as exporters do: in a container Prometheus scrapes from outside.
        start_http_server(port, addr="0.0.0.0", registry=self.registry)
        log.info("worker metrics on port %s", port)

    def started(self, operation: str, scheduled_at: datetime, started_at: datetime) -> None:
        self.queue_wait.labels(operation).observe(max(0.0, (started_at - scheduled_at).total_seconds()))

    def ran(self, operation: str, seconds: float, ok: bool) -> None:
        self.run_time.labels(operation, "ok" if ok else "error").observe(seconds)

    def handler_stopped(self, operation: str, kind: str) -> None:
        self.handler_stops.labels(operation, kind).inc()

    def finished(self, operation: str, outcome: str) -> None:
        self.outcomes.labels(operation, outcome).inc()


class _LoopCollector:
    """Reads each background loop's health at scrape time."""

    def __init__(self, loops: list[LoopHealth]):
        self._loops = loops

    def describe(self):
        return []

    def collect(self):
        failing = GaugeMetricFamily(
            "asyncproc_worker_loop_failing", "1 while a background loop has failed several times in a row", labels=["loop"]
        )
        failures = CounterMetricFamily(
            "asyncproc_worker_loop_failures", "Failures of each background loop, each logged and survived", labels=["loop"]
        )
        for health in self._loops:
            failing.add_metric([health.name], 1.0 if health.failing else 0.0)
            failures.add_metric([health.name], health.failures_total)
        yield failing
        yield failures
