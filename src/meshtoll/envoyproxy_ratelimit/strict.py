"""envoyproxy/ratelimit's answers for its configuration domains, answer for answer (the
`strict` compatibility, the default).

What differs from meshtoll's own counting (ratelimit/planned.py), on purpose, because a platform
team replacing envoyproxy/ratelimit reads its test suite as the contract:
- every matched counter counts its hits, refused or not (unless counting stops at the
  limit, STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT), and a counter refuses once its count
  after the hits passes the limit, so `hits_addend: 0` never refuses at the limit;
- fixed windows of envoyproxy/ratelimit's lengths (a month is 30 days, a year 365),
  under its keys `<prefix><domain>_<key>_<value>_..._<window start>`;
- `duration_until_reset` in whole seconds to the window's end, refused or not;
- global shadow mode keeps each descriptor's code and answers OK overall; a quota-mode
  descriptor refuses the request only when every quota descriptor is over its limit;
- over-limit counters are remembered locally only when a local cache is configured, and
  then only the counter itself is answered from memory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshtoll.counting.limits import Increment, RateLimit
from meshtoll.envoyproxy_ratelimit.config_files import (
    UNLIMITED_REMAINING,
    DescriptorConfigs,
    counter_key,
    stats_key,
)
from meshtoll.envoyproxy_ratelimit.descriptor_tree import DescriptorMatch
from meshtoll.envoyproxy_ratelimit.response_extras import HeaderNames, dynamic_metadata, rate_limit_headers
from meshtoll.envoyproxy_ratelimit.stats import DescriptorStats
from meshtoll.errors import InvalidRateLimitRequest
from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.limiter import Limiter

# envoyproxy/ratelimit's window lengths (its UnitToDivider).
UNIT_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
_LOCAL_CACHE_LIMIT = 100_000
# Descriptors whose lookup is remembered: a domain's descriptors are a handful of shapes
# with values from the requests (an API key, a path), so those seen recently repeat. Past
# this many, the cache starts again (a flood of new values costs what no cache would).
_MATCH_CACHE_LIMIT = 10_000
# The longest entries remembered (keys and values together): a client may send megabytes.
_MATCH_ENTRIES_CHARACTERS = 2048


@dataclass(frozen=True, slots=True)
class StrictOptions:
    key_prefix: str = ""  # CACHE_KEY_PREFIX
    stop_when_over: bool = False  # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT
    local_cache: bool = False  # LOCAL_CACHE_SIZE_IN_BYTES > 0
    expiration_jitter_seconds: int = 0  # EXPIRATION_JITTER_MAX_SECONDS
    quota_mode: bool = False  # QUOTA_MODE: every descriptor is a quota descriptor
    headers: HeaderNames | None = None  # LIMIT_RESPONSE_HEADERS_ENABLED, with its names
    dynamic_metadata: bool = False  # RESPONSE_DYNAMIC_METADATA


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One descriptor's limit: None when nothing applies; `unlimited` when configured so."""

    key: str = ""
    limit: RateLimit | None = None
    unlimited: bool = False
    quota: bool = False
    metadata: dict[str, Any] | None = None
    stats_key: str = ""


_NOTHING = _Lookup()


class StrictLimiter:
    def __init__(
        self,
        limiter: Limiter,
        options: StrictOptions = StrictOptions(),
        jitter: random.Random | None = None,
        stats: DescriptorStats | None = None,
    ) -> None:
        self.limiter = limiter
        self.options = options
        self.stats = stats or DescriptorStats()
        self._jitter = jitter or random.Random()
        self._over_until: dict[str, float] = {}  # the local cache: window key -> window end
        # (domain, entries) -> its lookup and the limit names it replaces, for the
        # configuration `_matched_for` (a new one starts an empty cache): matching walks the
        # tree and builds keys, the second most costly step of a call after the Redis one.
        self._matched: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[_Lookup, frozenset[str]]] = {}
        self._matched_for: DescriptorConfigs | None = None

    @property
    def remembered_matches(self) -> int:
        return len(self._matched)

    async def decide(
        self,
        configs: DescriptorConfigs | None,
        domain: str,
        descriptors: Sequence[Descriptor],
        hits_addend: int,
    ) -> RateLimitDecision:
        """Raises InvalidRateLimitRequest as envoyproxy/ratelimit answers with an error, and
        StorageUnavailable under the "closed" failure policy."""
        if domain == "":
            raise InvalidRateLimitRequest("rate limit domain must not be empty")
        if not descriptors:
            raise InvalidRateLimitRequest("rate limit descriptor list must not be empty")
        if configs is not self._matched_for:
            self._matched, self._matched_for = {}, configs
        lookups = _lookups(configs, domain, descriptors, self._matched)
        now = self.limiter.now()
        request_hits = hits_addend or 1  # proto3: unset (0) means 1
        hits = [request_hits if d.hits_addend is None else d.hits_addend for d in descriptors]
        options = self.options
        windows, increments, cached = self._increments(lookups, hits, now)
        # Awaited here, not in a coroutine of its own: one frame less to resume on the reply.
        counts = await self.limiter.counts(increments, now, stop_when_over=options.stop_when_over)
        statuses = self._statuses(lookups, hits, now, windows, increments, counts, cached)
        # None: an unlimited descriptor, which is neither a quota nor a rate limit.
        quota = [None if each.unlimited else options.quota_mode or each.quota for each in lookups]
        # Global shadow mode: every descriptor's own code stays as it is, the answer is OK.
        over = False if self.limiter.shadow else _overall(quota, statuses)
        return RateLimitDecision(
            over,
            tuple(statuses),
            ()
            if options.headers is None
            else rate_limit_headers(options.headers, statuses, [q is True for q in quota]),
            dynamic_metadata(domain, descriptors, hits_addend, _passed_metadata(lookups, statuses))
            if options.dynamic_metadata
            else None,
        )

    def _increments(
        self, lookups: list[_Lookup], hits: list[int], now: float
    ) -> tuple[list[str], list[Increment], set[int]]:
        """Each descriptor's window key ("" without a limit), the counters to increment, and
        the descriptors the local cache answers. Built for the common call (a descriptor or
        two, no local cache): plain lists, the local cache asked only when it holds a counter."""
        options = self.options
        whole_seconds = int(now)
        windows: list[str] = []  # by descriptor, "" for one without a limit
        increments: list[Increment] = []
        cached: set[int] = set()
        for index, lookup in enumerate(lookups):
            limit = lookup.limit
            if limit is None:
                windows.append("")
                continue
            seconds = UNIT_SECONDS[limit.period]
            key = f"{options.key_prefix}{lookup.key}_{whole_seconds // seconds * seconds}"
            windows.append(key)
            if self._over_until and self._remembered_over(key, now):
                cached.add(index)
                continue
            increments.append(Increment(key, hits[index], limit.requests, self._expiry(seconds)))
        if cached and options.stop_when_over:
            # A counter the local cache holds over its limit stops every other from growing.
            increments = [Increment(each.key, 0, each.limit, each.expire_seconds) for each in increments]
        return windows, increments, cached

    def _statuses(
        self,
        lookups: list[_Lookup],
        hits: list[int],
        now: float,
        windows: list[str],
        increments: list[Increment],
        counts: list[int] | None,
        cached: set[int],
    ) -> list[DescriptorStatus]:
        """`counts`: each increment's count after it; None when the store is down and the
        failure policy is "open"."""
        # A key counted twice in one call answers both descriptors with its last count.
        by_key = (
            {}
            if counts is None
            else {each.key: count for each, count in zip(increments, counts, strict=True)}
        )
        whole_seconds = int(now)
        statuses = []
        record = self.stats.record
        for index, lookup in enumerate(lookups):
            limit = lookup.limit
            if limit is None:
                statuses.append(_UNLIMITED if lookup.unlimited else _NO_LIMIT)
                continue
            seconds = UNIT_SECONDS[limit.period]
            reset = seconds - whole_seconds % seconds  # whole seconds to the window's end
            key = windows[index]
            from_cache = index in cached if cached else False
            if from_cache:
                over = True
            elif counts is None:  # the store is down and the failure policy is "open"
                statuses.append(_NO_LIMIT)
                continue
            else:
                over = by_key[key] > limit.requests
            record(
                lookup.stats_key,
                limit.requests,
                by_key.get(key, 0),
                hits[index],
                from_local_cache=from_cache,
                shadow=limit.shadow,
            )
            if over:
                self._remember_over(key, reset, now)
                # A shadow limit reports its refusal as OK, remaining 0.
                statuses.append(DescriptorStatus(not limit.shadow, limit, 0, reset))
            else:
                statuses.append(DescriptorStatus(False, limit, limit.requests - by_key[key], reset))
        return statuses

    def _expiry(self, seconds: int) -> int:
        jitter = self.options.expiration_jitter_seconds
        # random() * jitter, not randrange(jitter): one call into C instead of three in Python,
        # the same uniform choice of 0 .. jitter - 1 seconds.
        return seconds + int(self._jitter.random() * jitter) if jitter > 0 else seconds

    def _remembered_over(self, key: str, now: float) -> bool:
        until = self._over_until.get(key)
        return until is not None and until > now

    def _remember_over(self, key: str, reset: int, now: float) -> None:
        if not self.options.local_cache:
            return
        if len(self._over_until) >= _LOCAL_CACHE_LIMIT:
            self._over_until = {k: t for k, t in self._over_until.items() if t > now}
        # Until the window ends: the next window has another key anyway.
        self._over_until[key] = now + reset


_NO_LIMIT = DescriptorStatus(False, None, 0, 0)
_UNLIMITED = DescriptorStatus(False, None, UNLIMITED_REMAINING, 0)


def _lookups(
    configs: DescriptorConfigs | None,
    domain: str,
    descriptors: Sequence[Descriptor],
    matched: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[_Lookup, frozenset[str]]],
) -> list[_Lookup]:
    """Each descriptor's limit, as envoyproxy/ratelimit's GetLimit and its `replaces`;
    `matched` remembers the lookups of `configs`."""
    if configs is None or domain not in configs.domains:
        return [_NOTHING] * len(descriptors)  # an unknown domain: no limit, overrides too
    lookups = []
    replaced: set[str] = set()
    for descriptor in descriptors:
        if descriptor.override is not None:
            # Envoy's own limit wins; it has no name and no shadow mode.
            entries = descriptor.entries
            lookups.append(
                _Lookup(
                    counter_key(domain, entries), descriptor.override, stats_key=stats_key(domain, entries)
                )
            )
            continue
        key = domain, descriptor.entries
        found = matched.get(key)
        if found is None:
            match = configs.match(domain, descriptor.entries)
            found = (_NOTHING, frozenset()) if match is None else (_from_match(match), match.replaces)
            if sum(len(name) + len(value) for name, value in descriptor.entries) <= _MATCH_ENTRIES_CHARACTERS:
                if len(matched) >= _MATCH_CACHE_LIMIT:
                    matched.clear()
                matched[key] = found
        lookup, replaces = found
        if replaces:
            replaced |= replaces
        lookups.append(lookup)
    if not replaced:
        return lookups
    return [
        _NOTHING
        if lookup.limit is not None and lookup.limit.name in replaced and lookup.limit.name
        else lookup
        for lookup in lookups
    ]


def _from_match(match: DescriptorMatch) -> _Lookup:
    if match.limit is None:
        return _Lookup(match.key, None, unlimited=True)
    return _Lookup(
        match.key, match.limit, quota=match.quota, metadata=match.metadata, stats_key=match.stats_key
    )


def _overall(quota: Sequence[bool | None], statuses: Sequence[DescriptorStatus]) -> bool:
    """OVER_LIMIT when a rate-limit descriptor is over, or every quota descriptor is."""
    quotas = quotas_over = 0
    for is_quota, status in zip(quota, statuses, strict=True):
        if is_quota is None:
            continue
        if is_quota:
            quotas += 1
            quotas_over += status.over_limit
        elif status.over_limit:
            return True
    return quotas > 0 and quotas_over == quotas


def _passed_metadata(
    lookups: Sequence[_Lookup], statuses: Sequence[DescriptorStatus]
) -> list[dict[str, Any]]:
    return [
        lookup.metadata
        for lookup, status in zip(lookups, statuses, strict=True)
        if lookup.metadata is not None and not lookup.unlimited and not status.over_limit
    ]
