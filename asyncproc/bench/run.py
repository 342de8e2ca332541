"""`asyncproc bench`: run every figure, several times, and print the table with PASS/MISS per target."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from typing import Callable, TextIO

from asyncproc.bench import figures
from asyncproc.bench.harness import Harness
from asyncproc.config import DatabaseSettings, RetentionSettings, Settings

MS = 1000.0
# Figure 12: long polls parked on one task, and clients sending a request a byte at a time.
SIEGE_WAITERS = 1000
SIEGE_SLOW = 100
# A p99 needs a few hundred samples to be more than the one slowest request.
SIEGE_MIN_SAMPLES = 300


@dataclass(frozen=True)
class Plan:
    runs: int
    post_samples: int
    load_seconds: float
    batch_requests: int
    batch_size: int
    dispatch_samples: int
    worker_tasks: int
    result_samples: int
    get_samples: int
    seed_rows: int
    ledger_rows: int
    prune_seconds: float
    backlog_sizes: tuple[int, ...]
    sustained_seconds: float

    @classmethod
    def full(cls) -> "Plan":
        return cls(runs=3, post_samples=500, load_seconds=5, batch_requests=10, batch_size=1000,
                   dispatch_samples=500, worker_tasks=3000, result_samples=50, get_samples=1000,
                   seed_rows=1_000_000, ledger_rows=10_000_000, prune_seconds=20,
                   backlog_sizes=(100_000, 1_000_000), sustained_seconds=60)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(runs=1, post_samples=50, load_seconds=1, batch_requests=2, batch_size=1000,
                   dispatch_samples=20, worker_tasks=200, result_samples=5, get_samples=100,
                   seed_rows=10_000, ledger_rows=20_000, prune_seconds=3,
                   backlog_sizes=(2_000, 10_000), sustained_seconds=3)


@dataclass
class Row:
    figure: str
    measured: str
    reference: str
    target: str
    verdict: str  # PASS, MISS or "" when the row has no target


def _median(measure: Callable[[], float], runs: int) -> float:
    return statistics.median(measure() for _ in range(runs))


def _median_pair(measure: Callable[[], list[float]], runs: int) -> tuple[float, float]:
    return _median_pairs(lambda: [measure()], runs)[0]


def _median_pairs(measure: Callable[[], list[list[float]]], runs: int) -> list[tuple[float, float]]:
    """(p50, p99), each the median over `runs`, of each of the latency lists one measure returns."""
    found = [[figures.p50_p99(latencies) for latencies in measure()] for _ in range(runs)]
    return [(statistics.median(run[i][0] for run in found), statistics.median(run[i][1] for run in found))
            for i in range(len(found[0]))]


def _rates_beside(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(measured, reference) rates of alternating runs: both medians, and the median of the per-pair ratios."""
    return (statistics.median(here for here, _ in pairs), statistics.median(ref for _, ref in pairs),
            statistics.median(here / ref for here, ref in pairs))


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ms(value: float) -> str:
    return f"{value * MS:.2f} ms"


def _lat(pair: tuple[float, float]) -> str:
    return f"p50 {_ms(pair[0])}, p99 {_ms(pair[1])}"


class Bench:
    def __init__(self, settings: Settings, plan: Plan, out: TextIO):
        self.settings = settings
        self.plan = plan
        self.out = out
        self.rows: list[Row] = []
        self.setup: list[tuple[str, str]] = []
        self.h = Harness(settings, settings.worker.concurrency)
        # Figures 8, 9 and 11 alternate with this second, empty service (Harness.twin).
        self.twin: Harness | None = None

    def say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def run(self) -> int:
        self.load_at_start = os.getloadavg()
        try:
            self.h.start()
            setup = self._setup()
            self._figures_without_workers()
            self._figures_with_workers()
            self.twin = self.h.twin()
            self._flatness()
            self._ledger()
            self._backlog()
            self.twin.close()
            self.twin = None
            self._sustained()
        finally:
            if self.twin is not None:
                self.twin.close()
            self.h.close()
        self.setup = setup
        self.print_tables()
        return 0

    def _setup(self) -> list[tuple[str, str]]:
        conn = self.h.conn
        server = conn.execute("SHOW server_version").fetchone()["server_version"]
        sync = conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]
        fsync = conn.execute("SHOW fsync").fetchone()["fsync"]
        # With autovacuum off, nothing vacuums or analyses the figures' tables but the bench itself.
        autovacuum = conn.execute("SHOW autovacuum").fetchone()["autovacuum"]
        s = self.settings
        return [
            ("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
            ("python", platform.python_version()),
            ("postgresql", f"{server} ({'DATABASE_URL' if s.db.url else 'embedded'}; fsync {fsync}, synchronous_commit {sync}, autovacuum {autovacuum})"),
            ("procrastinate", metadata.version("procrastinate")),
            ("gunicorn", f"{metadata.version('gunicorn')}, {s.api.workers} asyncio workers, Flask on {s.api.threads} threads each, nice {s.api.nice}"),
            ("worker", f"concurrency {s.worker.concurrency} per process"),
            ("redis", "yes" if self.h.redis_url else "no (cache figures n/a)"),
            ("host cores", str(os.cpu_count())),
            # Other work on the host moves every figure: the load at the start says whether the run had it alone.
            ("load average at start", " ".join(f"{load:.2f}" for load in self.load_at_start)),
            ("runs", f"{self.plan.runs} per figure, median shown{' (--quick)' if self.plan.runs == 1 else ''}"),
        ]

    # -- figures ---------------------------------------------------------

    def _post_latency(self) -> tuple[tuple[float, float], tuple[float, float]]:
        p = self.plan
        api = _median_pair(lambda: figures.post_latency(self.h, p.post_samples), p.runs)
        ref = _median_pair(lambda: figures.insert_latency(self.h, p.post_samples), p.runs)
        self.h.reset()
        return api, ref

    def _figures_without_workers(self) -> None:
        p = self.plan
        self.say("figure 1: POST /process latency")
        api, ref = self._post_latency()
        self.rows.append(Row("1 POST /process latency, 1 client", _lat(api), "bare INSERT " + _lat(ref),
                             "p50 < 3 ms, p99 < 15 ms", _verdict(api[0] < 0.003 and api[1] < 0.015)))
        self.say("figure 2: POST /process under load")
        for connections in (16, 64):
            loads = [figures.post_load(self.h, connections, p.load_seconds) for _ in range(p.runs)]
            self.h.reset()
            refs = [figures.insert_load(self.h, connections, p.load_seconds) for _ in range(p.runs)]
            self.h.reset()
            rate = statistics.median(r.rate for r in loads)
            p99 = statistics.median(figures.percentile(r.latencies, 99) for r in loads)
            cpu = statistics.median(r.cpu_share for r in loads)
            ref_rate = statistics.median(r.rate for r in refs)
            ref_p99 = statistics.median(figures.percentile(r.latencies, 99) for r in refs)
            target, verdict = ("≥ 0.8× bare INSERT", _verdict(rate >= 0.8 * ref_rate)) if connections == 16 else ("", "")
            self.rows.append(Row(
                f"2 POST /process, {connections} connections",
                f"{rate:,.0f} req/s, p99 {_ms(p99)} (load generator {cpu:.2f} CPU)",
                f"bare INSERT {ref_rate:,.0f}/s, p99 {_ms(ref_p99)}", target, verdict))
        self.say("figure 3: POST /process/batch")
        rate = _median(lambda: figures.batch_rate(self.h, p.batch_requests, p.batch_size), p.runs)
        self.h.reset()
        self.rows.append(Row(f"3 POST /process/batch ({p.batch_size}/request)", f"{rate:,.0f} tasks/s", "",
                             "≥ 10,000 tasks/s", _verdict(rate >= 10_000)))
        self._siege()

    def _siege(self) -> None:
        waiters, slow = SIEGE_WAITERS, SIEGE_SLOW
        self.say(f"figure 12: POST /process with {waiters:,} waiting and {slow} slow clients")
        samples = max(self.plan.post_samples, SIEGE_MIN_SAMPLES)
        pairs = [figures.post_latency_under_siege(self.h.port, waiters, slow, samples)
                 for _ in range(self.plan.runs)]
        self.h.reset()
        idle = (statistics.median(figures.percentile(i, 50) for i, _ in pairs),
                statistics.median(figures.percentile(i, 99) for i, _ in pairs))
        besieged = (statistics.median(figures.percentile(b, 50) for _, b in pairs),
                    statistics.median(figures.percentile(b, 99) for _, b in pairs))
        self.rows.append(Row(f"12 POST /process latency, {waiters:,} waiting + {slow} slow clients",
                             _lat(besieged), "idle " + _lat(idle), "p99 ≤ 2× idle",
                             _verdict(besieged[1] <= 2 * idle[1])))

    def _figures_with_workers(self) -> None:
        p = self.plan
        workers = self.h.start_workers(1)
        try:
            self.say("figure 4: dispatch latency")
            dispatch = _median_pair(lambda: figures.dispatch_latency(self.h, p.dispatch_samples), p.runs)
            self.rows.append(Row("4 dispatch: committed → handler started", _lat(dispatch), "",
                                 "p50 < 6 ms, p99 < 30 ms", _verdict(dispatch[0] < 0.006 and dispatch[1] < 0.030)))
            self.say("figure 6: result latency with ?wait")
            waits = [figures.result_latency(self.h, p.result_samples) for _ in range(p.runs)]
            if any(w is None for w in waits):
                self.rows.append(Row("6 result: completed → ?wait answered", "n/a (no ?wait)", "", "p50 < 20 ms", "MISS"))
            else:
                pair = (statistics.median(figures.percentile(w, 50) for w in waits),
                        statistics.median(figures.percentile(w, 99) for w in waits))
                self.rows.append(Row("6 result: completed → ?wait answered", _lat(pair), "", "p50 < 20 ms",
                                     _verdict(pair[0] < 0.020)))
            self.say("figure 7: GET /results")
            self._get_latency()
            self.h.reset()
        finally:
            self.h.stop(workers)
        self.say("figure 5: worker throughput")
        for count in (1, 2):
            ours, plain, ratio = self._worker_rates(count)
            target, verdict = ("", "")
            if count == 2:
                target, verdict = "≥ 400 tasks/s and ≥ 1.0× plain", _verdict(ours >= 400 and ratio >= 1.0)
            self.rows.append(Row(f"5 worker throughput, {count} process{'es' if count > 1 else ''}",
                                 f"{ours:,.0f} tasks/s ({ratio:.2f}× plain)",
                                 f"plain Procrastinate {plain:,.0f} jobs/s", target, verdict))
        self._isolation_cost()

    def _isolation_cost(self) -> None:
        """What running a sync handler in a child process costs per task, against a thread."""
        workers = self.h.start_workers(1)
        pooled, threaded = [], []
        try:
            # Children start on first use: a warm pool is what a running worker has.
            figures.worker_rate(self.h, 5 * self.settings.worker.concurrency, "bench.sync_noop")
            self.h.reset()
            for _ in range(self.plan.runs):
                pooled.append(self._drain_once("bench.sync_noop"))
                threaded.append(self._drain_once("bench.thread_noop"))
        finally:
            self.h.stop(workers)
        process, thread = statistics.median(pooled), statistics.median(threaded)
        self.rows.append(Row("5 sync handler, process pool (the default), 1 process",
                             f"{process:,.0f} tasks/s; {_ms(1 / process - 1 / thread)} per task over a thread",
                             f"isolation=\"thread\" {thread:,.0f} tasks/s", "", ""))

    def _worker_rates(self, count: int) -> tuple[float, float, float]:
        """Ours and plain Procrastinate with `count` processes each, runs alternating.

        Both sets of workers stay up, each idle while the other works, so that
        every pair of runs sees the same machine; the ratio is the median of the
        per-pair ratios.
        """
        ours_workers = self.h.start_workers(count)
        plain_workers = self.h.start_workers(count, plain=True)
        pairs = []
        try:
            for _ in range(self.plan.runs):
                pairs.append((self._drain_once(), figures.plain_worker_rate(self.h, self.plan.worker_tasks)))
                self.h.reset()
        finally:
            self.h.stop(ours_workers + plain_workers)
        return _rates_beside(pairs)

    def _drain_once(self, operation: str = "bench.noop") -> float:
        rate = figures.worker_rate(self.h, self.plan.worker_tasks, operation)
        self.h.reset()
        return rate

    def _get_latency(self) -> None:
        found = [figures.get_latencies(self.h, self.plan.get_samples) for _ in range(self.plan.runs)]

        def pair(kind: str) -> tuple[float, float] | None:
            if found[0][kind] is None:
                return None
            return (statistics.median(figures.percentile(f[kind], 50) for f in found),
                    statistics.median(figures.percentile(f[kind], 99) for f in found))

        hit, miss, off = pair("hit"), pair("miss"), pair("off")
        self.rows.append(Row("7 GET /results, cache hit (in process)", _lat(hit) if hit else "n/a (no Redis)", "",
                             "p50 < 1 ms", _verdict(hit is not None and hit[0] < 0.001)))
        self.rows.append(Row("7 GET /results, cache miss (in process)", _lat(miss) if miss else "n/a (no Redis)", "", "", ""))
        self.rows.append(Row("7 GET /results, Redis off (in process)", _lat(off), "", "", ""))

    # -- figures 8, 11 and 9: each beside the empty twin, alternating ---------

    def _post_latency_beside_empty(self) -> tuple[tuple[float, float], tuple[float, float]]:
        loaded, empty = _median_pairs(
            lambda: figures.post_latency_alternating([self.h, self.twin], self.plan.post_samples), self.plan.runs)
        self.h.reset()
        self.twin.reset()
        return loaded, empty

    def _dispatch_beside_empty(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Figure 4 here and on the twin, on one worker each, started and stopped for it."""
        workers = self.h.start_workers(1) + self.twin.start_workers(1)
        try:
            loaded, empty = _median_pairs(
                lambda: figures.dispatch_latency_alternating([self.h, self.twin], self.plan.dispatch_samples),
                self.plan.runs)
        finally:
            self.h.stop(workers)
        self.twin.reset()
        return loaded, empty

    def _throughput_beside_empty(self, drain_here: Callable[[], float]) -> tuple[float, float, float]:
        """Figure 5 with 2 processes here (`drain_here`) and on the twin, runs alternating,
        both sets of workers up throughout."""
        workers = self.h.start_workers(2) + self.twin.start_workers(2)
        pairs = []
        try:
            for _ in range(self.plan.runs):
                pairs.append((drain_here(), figures.worker_rate(self.twin, self.plan.worker_tasks)))
                self.twin.reset()
        finally:
            self.h.stop(workers)
        return _rates_beside(pairs)

    def _enqueue_beside_empty(self) -> list[tuple[float, float, float]]:
        """Figure 9's enqueue: POST /process at 16 connections, then the bare INSERT from one
        connection, here and on the twin, runs alternating; what they queue stays queued until
        both are measured."""
        p = self.plan
        found = []
        for measure in (lambda h: figures.post_load(h, 16, p.load_seconds).rate,
                        lambda h: figures.insert_load(h, 1, p.load_seconds).rate):
            found.append(_rates_beside([(measure(self.h), measure(self.twin)) for _ in range(p.runs)]))
        self.h.remove_figure_tasks()
        self.twin.reset()
        return found

    def _latency_row(self, figure: str, loaded: tuple[float, float], empty: tuple[float, float]) -> None:
        self.rows.append(Row(figure, _lat(loaded), "empty, alternating " + _lat(empty), "p50, p99 ≤ 1.2× empty",
                             _verdict(loaded[0] <= 1.2 * empty[0] and loaded[1] <= 1.2 * empty[1])))

    def _rate_row(self, figure: str, found: tuple[float, float, float], unit: str = "tasks/s") -> None:
        here, empty, ratio = found
        self.rows.append(Row(figure, f"{here:,.0f} {unit} ({ratio:.2f}× empty)", f"empty, alternating {empty:,.0f} {unit}",
                             "≥ 0.8× empty", _verdict(ratio >= 0.8)))

    def _flatness(self) -> None:
        p = self.plan
        self.say(f"figure 8: seeding {p.seed_rows:,} finished tasks")
        seconds = self.h.seed_finished(p.seed_rows)
        self.say(f"seeded in {seconds:.1f}s; re-measuring figures 1, 4 and 5")
        try:
            api = self._post_latency_beside_empty()
            dispatch = self._dispatch_beside_empty()
            self.h.reset()
            throughput = self._throughput_beside_empty(self._drain_once)
        finally:
            self.h.remove_seed()
        label = f"8 with {p.seed_rows:,} finished rows:"
        self._latency_row(f"{label} figure 1", *api)
        self._latency_row(f"{label} figure 4", *dispatch)
        self._rate_row(f"{label} figure 5 (2 processes)", throughput)

    def _ledger(self) -> None:
        p = self.plan
        self.say(f"figure 11: seeding a month of {p.ledger_rows:,} finished tasks, with counts and history")
        seconds = self.h.seed_ledger(p.ledger_rows)
        self.say(f"seeded in {seconds:.1f}s; re-measuring figures 1 and 4, /metrics, the reporting views, pruning")
        label = f"11 ledger of {p.ledger_rows:,} tasks:"
        try:
            api = self._post_latency_beside_empty()
            dispatch = self._dispatch_beside_empty()
            self.h.reset()
            scrape = _median_pair(lambda: figures.metrics_latency(self.h, max(10, p.post_samples // 10)), p.runs)
            views = figures.reporting_latencies(self.h, 5)
            slowest = max(views, key=views.get)
            pruning = figures.Pruning(self.h, DatabaseSettings(url=self.h.database_url),
                                      RetentionSettings(prune_batch_size=self.settings.retention.prune_batch_size),
                                      p.prune_seconds)
            quiet = _median_pair(lambda: figures.post_latency(self.h, p.post_samples), p.runs)
            quiet_load = figures.post_load(self.h, 16, p.load_seconds)
            with pruning:
                busy = _median_pair(lambda: figures.post_latency(self.h, p.post_samples), p.runs)
                busy_load = figures.post_load(self.h, 16, p.load_seconds)
            self.h.reset()
        finally:
            self.h.remove_seed()
        self._latency_row(f"{label} figure 1", *api)
        self._latency_row(f"{label} figure 4", *dispatch)
        self.rows.append(Row(f"{label} GET /metrics", _lat(scrape), "", "< 50 ms", _verdict(scrape[1] < 0.050)))
        self.rows.append(Row(f"{label} slowest reporting view", f"{slowest}: {_ms(views[slowest])}",
                             ", ".join(f"{name} {views[name] * MS:.1f}" for name in views if name != slowest) + " (ms)",
                             "< 50 ms", _verdict(views[slowest] < 0.050)))
        self.rows.append(Row(f"{label} prune rate",
                             f"{pruning.rate:,.0f} rows/s ({pruning.pruned:,} in {pruning.seconds:.1f}s, pauses included)",
                             f"{pruning.busy_rate:,.0f} rows/s inside batches of {self.settings.retention.prune_batch_size:,}", "", ""))
        self.rows.append(Row(f"{label} figure 1 while pruning", _lat(busy), "not pruning " + _lat(quiet),
                             "p99 ≤ 2× not pruning", _verdict(busy[1] <= 2 * quiet[1])))
        busy_p99, quiet_p99 = (figures.percentile(r.latencies, 99) for r in (busy_load, quiet_load))
        self.rows.append(Row(f"{label} figure 2 (16 connections) while pruning",
                             f"{busy_load.rate:,.0f} req/s, p99 {_ms(busy_p99)}",
                             f"not pruning {quiet_load.rate:,.0f} req/s, p99 {_ms(quiet_p99)}",
                             "p99 ≤ 2× not pruning", _verdict(busy_p99 <= 2 * quiet_p99)))

    def _backlog(self) -> None:
        """Figure 9: enqueue, dispatch and throughput with a growing backlog of pending tasks, never analysed."""
        p = self.plan
        self.h.reset()
        seeded = 0
        try:
            for size in p.backlog_sizes:
                self.say(f"figure 9: queueing a backlog of {size:,} pending tasks")
                seconds = self.h.seed_backlog(size - seeded)
                seeded = size
                self.say(f"queued in {seconds:.1f}s; measuring enqueue")
                posts, inserts = self._enqueue_beside_empty()
                label = f"9 with {size:,} pending:"
                self._rate_row(f"{label} POST /process, 16 connections", posts, "req/s")
                self._rate_row(f"{label} bare INSERT, 1 connection", inserts, "rows/s")
            self.say(f"figure 9: dispatch and throughput with {seeded:,} pending")
            dispatch = self._dispatch_beside_empty()
            self.h.remove_figure_tasks()
            throughput = self._throughput_beside_empty(self._drain_over_backlog)
        finally:
            self.h.remove_seed()
            self.h.reset()
        label = f"9 with {seeded:,} pending:"
        self._latency_row(f"{label} figure 4", *dispatch)
        self._rate_row(f"{label} figure 5 (2 processes)", throughput)

    def _drain_over_backlog(self) -> float:
        rate = figures.backlog_worker_rate(self.h, self.plan.worker_tasks)
        self.h.remove_figure_tasks()
        return rate

    def _sustained(self) -> None:
        """Figure 10: 16 clients POST for a while against one API and two workers.

        Then again with the API at the workers' CPU priority, the same run's
        reference for what ASYNCPROC_API_NICE buys on a shared host.
        """
        seconds = self.plan.sustained_seconds
        self.say(f"figure 10: 16 clients for {seconds:g}s with 2 workers")
        found = self._sustained_once(seconds)
        self.say("figure 10 again, the API at the workers' priority")
        self.h.restart_api({"ASYNCPROC_API_NICE": "0"})
        try:
            equal = self._sustained_once(seconds)
        finally:
            self.h.restart_api()
        self.rows.append(Row(
            f"10 sustained: 16 clients for {found.seconds:.0f} s, 1 API, 2 workers", _sustained_text(found),
            f"API at the workers' priority: {_sustained_text(equal)}",
            "all accepted completed, drained ≤ 5 s after the end",
            _verdict(found.drained_after is not None and found.drained_after <= 5.0)))

    def _sustained_once(self, seconds: float) -> figures.Sustained:
        workers = self.h.start_workers(2)
        try:
            return figures.sustained(self.h, 16, seconds, drain_wait=max(30.0, seconds))
        finally:
            self.h.stop(workers)
            self.h.reset()

    # -- output ----------------------------------------------------------

    def print_tables(self) -> None:
        print("| setup | |\n|---|---|", file=self.out)
        for name, value in self.setup:
            print(f"| {name} | {value} |", file=self.out)
        print(file=self.out)
        print("| figure | measured | reference, same run | target | |\n|---|---|---|---|---|", file=self.out)
        for row in self.rows:
            print(f"| {row.figure} | {row.measured} | {row.reference} | {row.target} | {row.verdict} |", file=self.out)
        self.out.flush()


def _sustained_text(found: figures.Sustained) -> str:
    drained = f"{found.drained_after:.1f} s" if found.drained_after is not None else "not within the wait"
    return (f"accepted {found.accepted / found.seconds:,.0f}/s, completed {found.completed / found.seconds:,.0f}/s;"
            f" {found.backlog_at_end:,} left at the end, drained {drained} after")


def run(settings: Settings, quick: bool, out: TextIO = sys.stdout, ledger_rows: int | None = None,
        output: str | None = None) -> int:
    plan = Plan.quick() if quick else Plan.full()
    if ledger_rows is not None:
        plan = replace(plan, ledger_rows=ledger_rows)
    bench = Bench(settings, plan, out)
    status = bench.run()
    if output is not None:
        with open(output, "w", encoding="utf-8") as file:
            bench.out = file
            bench.print_tables()
    return status
