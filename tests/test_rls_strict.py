"""envoyproxy/ratelimit's answers in strict compatibility, as plain values: the cases of its
test/service/ratelimit_test.go, test/redis/fixed_cache_impl_test.go and
test/limiter/base_limiter_test.go, rewritten for meshtoll (the clock is set, never slept on).
The configuration files are envoyproxy/ratelimit's own (tests/fixtures/ratelimit, see NOTICE.md)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshtoll.counting.limits import Increment, RateLimit
from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigs, load_descriptor_configs
from meshtoll.envoyproxy_ratelimit.domains import ConfiguredDomains
from meshtoll.envoyproxy_ratelimit.response_extras import HeaderNames
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter, StrictOptions
from meshtoll.errors import InvalidRateLimitRequest
from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.storage.memory import MemoryCounterStore

FIXTURES = Path(__file__).parent / "fixtures" / "ratelimit"
# 1234 s past a day's start: 26 s left in the minute, 2366 s in the hour.
NOW = 1_700_006_400 + 1234


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def configs_of(tmp_path: Path, *files: str) -> DescriptorConfigs:
    for name in files:
        shutil.copy(FIXTURES / name, tmp_path / Path(name).name)
    return load_descriptor_configs(tmp_path)


def service(
    store: MemoryCounterStore | None = None,
    *,
    shadow: bool = False,
    clock: Clock | None = None,
    **options: object,
) -> StrictLimiter:
    limiter = Limiter(
        store or MemoryCounterStore(), shadow=shadow, clock=clock or Clock(), failure_mode="closed"
    )
    return StrictLimiter(limiter, StrictOptions(**options))  # type: ignore[arg-type]


def d(*entries: tuple[str, str], hits: int | None = None, override: RateLimit | None = None) -> Descriptor:
    return Descriptor(tuple(entries), override, hits)


async def ask(
    strict: StrictLimiter,
    configs: DescriptorConfigs,
    domain: str,
    descriptors: Sequence[Descriptor],
    hits: int = 1,
) -> RateLimitDecision:
    return await strict.decide(configs, domain, descriptors, hits)


def view(status: DescriptorStatus) -> tuple[bool, int | None, int, int]:
    return (
        status.over_limit,
        None if status.limit is None else status.limit.requests,
        status.remaining,
        int(status.reset_seconds),
    )


async def stored(store: MemoryCounterStore, key: str) -> int:
    # Adding 0 hits reads a counter.
    [value] = await store.increment([Increment(key, 0, 0, 60)], NOW)
    return value


@pytest.fixture
def another(tmp_path: Path) -> DescriptorConfigs:
    return configs_of(tmp_path, "integration/config/another.yaml", "integration/config/basic.yaml")


async def test_one_descriptor_over_limit_leaves_the_others_counting_and_reporting(
    another: DescriptorConfigs,
) -> None:
    # integration_test.go: key2 (20/minute) and key3 (10/hour) together, 15 times.
    strict = service()
    answers = [await ask(strict, another, "another", [d(("key2", "7")), d(("key3", "7"))]) for _ in range(15)]
    assert [a.over_limit for a in answers] == [False] * 10 + [True] * 5
    assert [a.statuses[0].remaining for a in answers] == [20 - n for n in range(1, 16)]
    assert [a.statuses[0].over_limit for a in answers] == [False] * 15
    assert [a.statuses[1].remaining for a in answers] == [10 - n for n in range(1, 11)] + [0] * 5
    assert {int(a.statuses[0].reset_seconds) for a in answers} == {26}
    assert {int(a.statuses[1].reset_seconds) for a in answers} == {3600 - 1234}


async def test_stop_increment_when_over_limit_keeps_the_other_counter_unchanged(
    another: DescriptorConfigs,
) -> None:
    strict = service(stop_when_over=True)
    answers = [await ask(strict, another, "another", [d(("key2", "8")), d(("key3", "8"))]) for _ in range(15)]
    assert [a.statuses[0].remaining for a in answers] == [20 - n for n in range(1, 11)] + [10] * 5


async def test_a_counter_refuses_only_once_its_count_passes_the_limit(another: DescriptorConfigs) -> None:
    strict = service()
    answers = [await ask(strict, another, "another", [d(("key2", "9"))]) for _ in range(25)]
    assert [a.over_limit for a in answers] == [False] * 20 + [True] * 5
    assert [view(a.statuses[0]) for a in answers[19:21]] == [(False, 20, 0, 26), (True, 20, 0, 26)]


async def test_hits_addend_zero_at_the_limit_only_looks_and_is_ok(another: DescriptorConfigs) -> None:
    # token-quota.sh: a look with 0 hits at count == limit is not a refusal.
    strict = service()
    await ask(strict, another, "another", [d(("key3", "z"))], hits=10)
    looked = await ask(strict, another, "another", [d(("key3", "z"), hits=0)])
    assert view(looked.statuses[0])[:3] == (False, 10, 0)
    assert (await ask(strict, another, "another", [d(("key3", "z"))])).over_limit


async def test_duration_until_reset_is_whole_seconds_to_the_window_end(another: DescriptorConfigs) -> None:
    clock = Clock(NOW + 0.927)
    strict = service(clock=clock)
    answer = await ask(strict, another, "another", [d(("key4", "durTest"))])
    assert answer.statuses[0].reset_seconds == 86400 - 1234
    clock.now += 2
    later = await ask(strict, another, "another", [d(("key4", "durTest"))])
    assert later.statuses[0].reset_seconds == 86400 - 1236


async def test_an_override_on_an_unknown_domain_applies_no_limit(another: DescriptorConfigs) -> None:
    strict = service()
    answer = await ask(strict, another, "nowhere", [d(("a", "b"), override=RateLimit(0, "day"))])
    assert (answer.over_limit, view(answer.statuses[0])) == (False, (False, None, 0, 0))


async def test_an_override_replaces_the_configured_limit_and_has_no_name(another: DescriptorConfigs) -> None:
    strict = service()
    answers = [
        await ask(strict, another, "another", [d(("key2", "o"), override=RateLimit(1, "hour"))])
        for _ in range(2)
    ]
    assert [a.over_limit for a in answers] == [False, True]
    assert answers[0].statuses[0].limit == RateLimit(1, "hour")


@pytest.mark.parametrize(
    ("domain", "descriptors", "message"),
    [
        ("", [d(("key2", "x"))], "rate limit domain must not be empty"),
        ("another", [], "rate limit descriptor list must not be empty"),
    ],
)
async def test_an_empty_domain_or_no_descriptors_is_an_error(
    another: DescriptorConfigs, domain: str, descriptors: list[Descriptor], message: str
) -> None:
    with pytest.raises(InvalidRateLimitRequest, match=message):
        await ask(service(), another, domain, descriptors)


async def test_global_shadow_mode_keeps_each_descriptors_code_and_answers_ok(
    another: DescriptorConfigs,
) -> None:
    # ratelimit_test.go TestServiceGlobalShadowMode
    strict = service(shadow=True)
    for _ in range(10):
        await ask(strict, another, "another", [d(("key3", "s"))])
    answer = await ask(strict, another, "another", [d(("key2", "s")), d(("key3", "s"))])
    assert answer.over_limit is False
    assert [s.over_limit for s in answer.statuses] == [False, True]


async def test_unknown_descriptors_and_unlimited_ones_count_nothing(another: DescriptorConfigs) -> None:
    strict = service()
    answer = await ask(strict, another, "another", [d(("hello", "world"))])
    assert view(answer.statuses[0]) == (False, None, 0, 0)


async def test_long_entries_are_matched_and_counted_each_time_but_not_remembered(
    another: DescriptorConfigs,
) -> None:
    strict = service()
    long = d(("key2", "v" * 4096))
    answers = [await ask(strict, another, "another", [long]) for _ in range(2)]
    assert [view(a.statuses[0])[1:3] for a in answers] == [(20, 19), (20, 18)]
    assert strict.remembered_matches == 0
    await ask(strict, another, "another", [d(("key2", "short"))])
    assert strict.remembered_matches == 1


async def test_the_local_cache_answers_an_over_limit_counter_without_counting(
    another: DescriptorConfigs,
) -> None:
    store = MemoryCounterStore()
    strict = service(store, local_cache=True)
    for _ in range(11):
        await ask(strict, another, "another", [d(("key3_local", "c"))])
    answer = await ask(strict, another, "another", [d(("key2_local", "c")), d(("key3_local", "c"))])
    assert [view(s)[:3] for s in answer.statuses] == [(False, 20, 19), (True, 10, 0)]
    hour = NOW // 3600 * 3600
    assert await stored(store, f"another_key3_local_c_{hour}") == 11


async def test_counters_use_the_peer_key_with_prefix_and_30_day_months(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "domain: m\ndescriptors:\n  - key: k\n    rate_limit: {unit: month, requests_per_unit: 2}\n"
    )
    store = MemoryCounterStore()
    strict = service(store, key_prefix="prefix:")
    await ask(strict, load_descriptor_configs(tmp_path), "m", [d(("k", "v"))])
    month = 30 * 86400
    start = NOW // month * month
    assert await stored(store, f"prefix:m_k_v_{start}") == 1


async def test_rate_limit_headers_describe_the_refusing_descriptor(another: DescriptorConfigs) -> None:
    # ratelimit_test.go TestServiceWithDefaultRatelimitHeaders
    strict = service(headers=HeaderNames())
    for _ in range(20):
        await ask(strict, another, "another", [d(("key2", "h"))])
    answer = await ask(strict, another, "another", [d(("key2", "h")), d(("hello", "world"))])
    assert answer.headers == (
        ("RateLimit-Limit", "20"),
        ("RateLimit-Remaining", "0"),
        ("RateLimit-Reset", "26"),
    )


async def test_rate_limit_headers_describe_the_descriptor_closest_to_its_limit(
    another: DescriptorConfigs,
) -> None:
    strict = service(headers=HeaderNames("X-Limit", "X-Left", "X-Reset"))
    answer = await ask(strict, another, "another", [d(("key2", "c")), d(("key3", "c"))])
    assert answer.headers == (("X-Limit", "10"), ("X-Left", "9"), ("X-Reset", str(3600 - 1234)))
    assert (await ask(strict, another, "another", [d(("hello", "world"))])).headers == ()


async def test_global_quota_mode_refuses_only_when_every_descriptor_is_over(
    another: DescriptorConfigs,
) -> None:
    # ratelimit_test.go TestServiceGlobalQuotaMode, TestServiceQuotaModeOnlySomeOverTheLimit
    strict = service(quota_mode=True)
    for _ in range(10):
        await ask(strict, another, "another", [d(("key3", "q"))])
    some = await ask(strict, another, "another", [d(("key2", "q")), d(("key3", "q"))])
    assert (some.over_limit, [s.over_limit for s in some.statuses]) == (False, [False, True])
    for _ in range(20):
        await ask(strict, another, "another", [d(("key2", "q"))])
    every = await ask(strict, another, "another", [d(("key2", "q")), d(("key3", "q"))])
    assert (every.over_limit, [s.over_limit for s in every.statuses]) == (True, [True, True])


async def test_dynamic_metadata_describes_the_request(another: DescriptorConfigs) -> None:
    strict = service(dynamic_metadata=True)
    answer = await ask(
        strict,
        another,
        "another",
        [d(("key2", "m"), ("sub", "x"), hits=3), d(("key3", "m"), override=RateLimit(4, "hour"))],
        hits=2,
    )
    assert answer.dynamic_metadata == {
        "domain": "another",
        "descriptors": [
            {"entries": ["key2=m", "sub=x"], "hitsAddend": 3.0},
            {"entries": ["key3=m"], "limit": "requests_per_unit:4 unit:HOUR"},
        ],
        "hitsAddend": 2.0,
    }
    assert (await ask(service(), another, "another", [d(("key2", "m"))])).dynamic_metadata is None


async def test_meshtoll_compatibility_keeps_a_refused_request_from_consuming(
    another: DescriptorConfigs,
) -> None:
    limiter = Limiter(MemoryCounterStore(), clock=Clock(), failure_mode="closed")
    meshtoll = ConfiguredDomains(lambda: another, StrictLimiter(limiter), compat="meshtoll")
    answers = [await meshtoll.decide("another", [d(("key2", "m")), d(("key3", "m"))], 1) for _ in range(12)]
    assert [a.over_limit for a in answers] == [False] * 10 + [True] * 2
    assert answers[9].statuses[0].remaining == 10  # key2 counted only the 10 admitted requests


MODES = """
domain: svc
descriptors:
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota_a
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {service: {name: a}, tier: gold}
  - key: quota_b
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {service: {name: b, zone: z1}}
  - key: roomy
    rate_limit: {unit: minute, requests_per_unit: 100}
    metadata: {tier: silver}
"""


@pytest.fixture
def modes(tmp_path: Path) -> DescriptorConfigs:
    (tmp_path / "modes.yaml").write_text(MODES)
    return load_descriptor_configs(tmp_path)


async def spent(strict: StrictLimiter, modes: DescriptorConfigs, *keys: str) -> None:
    """Each limit of `keys` at 1 of 1: the next request is over it."""
    for key in keys:
        await ask(strict, modes, "svc", [d((key, "x"))])


@pytest.mark.parametrize(
    ("keys", "spend", "over", "codes"),
    [
        (["shadow"], ["shadow"], False, [False]),  # TestRuleShadowMode
        (["shadow", "plain"], ["shadow", "plain"], True, [False, True]),  # TestMixedRuleShadowMode
        (["plain", "quota_a"], ["plain"], True, [True, False]),  # TestServicePerDescriptorQuotaMode
        (["roomy", "quota_a"], ["quota_a"], True, [False, True]),  # TestServiceMixedPerDescriptorModes
        (["roomy", "quota_a"], [], False, [False, False]),  # ...ModesUnderLimit
        (
            ["quota_a", "quota_b"],
            ["quota_a", "quota_b"],
            True,
            [True, True],
        ),  # ...QuotaModeOnlyAllOverTheLimit
        (["quota_a", "quota_b"], ["quota_a"], False, [True, False]),  # ...QuotaModeOnlySomeOverTheLimit
    ],
)
async def test_shadow_and_quota_descriptors_decide_the_answer_as_the_peer_does(
    modes: DescriptorConfigs, keys: list[str], spend: list[str], over: bool, codes: list[bool]
) -> None:
    strict = service()
    await spent(strict, modes, *spend)
    answer = await ask(strict, modes, "svc", [d((key, "x")) for key in keys])
    assert (answer.over_limit, [s.over_limit for s in answer.statuses]) == (over, codes)


async def test_global_shadow_mode_answers_ok_over_quota_and_rate_limits(modes: DescriptorConfigs) -> None:
    # TestServiceQuotaModeWithShadowMode, TestServiceMixedModeWithShadowMode
    strict = service(shadow=True)
    await spent(strict, modes, "plain", "quota_a", "quota_b")
    answer = await ask(strict, modes, "svc", [d(("plain", "x")), d(("quota_a", "x")), d(("quota_b", "x"))])
    assert (answer.over_limit, [s.over_limit for s in answer.statuses]) == (False, [True, True, True])


async def test_metadata_of_the_passing_descriptors_is_merged_first_value_first(
    modes: DescriptorConfigs,
) -> None:
    # TestMetadataReturnedForPassedDescriptors, ...ForAllPassedDescriptors,
    # TestOverlappingMetadataReturnsTheFirstValue
    strict = service(dynamic_metadata=True)
    answer = await ask(strict, modes, "svc", [d(("quota_a", "x")), d(("quota_b", "x")), d(("roomy", "x"))])
    assert answer.dynamic_metadata is not None
    assert answer.dynamic_metadata["metadata"] == {"service": {"name": "a", "zone": "z1"}, "tier": "gold"}
    later = await ask(strict, modes, "svc", [d(("quota_a", "x")), d(("roomy", "x"))])
    assert later.dynamic_metadata is not None
    assert later.dynamic_metadata["metadata"] == {
        "tier": "silver"
    }  # quota_a is over: its metadata is left out


async def test_an_unlimited_descriptor_reports_max_remaining_and_counts_nothing(tmp_path: Path) -> None:
    # TestUnlimited
    (tmp_path / "u.yaml").write_text(
        "domain: u\ndescriptors:\n  - key: free\n    rate_limit: {unlimited: true}\n"
        "  - key: paid\n    rate_limit: {unit: minute, requests_per_unit: 1}\n"
    )
    strict = service()
    answer = await ask(strict, load_descriptor_configs(tmp_path), "u", [d(("free", "x")), d(("paid", "x"))])
    assert [view(s) for s in answer.statuses] == [(False, None, 2**32 - 1, 0), (False, 1, 0, 26)]


async def test_a_reloaded_configuration_answers_with_its_own_limits_for_descriptors_seen_before(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for directory, requests in ((first, 5), (second, 1)):
        directory.mkdir()
        (directory / "r.yaml").write_text(
            f"domain: r\ndescriptors:\n  - key: api_key\n    rate_limit: {{unit: minute, requests_per_unit: {requests}}}\n"
        )
    strict = service()
    before = await ask(strict, load_descriptor_configs(first), "r", [d(("api_key", "k1"))])
    after = await ask(strict, load_descriptor_configs(second), "r", [d(("api_key", "k1"))])
    assert [view(answer.statuses[0]) for answer in (before, after)] == [(False, 5, 4, 26), (True, 1, 0, 26)]


async def test_many_distinct_descriptor_values_keep_their_own_counters(tmp_path: Path) -> None:
    # More values than the lookups remembered: each still counts under its own key.
    (tmp_path / "r.yaml").write_text(
        "domain: r\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 1}\n"
    )
    configs, store = load_descriptor_configs(tmp_path), MemoryCounterStore()
    strict = service(store)
    values = [f"k{n}" for n in range(10_050)]
    for value in values:
        assert not (await ask(strict, configs, "r", [d(("api_key", value))])).over_limit
    assert (await ask(strict, configs, "r", [d(("api_key", "k0"))])).over_limit
    assert (await ask(strict, configs, "r", [d(("api_key", "k10049"))])).over_limit
