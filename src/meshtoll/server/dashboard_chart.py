"""Charts as inline SVG drawn on the server: no chart library, nothing for the browser to
fetch or run, and the same picture without JavaScript."""

from __future__ import annotations

from dataclasses import dataclass

WIDTH = 600
HEIGHT = 120
GAP = 2


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # what the bar's tooltip (its SVG <title>) says
    value: int | None


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    top: int  # the value the full height stands for
    bars: tuple[Bar, ...]


def bar_chart(values: list[int | None], labels: list[str]) -> BarChart:
    """One bar per value, scaled to the largest; an unknown value (None) has no bar."""
    top = max([value for value in values if value is not None] + [0])
    step = WIDTH / max(len(values), 1)
    bars = []
    for index, (value, label) in enumerate(zip(values, labels, strict=True)):
        height = 0.0 if not value or not top else HEIGHT * value / top
        shown = "unknown" if value is None else f"{value:,}"
        bars.append(
            Bar(round(index * step, 1), round(HEIGHT - height, 1), round(step - GAP, 1), round(height, 1),
                f"{label}: {shown}", value)
        )  # fmt: skip
    return BarChart(WIDTH, HEIGHT, top, tuple(bars))
