"""envoyproxy/ratelimit's per-limit statistics (test/redis/fixed_cache_impl_test.go
TestNearLimit, TestOverLimitWithLocalCache, the shadow-mode cases; test/config/config_test.go
TestValueToMetric_FullKeyMatchesStatsKey and TestShareThreshold's shared counters), counted
alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshtoll.envoyproxy_ratelimit.config_files import load_descriptor_configs
from meshtoll.envoyproxy_ratelimit.stats import DescriptorStats
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter
from meshtoll.ratelimit.decision import Descriptor
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.storage.memory import MemoryCounterStore
from meshtoll.telemetry.metrics import Metrics
from tests.scraped import openmetrics_families, text_families

CONFIG = Path(__file__).parent / "fixtures" / "ratelimit" / "config"

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
    metrics = Metrics()
    stats.export(metrics)
    text = metrics.prometheus_text()
    assert 'ratelimit_service_rate_limit_over_limit{domain="rl",key1="unspec_unspecified_value"} 1' in text
    assert 'ratelimit_service_rate_limit_total_hits{domain="rl",key1="unspec_unspecified_value"} 1' in text


def test_the_peer_names_are_typed_counters_in_both_formats() -> None:
    """The text format keeps the peer's names as its Go exporter writes them (the TYPE line
    naming the samples); OpenMetrics, whose counter samples always end in _total, adds it."""
    stats = DescriptorStats()
    stats.record("rl.k", 2, 3, 1)
    metrics = Metrics()
    stats.export(metrics)
    text = metrics.prometheus_text()
    assert "# TYPE ratelimit_service_rate_limit_over_limit counter" in text
    assert text_families(text)["ratelimit_service_rate_limit_over_limit"].type == "counter"
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    over = openmetrics_families(body.decode())["ratelimit_service_rate_limit_over_limit"]
    assert over.type == "counter"
    assert [sample.name for sample in over.samples] == ["ratelimit_service_rate_limit_over_limit_total"]


async def counted_requests(directory: Path, domain: str, *requests: list[tuple[str, str]]) -> DescriptorStats:
    """Each request (one descriptor) answered by the strict limiter; the statistics it kept."""
    configs = load_descriptor_configs(directory)
    stats = DescriptorStats()
    strict = StrictLimiter(Limiter(MemoryCounterStore(), clock=lambda: 1_700_000_000), stats=stats)
    for entries in requests:
        await strict.decide(configs, domain, [Descriptor(tuple(entries))], 1)
    return stats


def nested_route(flags: str) -> str:
    return f"""
domain: test-domain
descriptors:
  - key: route
    {"value_to_metric: true" if flags == "value_to_metric" else ""}
    descriptors:
      - key: http_method
        {"value_to_metric: true" if flags == "value_to_metric" else ""}
        descriptors:
          - key: subject_id
            {"detailed_metric: true" if flags == "detailed_metric" else ""}
            rate_limit: {{unit: minute, requests_per_unit: 60}}
"""


@pytest.mark.parametrize(
    ("flags", "metric"),
    [
        ("value_to_metric", "test-domain.route_api.http_method_GET.subject_id"),
        ("none", "test-domain.route.http_method.subject_id"),
        ("detailed_metric", "test-domain.route_api.http_method_GET.subject_id_user123"),
    ],
)
async def test_statistics_are_counted_under_the_limits_metric_key(
    tmp_path: Path, flags: str, metric: str
) -> None:
    """TestValueToMetric_FullKeyMatchesStatsKey: one key names the limit and its statistics."""
    (tmp_path / "routes.yaml").write_text(nested_route(flags))
    entries = [("route", "api"), ("http_method", "GET"), ("subject_id", "user123")]
    stats = await counted_requests(tmp_path, "test-domain", entries)
    match = load_descriptor_configs(tmp_path).match("test-domain", entries)
    assert match is not None
    assert match.stats_key == metric
    assert {key for key, _ in stats.counts} == {metric}


async def test_values_sharing_a_threshold_share_their_statistics(tmp_path: Path) -> None:
    """TestShareThreshold, explicit value precedence: test2, test23 and test123 count on the
    pattern's statistics, test1 on its own."""
    shutil.copy(CONFIG / "share_threshold.yaml", tmp_path)
    values = ("test2", "test23", "test123", "test1")
    stats = await counted_requests(tmp_path, "test-domain", *([("file", value)] for value in values))
    assert counted(stats, "test-domain.file_test*") == {"total_hits": 3, "within_limit": 3}
    assert counted(stats, "test-domain.file_test1") == {"total_hits": 1, "within_limit": 1}
