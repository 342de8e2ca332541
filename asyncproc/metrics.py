"""Task and queue metrics read from the database at scrape time.

The API and the workers may run as many processes on many hosts; only the
database sees all of them, so per-operation counts and the queue's depth and
age are read from it when Prometheus scrapes rather than counted in any one
process. The counts, totals and histograms come from asyncproc_counts, which
triggers keep exact (migrations/current/50_ledger_counts.sql): a scrape costs the
same at ten rows as at ten million. Totals and histograms only ever grow, as
Prometheus counters must, whatever is retried, pruned or truncated.
"""

from __future__ import annotations

from typing import Iterator

import psycopg_pool
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from asyncproc.db import query, translate_errors
from asyncproc.errors import DatabaseUnavailable

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
# Shared by the ledger's histograms and the worker's, so the two line up; the
# database's asyncproc_seconds_bounds() holds the same (a test checks).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class LedgerCollector(Collector):
    def __init__(self, pool: psycopg_pool.ConnectionPool):
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("asyncproc_database_up", "1 when the scrape could read the tasks table, else 0")
        try:
            with translate_errors(), self._pool.connection() as conn:
                counts = conn.execute(query("metrics_task_counts")).fetchall()
                queue = conn.execute(query("metrics_queue")).fetchone()
        except DatabaseUnavailable:
            # The scrape still answers with the request metrics; this says why the rest is missing.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _task_families(counts)
        yield _histogram(
            "asyncproc_ledger_run_seconds",
            "Run time of the last attempt (started_at to completed_at) of each task that completed or failed",
            counts,
            "run",
        )
        yield _histogram(
            "asyncproc_ledger_queue_wait_seconds",
            "Queue wait of the last attempt (scheduled_at to started_at) of each task that completed or failed",
            counts,
            "wait",
        )
        yield from _queue_families(queue)


def _histogram(name: str, documentation: str, counts: list[dict], kind: str) -> HistogramMetricFamily:
    """From bigint[] histograms: element k counts values in [bound k-1, bound k), the last one >= the last bound."""
    family = HistogramMetricFamily(name, documentation, labels=["operation"])
    for row in counts:
        observed = row[f"{kind}_histogram"]
        if observed is None:  # no task of this operation has finished yet
            continue
        cumulative, buckets = 0, []
        for bound, tasks in zip(SECONDS_BUCKETS, observed):
            cumulative += tasks
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", sum(observed)))
        family.add_metric([row["operation"]], buckets, row[f"{kind}_sum"])
    return family


def _task_families(counts: list[dict]) -> list[Metric]:
    by_status = GaugeMetricFamily("asyncproc_tasks", "Tasks in the ledger now, by operation and status", labels=["operation", "status"])
    enqueued = CounterMetricFamily("asyncproc_tasks_enqueued", "Tasks ever enqueued, by operation", labels=["operation"])
    completed = CounterMetricFamily("asyncproc_tasks_completed", "Times a task completed, by operation", labels=["operation"])
    failed = CounterMetricFamily("asyncproc_tasks_failed", "Times a task failed for good, by operation", labels=["operation"])
    cancelled = CounterMetricFamily("asyncproc_tasks_cancelled", "Times a task was cancelled, by operation", labels=["operation"])
    for row in counts:
        operation = row["operation"]
        for status in STATUSES:
            by_status.add_metric([operation, status], row[status])
        enqueued.add_metric([operation], row["enqueued_total"])
        completed.add_metric([operation], row["completed_total"])
        failed.add_metric([operation], row["failed_total"])
        cancelled.add_metric([operation], row["cancelled_total"])
    return [by_status, enqueued, completed, failed, cancelled]


def _queue_families(queue: dict) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily("asyncproc_queue_depth", "Pending tasks that are due now and wait for a worker", value=queue["due"])
    yield GaugeMetricFamily("asyncproc_queue_scheduled", "Pending tasks scheduled for later (delays and retry backoff)", value=queue["scheduled"])
    yield GaugeMetricFamily(
        "asyncproc_queue_oldest_age_seconds",
        "How long the oldest due pending task has waited since it became due; 0 when none waits",
        value=queue["oldest_due_age_seconds"],
    )
