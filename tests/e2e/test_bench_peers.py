"""`asyncproc bench --peers --quick` measures asyncproc beside a real peer and reports every figure."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from asyncproc.bench.peers import compare, venvs

pytestmark = pytest.mark.e2e

PEER = "pgqueuer"  # the one that installs fastest: two wheels
FIGURES = [
    "| drain 500 preloaded, tasks/s |",
    "| drain, asyncproc with thread isolation, tasks/s |",
    "| drain, asyncproc with async handler, tasks/s |",
    "| enqueue, 16 producers, its own call, tasks/s |",
    "| enqueue, 16 producers, SQL INSERT INTO tasks, tasks/s |",
    "| enqueue, 16 producers, HTTP POST /process, tasks/s |",
    "| pickup p50, ms |",
    "| pickup p99, ms |",
    "| sustained: completed/s |",
    "| sustained: backlog left at the end |",
    "| sustained: backlog drained after, s |",
]
TARGETS = [
    "| drain ≥ 1.0× the better of PgQueuer and Oban |",
    "| SQL enqueue ≥ 1.0× the best peer's |",
    "| POST /process ≥ 0.8× the best peer's enqueue |",
    "| sustained completed/s ≥ 1.0× the best peer's |",
    "| sustained: asyncproc's backlog drains within 5 s |",
    "| pickup p50 ≤ the best peer's, ms |",
    "| pickup p99 ≤ the best peer's, ms |",
]
NUMBER = r"[\d,.]+"


@pytest.fixture(scope="module")
def peer_python():
    [peer] = [p for p in venvs.peers() if p.name == f"{PEER}_peer"]
    try:
        return venvs.ensure(peer)
    except venvs.PeerUnavailable as error:
        pytest.skip(f"cannot install {peer.label}: {error}")


def test_bench_peers_quick_reports_each_workload_beside_the_peer(tmp_path, peer_python):
    docs = tmp_path / "performance.md"
    docs.write_text(f"# Performance\n\n{compare.SECTION}\n\nHow.\n\n<!-- peers report -->\nold\n<!-- /peers report -->\n\n## Next\n")
    env = {**os.environ, "ASYNCPROC_LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "bench", "--peers", "--quick", "--peer", PEER,
         "--output", str(tmp_path / "peers.md"), "--docs", str(docs)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert (tmp_path / "peers.md").read_text() == report
    lines = report.splitlines()
    assert "| figure | asyncproc | PgQueuer |" in lines, report
    for figure in FIGURES:
        [line] = [line for line in lines if line.startswith(figure)]
        cells = line.split("|")[2:-1]
        assert len(cells) == 2, line
        if "asyncproc" not in figure and "SQL" not in figure and "HTTP" not in figure:
            assert re.fullmatch(rf" {NUMBER} ", cells[1]), line  # the peer's
        if "its own call" not in figure:
            assert re.fullmatch(rf" {NUMBER} ", cells[0]), line  # asyncproc's
    # CPU per task by process, and the writes per task, for each drain.
    for system in ("asyncproc", "asyncproc, thread isolation", "asyncproc, async handler", "PgQueuer"):
        [line] = [line for line in lines if line.startswith(f"| {system} |")]
        postgres, workers, _api, _redis, writes = line.split("|")[2:-1]
        assert re.fullmatch(rf" {NUMBER} ", postgres) and re.fullmatch(rf" {NUMBER} ", workers), line
        assert float(writes) > 0, line
    for target in TARGETS:
        [line] = [line for line in lines if line.startswith(target)]
        assert line.endswith(("| PASS |", "| MISS |")), line
    assert re.search(r"\| systems \| asyncproc [\d.]+, PgQueuer 1\.6\.0 \|", report), report
    assert re.search(r"\| postgresql \| \d+\.\d+ .*fsync on, synchronous_commit on", report), report
    assert "| host | " in report and "load average at start" in report
    # The docs section's report is replaced; the text around it stays.
    text = docs.read_text()
    assert "\nold\n" not in text and report in text
    assert text.startswith(f"# Performance\n\n{compare.SECTION}\n\nHow.\n") and text.endswith("<!-- /peers report -->\n\n## Next\n")
