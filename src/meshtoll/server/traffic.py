"""The overview's traffic figures, read from the instance's own metrics (what /metrics serves),
so that the dashboard and a Prometheus scrape cannot tell two stories: decisions allowed and
denied by reason, requests per second over the last minute, decision latency percentiles."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from meshtoll.telemetry.families import merge
from meshtoll.telemetry.metrics import Metrics

DECISIONS = "meshtoll_authz_decisions"
RATE_WINDOW_SECONDS = 60.0
_SAMPLES = 64


class Traffic:
    """Keeps the decision totals it has read, to turn them into a rate."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        # Built before the first decision: the first page's rate is then the rate since start.
        self._samples: deque[tuple[float, float]] = deque([(clock(), 0.0)], maxlen=_SAMPLES)

    def figures(self) -> dict[str, Any]:
        by_outcome = self._decisions()
        total = sum(by_outcome.values())
        now = self._clock()
        self._samples.append((now, total))
        denied = {outcome: count for outcome, count in sorted(by_outcome.items()) if outcome != "allow"}
        return {
            "decisions": total,
            "allowed": by_outcome.get("allow", 0),
            "denied": sum(denied.values()),
            "denied_by_reason": denied,
            "requests_per_second": self._rate(now, total),
            # Not measured by this version of meshtoll's metrics: shown as unknown, never as 0.
            "latency_p50_seconds": None,
            "latency_p99_seconds": None,
        }

    def _rate(self, now: float, total: float) -> float | None:
        """Decisions per second since the oldest sample within the window; None until two
        samples are at least a second apart."""
        oldest = next(((t, n) for t, n in self._samples if now - t <= RATE_WINDOW_SECONDS), None)
        if oldest is None or now - oldest[0] < 1.0:
            return None
        return round((total - oldest[1]) / (now - oldest[0]), 2)

    def _decisions(self) -> dict[str, int]:
        collection = self._metrics.collect()
        if self._metrics.siblings is not None:  # the other workers': /metrics reports the group
            collection = merge([collection, *self._metrics.siblings()])
        counts: dict[str, int] = {}
        for family in collection:
            if family.name == DECISIONS:
                for labels, value in family.samples.items():
                    outcome = dict(labels).get("outcome", "")
                    counts[outcome] = counts.get(outcome, 0) + int(value)
        return counts
