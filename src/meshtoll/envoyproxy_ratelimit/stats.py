"""envoyproxy/ratelimit's per-limit statistics, counted as it counts them and served as its
Prometheus mapping names them: `ratelimit_service_rate_limit_<stat>{domain, key1, key2...}`
for total_hits, over_limit, near_limit, within_limit, shadow_mode and
over_limit_with_local_cache. The key is the limit's metric key (the configuration path, or
the request's values with `detailed_metric` / `value_to_metric`)."""

from __future__ import annotations

import functools
import math

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
(
    _TOTAL_HITS,
    _OVER_LIMIT,
    _NEAR_LIMIT,
    _WITHIN_LIMIT,
    _SHADOW_MODE,
    _OVER_LIMIT_WITH_LOCAL_CACHE,
) = range(len(STATS))


class DescriptorStats:
    def __init__(self, near_limit_ratio: float = 0.8) -> None:
        self.near_limit_ratio = near_limit_ratio  # NEAR_LIMIT_RATIO
        # metric key -> its counts in STATS order: one dict lookup per counted descriptor and
        # list slots after, where a Counter keyed (key, stat) built a tuple per stat.
        self._rows: dict[str, list[int]] = {}

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """(metric key, stat) -> count, for every stat a key has counted (total_hits always)."""
        return {
            (key, stat): value
            for key, row in self._rows.items()
            for stat, value in zip(STATS, row, strict=True)
            if value or stat == "total_hits"
        }

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
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= _MAX_KEYS:
                return
            row = self._rows[key] = [0] * len(STATS)
        row[_TOTAL_HITS] += hits
        before = after - hits
        if from_local_cache:
            row[_OVER_LIMIT] += hits
            row[_OVER_LIMIT_WITH_LOCAL_CACHE] += hits
        elif after > limit:
            if before >= limit:
                row[_OVER_LIMIT] += hits
            else:
                row[_OVER_LIMIT] += after - limit
                row[_NEAR_LIMIT] += limit - max(math.floor(limit * self.near_limit_ratio), before)
        else:
            near = math.floor(limit * self.near_limit_ratio)
            if after > near:
                row[_NEAR_LIMIT] += hits if before >= near else after - near
            row[_WITHIN_LIMIT] += hits
        if shadow and (from_local_cache or after > limit):
            row[_SHADOW_MODE] += hits if from_local_cache or before >= limit else after - limit

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
