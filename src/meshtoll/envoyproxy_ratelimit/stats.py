"""envoyproxy/ratelimit's per-limit statistics, counted as it counts them and served as its
Prometheus mapping names them: `ratelimit_service_rate_limit_<stat>{domain, key1, key2...}`
for total_hits, over_limit, near_limit, within_limit, shadow_mode and
over_limit_with_local_cache. The key is the limit's metric key (the configuration path, or
the request's values with `detailed_metric` / `value_to_metric`)."""

from __future__ import annotations

import functools
import math
from collections import Counter

from meshtoll.telemetry.families import Labels
from meshtoll.telemetry.metrics import Metrics

STATS = (
    "total_hits",
    "over_limit",
    "near_limit",
    "within_limit",
    "shadow_mode",
    "over_limit_with_local_cache",
)
_MAX_KEYS = 100_000  # value_to_metric keys grow with the values clients send


class DescriptorStats:
    def __init__(self, near_limit_ratio: float = 0.8) -> None:
        self.near_limit_ratio = near_limit_ratio  # NEAR_LIMIT_RATIO
        self.counts: Counter[tuple[str, str]] = Counter()

    def record(
        self,
        key: str,
        limit: int,
        after: int,
        hits: int,
        *,
        from_local_cache: bool = False,
        shadow: bool = False,
    ) -> None:
        """One counted descriptor: its count after the hits (unused when the local cache
        answered), as envoyproxy/ratelimit's GetResponseDescriptorStatus counts it."""
        if len(self.counts) >= _MAX_KEYS and (key, "total_hits") not in self.counts:
            return
        counts = self.counts
        counts[key, "total_hits"] += hits
        before = after - hits
        near = math.floor(limit * self.near_limit_ratio)
        if from_local_cache:
            counts[key, "over_limit"] += hits
            counts[key, "over_limit_with_local_cache"] += hits
        elif after > limit:
            if before >= limit:
                counts[key, "over_limit"] += hits
            else:
                counts[key, "over_limit"] += after - limit
                counts[key, "near_limit"] += limit - max(near, before)
        else:
            if after > near:
                counts[key, "near_limit"] += hits if before >= near else after - near
            counts[key, "within_limit"] += hits
        if shadow and (from_local_cache or after > limit):
            counts[key, "shadow_mode"] += hits if from_local_cache or before >= limit else after - limit

    def samples(self, stat: str) -> dict[Labels, float]:
        """One statistic's counts, labelled as the peer's Prometheus mapping labels them."""
        return {_labels(key): value for (key, counted), value in list(self.counts.items()) if counted == stat}

    def export(self, metrics: Metrics) -> None:
        """Serve the statistics on `metrics`, under the peer's names (no `_total`)."""
        for stat in STATS:
            metrics.counter(
                f"ratelimit_service_rate_limit_{stat}",
                f"envoyproxy/ratelimit's {stat} per limit, by domain and key",
                functools.partial(self.samples, stat),
                legacy=True,
            )


def _labels(key: str) -> Labels:
    domain, *parts = key.split(".")
    return (("domain", domain), *((f"key{n}", part) for n, part in enumerate(parts, 1)))
