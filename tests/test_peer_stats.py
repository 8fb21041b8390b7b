"""envoyproxy/ratelimit's per-limit statistics (test/redis/fixed_cache_impl_test.go
TestNearLimit, TestOverLimitWithLocalCache, the shadow-mode cases), counted alike."""

from __future__ import annotations

import pytest

from meshtoll.ratelimit.peer_stats import DescriptorStats

Expected = dict[str, int]


def counted(stats: DescriptorStats, key: str) -> Expected:
    return {stat: value for (k, stat), value in stats.counts.items() if k == key and value}


@pytest.mark.parametrize(
    ("limit", "hits", "afters", "expected"),
    [
        # key4: under, at and past the near-limit ratio, then over
        (15, 1, [11], {"total_hits": 1, "within_limit": 1}),
        (15, 1, [11, 13], {"total_hits": 2, "near_limit": 1, "within_limit": 2}),
        (15, 1, [11, 13, 16], {"total_hits": 3, "near_limit": 1, "within_limit": 2, "over_limit": 1}),
        # key5..key8: several hits at once
        (20, 3, [5], {"total_hits": 3, "within_limit": 3}),
        (8, 2, [7], {"total_hits": 2, "near_limit": 1, "within_limit": 2}),
        (20, 3, [19], {"total_hits": 3, "near_limit": 3, "within_limit": 3}),
        (20, 3, [22], {"total_hits": 3, "over_limit": 2, "near_limit": 1}),
    ],
)
def test_near_limit_and_over_limit_count_the_hits_past_each_threshold(
    limit: int, hits: int, afters: list[int], expected: Expected
) -> None:
    stats = DescriptorStats(0.8)
    for after in afters:
        stats.record("domain.key", limit, after, hits)
    assert counted(stats, "domain.key") == expected


def test_the_local_cache_and_shadow_mode_are_counted_apart() -> None:
    stats = DescriptorStats()
    stats.record("d.k", 10, 0, 1, from_local_cache=True, shadow=True)
    stats.record("d.k", 10, 12, 2, shadow=True)
    assert counted(stats, "d.k") == {
        "total_hits": 3,
        "over_limit": 3,
        "over_limit_with_local_cache": 1,
        "shadow_mode": 3,
    }


def test_prometheus_text_names_the_domain_and_each_key_level() -> None:
    stats = DescriptorStats()
    stats.record("rl.unspec_unspecified_value", 2, 3, 1)
    text = stats.prometheus_text()
    assert 'ratelimit_service_rate_limit_over_limit{domain="rl",key1="unspec_unspecified_value"} 1' in text
    assert 'ratelimit_service_rate_limit_total_hits{domain="rl",key1="unspec_unspecified_value"} 1' in text
