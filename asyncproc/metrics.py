"""Task and queue metrics computed from the tasks table at scrape time.

The API and the workers may run as many processes on many hosts; only the
ledger sees all of them, so per-operation counts and the queue's depth and age
are read from it when Prometheus scrapes rather than counted in any one process.
"""

from __future__ import annotations

from typing import Iterator

import psycopg_pool
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from asyncproc.db import query, translate_errors
from asyncproc.errors import DatabaseUnavailable

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
# Shared by the ledger's histograms and the worker's, so the two line up.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class LedgerCollector(Collector):
    def __init__(self, pool: psycopg_pool.ConnectionPool):
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("asyncproc_database_up", "1 when the scrape could read the tasks table, else 0")
        try:
            with translate_errors(), self._pool.connection() as conn:
                stats = conn.execute(query("metrics_task_stats"), {"buckets": [float(bound) for bound in SECONDS_BUCKETS]}).fetchall()
                queue = conn.execute(query("metrics_queue")).fetchone()
        except DatabaseUnavailable:
            # The scrape still answers with the request metrics; this says why the rest is missing.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _task_families([row for row in stats if row["by_status"]])
        yield _histogram(
            "asyncproc_ledger_run_seconds",
            "Run time of each finished task's last attempt (started_at to completed_at), from the ledger",
            [row for row in stats if row["by_run"]],
            "run_bucket",
            "run_sum",
        )
        yield _histogram(
            "asyncproc_ledger_queue_wait_seconds",
            "Queue wait of each started task's last attempt (scheduled_at to started_at), from the ledger",
            [row for row in stats if row["by_wait"]],
            "wait_bucket",
            "wait_sum",
        )
        yield from _queue_families(queue)


def _histogram(name: str, documentation: str, rows: list[dict], bucket_key: str, sum_key: str) -> HistogramMetricFamily:
    """A histogram from width_bucket counts: bucket k holds values in [bound k-1, bound k)."""
    family = HistogramMetricFamily(name, documentation, labels=["operation"])
    per_operation: dict[str, list[dict]] = {}
    for row in rows:
        if row[bucket_key] is not None:  # tasks without that figure yet
            per_operation.setdefault(row["operation"], []).append(row)
    for operation, found in sorted(per_operation.items()):
        counts = {row[bucket_key]: row["tasks"] for row in found}
        cumulative, buckets = 0, []
        for index, bound in enumerate(SECONDS_BUCKETS):
            cumulative += counts.get(index, 0)
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", sum(counts.values())))
        family.add_metric([operation], buckets, sum(row[sum_key] for row in found))
    return family


def _task_families(counts: list[dict]) -> list[Metric]:
    by_status = GaugeMetricFamily("asyncproc_tasks", "Tasks in the ledger now, by operation and status", labels=["operation", "status"])
    enqueued = CounterMetricFamily("asyncproc_tasks_enqueued", "Tasks ever enqueued (rows in tasks), by operation", labels=["operation"])
    completed = CounterMetricFamily("asyncproc_tasks_completed", "Tasks that completed, by operation", labels=["operation"])
    failed = CounterMetricFamily("asyncproc_tasks_failed", "Tasks that failed for good, by operation", labels=["operation"])
    totals: dict[str, dict[str, int]] = {}
    for row in counts:
        totals.setdefault(row["operation"], dict.fromkeys(STATUSES, 0))[row["status"]] = row["tasks"]
    for operation, statuses in sorted(totals.items()):
        for status, tasks in statuses.items():
            by_status.add_metric([operation, status], tasks)
        enqueued.add_metric([operation], sum(statuses.values()))
        completed.add_metric([operation], statuses["completed"])
        failed.add_metric([operation], statuses["failed"])
    return [by_status, enqueued, completed, failed]


def _queue_families(queue: dict) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily("asyncproc_queue_depth", "Pending tasks that are due now and wait for a worker", value=queue["due"])
    yield GaugeMetricFamily("asyncproc_queue_scheduled", "Pending tasks scheduled for later (delays and retry backoff)", value=queue["scheduled"])
    yield GaugeMetricFamily(
        "asyncproc_queue_oldest_age_seconds",
        "How long the oldest due pending task has waited since it became due; 0 when none waits",
        value=queue["oldest_due_age_seconds"],
    )
