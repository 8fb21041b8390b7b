"""The overview's traffic figures, read from the instance's own metrics (what /metrics serves),
so that the dashboard and a Prometheus scrape cannot tell two stories: decisions allowed and
denied by reason, requests per second and authz's decision latency percentiles (both
transports) over the last minute.

Rates and percentiles need two readings: each read is kept (at most one a second matters;
the overview refreshes every 5 s) and the figures cover the span from the oldest reading
within the last minute to now, the first reading being taken when the process is built.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from meshtoll.telemetry.metrics import Metrics

DECISIONS = "meshtoll_authz_decisions"
WINDOW_SECONDS = 60.0
_READINGS = 64


@dataclass(frozen=True, slots=True)
class Reading:
    """The metrics the figures come from, at one moment."""

    decisions: dict[str, float]  # authz decisions by outcome ("allow" or the refusal's code)
    latency_bounds: tuple[float, ...] = ()  # decision latency histogram: bucket upper bounds (s)
    latency_counts: tuple[float, ...] = field(default=())  # per bucket, the last above every bound

    @property
    def total(self) -> float:
        return sum(self.decisions.values())


class Traffic:
    def __init__(self, read: Callable[[], Reading], clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._clock = clock
        self._readings: deque[tuple[float, Reading]] = deque([(clock(), read())], maxlen=_READINGS)

    def figures(self) -> dict[str, Any]:
        reading = self._read()
        now = self._clock()
        self._readings.append((now, reading))
        denied = {outcome: int(n) for outcome, n in sorted(reading.decisions.items()) if outcome != "allow"}
        since, before = next((t, r) for t, r in self._readings if now - t <= WINDOW_SECONDS)
        span = now - since
        counts = reading.latency_counts
        if span >= 1.0 and len(before.latency_counts) == len(counts):
            counts = tuple(a - b for a, b in zip(counts, before.latency_counts, strict=True))
        return {
            "decisions": int(reading.total),
            "allowed": int(reading.decisions.get("allow", 0)),
            "denied": sum(denied.values()),
            "denied_by_reason": denied,
            "requests_per_second": round((reading.total - before.total) / span, 2) if span >= 1.0 else None,
            "latency_p50_seconds": quantile(reading.latency_bounds, counts, 0.5),
            "latency_p99_seconds": quantile(reading.latency_bounds, counts, 0.99),
            "window_seconds": round(span, 1),
        }


def quantile(bounds: tuple[float, ...], counts: tuple[float, ...], q: float) -> float | None:
    """The q-quantile of a histogram, interpolated linearly within its bucket as Prometheus'
    histogram_quantile does (the lowest bucket from 0; one above every bound answers the
    highest bound). None without observations."""
    total = sum(counts)
    if not bounds or total <= 0:
        return None
    rank = q * total
    below = 0.0
    for index, count in enumerate(counts):
        if below + count >= rank and count > 0:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index > 0 else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


def metrics_reading(metrics: Metrics, latency_family: str) -> Callable[[], Reading]:
    """The figures' metrics as /metrics serves them (the whole worker group's): authz
    decisions by outcome, and authz's decision latency histogram (`latency_family`, labelled
    by service), both transports added."""

    def read() -> Reading:
        decisions: dict[str, float] = {}
        bounds: tuple[float, ...] = ()
        counts: list[float] = []
        for family in metrics.group_collection():
            if family.name == DECISIONS:
                for labels, value in family.samples.items():
                    outcome = dict(labels).get("outcome", "")
                    decisions[outcome] = decisions.get(outcome, 0.0) + value
            elif family.name == latency_family:
                bounds = family.bounds
                for labels, histogram in family.histograms.items():
                    if dict(labels).get("service") == "authz":
                        counts = [a + b for a, b in zip_longest(counts, histogram.counts, fillvalue=0)]
        return Reading(decisions, bounds, tuple(counts))

    return read
