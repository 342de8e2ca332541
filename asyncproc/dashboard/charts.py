"""Charts as inline SVG drawn on the server: no JavaScript, no library."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 120


@dataclass(frozen=True)
class Series:
    svg: Markup
    completed: int
    failed: int

    @property
    def failure_rate(self) -> float:
        finished = self.completed + self.failed
        return self.failed / finished if finished else 0.0


def per_minute(rows: Iterable[dict[str, Any]], now: datetime, minutes: int, title: str) -> Series:
    """Stacked bars of completed and failed tasks per minute over the last `minutes`."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    completed = [0] * minutes
    failed = [0] * minutes
    for row in rows:
        slot = int((row["bucket_start"] - start).total_seconds() // 60)
        if 0 <= slot < minutes:
            completed[slot] += row["completed"]
            failed[slot] += row["failed"]
    peak = max((c + f for c, f in zip(completed, failed)), default=0) or 1
    bar = WIDTH / minutes
    width = max(bar - 0.5, 0.5) if minutes <= 120 else max(bar, 1.5)
    # One path per series, so that a day of minutes stays a few kilobytes.
    done_path, failed_path, titles = [], [], []
    for slot, (done, bad) in enumerate(zip(completed, failed)):
        if done + bad == 0:
            continue
        x = slot * bar
        done_h = HEIGHT * done / peak
        bad_h = HEIGHT * bad / peak
        if done_h:
            done_path.append(f"M{x:.2f} {HEIGHT - done_h - bad_h:.2f}h{width:.2f}v{done_h:.2f}h{-width:.2f}z")
        if bad_h:
            failed_path.append(f"M{x:.2f} {HEIGHT - bad_h:.2f}h{width:.2f}v{bad_h:.2f}h{-width:.2f}z")
        if minutes <= 120:
            label = escape(f"{(start + timedelta(minutes=slot)):%H:%M} UTC: {done} completed, {bad} failed")
            titles.append(
                f'<rect class="hover" x="{x:.2f}" y="0" width="{bar:.2f}" height="{HEIGHT}"><title>{label}</title></rect>'
            )
    svg = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<line class="axis" x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}"/>'
        f'<path class="completed" d="{"".join(done_path)}"/><path class="failed" d="{"".join(failed_path)}"/>'
        f'{"".join(titles)}</svg>'
    )
    return Series(Markup(svg), sum(completed), sum(failed))
