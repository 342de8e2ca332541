"""Charts as inline SVG drawn on the server: no JavaScript, no library."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 170
# Room for the value axis on the left, the time axis below, and the bars' values above.
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 24, 24
# A bar's value is printed above it only where it fits: about this many pixels a digit.
DIGIT_WIDTH = 5.5


@dataclass(frozen=True)
class Series:
    svg: Markup
    completed: int
    failed: int

    @property
    def failure_rate(self) -> float:
        finished = self.completed + self.failed
        return self.failed / finished if finished else 0.0


def throughput(
    rows: Iterable[dict[str, Any]], now: datetime, minutes: int, per: int, tick_every: int, title: str
) -> Series:
    """Stacked bars of completed and failed tasks, one per `per` minutes over the
    last `minutes` (the current minute included), with a time axis ticked every
    `tick_every` minutes of the clock (UTC) and a value axis."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    slots = minutes // per
    completed = [0] * slots
    failed = [0] * slots
    for row in rows:
        slot = int((row["bucket_start"] - start).total_seconds() // (60 * per))
        if 0 <= slot < slots:
            completed[slot] += row["completed"]
            failed[slot] += row["failed"]
    top = _nice_ceiling(max((c + f for c, f in zip(completed, failed)), default=0))
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bar = plot_width / slots
    width = max(bar - 1, 1)
    base = TOP + plot_height

    def height(tasks: int) -> float:
        return plot_height * tasks / top

    # One path per series, so that many bars stay a few kilobytes.
    done_path, failed_path, values, hovers = [], [], [], []
    for slot, (done, bad) in enumerate(zip(completed, failed)):
        x = LEFT + slot * bar
        slot_start = start + timedelta(minutes=slot * per)
        label = f"{slot_start:%H:%M}–{slot_start + timedelta(minutes=per):%H:%M} UTC: {done} completed, {bad} failed"
        hovers.append(
            f'<rect class="hover" x="{x:.2f}" y="{TOP}" width="{bar:.2f}" height="{plot_height}">'
            f"<title>{escape(label)}</title></rect>"
        )
        if done + bad == 0:
            continue
        if done:
            done_path.append(_bar(x, base - height(done + bad), width, height(done)))
        if bad:
            failed_path.append(_bar(x, base - height(bad), width, height(bad)))
        if len(str(done + bad)) * DIGIT_WIDTH <= bar + 2:
            y = base - height(done + bad) - 3
            values.append(f'<text class="value" x="{x + width / 2:.2f}" y="{y:.2f}">{done + bad}</text>')
    y_ticks = "".join(
        f'<line class="grid" x1="{LEFT}" y1="{y:.2f}" x2="{WIDTH - RIGHT}" y2="{y:.2f}"/>'
        f'<text x="{LEFT - 6}" y="{y + 3:.2f}">{tasks:,}</text>'
        for tasks in sorted({0, top} | ({top // 2} if top % 2 == 0 else set()))
        for y in [base - height(tasks)]
    )
    # Ticks fall on round times of the clock, never on the axes' corner, where the unit is.
    first_tick = start + timedelta(minutes=tick_every - (start.hour * 60 + start.minute) % tick_every)
    x_ticks = []
    tick = first_tick
    while tick < end:
        x = LEFT + (tick - start).total_seconds() / 60 / minutes * plot_width
        x_ticks.append(
            f'<line x1="{x:.2f}" y1="{base}" x2="{x:.2f}" y2="{base + 4}"/>'
            f'<text x="{x:.2f}" y="{base + 16}">{tick:%H:%M}</text>'
        )
        tick += timedelta(minutes=tick_every)
    svg = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<g class="y-axis">{y_ticks}</g>'
        f'<g class="x-axis"><line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>{"".join(x_ticks)}</g>'
        f'<text class="unit" x="{LEFT - 6}" y="{TOP - 10}">tasks</text>'
        f'<text class="unit" x="{LEFT - 6}" y="{base + 16}">UTC</text>'
        f'<path class="completed" d="{"".join(done_path)}"/><path class="failed" d="{"".join(failed_path)}"/>'
        f'{"".join(values)}{"".join(hovers)}</svg>'
    )
    return Series(Markup(svg), sum(completed), sum(failed))


def _bar(x: float, y: float, width: float, height: float) -> str:
    return f"M{x:.2f} {y:.2f}h{width:.2f}v{height:.2f}h{-width:.2f}z"


def _nice_ceiling(peak: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... at or above `peak`: round tick values."""
    step = 1
    while True:
        for nice in (step, 2 * step, 5 * step):
            if nice >= peak:
                return nice
        step *= 10
