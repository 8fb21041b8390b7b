"""The Redis counter store: standalone, Sentinel or Cluster, one Lua call per decision.

Every decision is one EVALSHA of storage/lua/check.lua (redis-py falls back to loading the
script on NOSCRIPT). In a Cluster the keys of one script call must share a slot: a
tenant's keys share its hash tag, so a decision is one call; checks whose keys hash to
several slots (envoyproxy/ratelimit descriptors) go out as one call per slot, concurrently,
and are atomic per slot. Every Redis or network error becomes StorageUnavailable here
(redis_access.RedisFailures), calls are bounded by the configured timeout, and a circuit
breaker stops waiting on a Redis that keeps failing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from time import perf_counter
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meshtoll.counting import algorithms
from meshtoll.counting.limits import Check, CheckResult, Increment, Unused
from meshtoll.errors import ConnectionLost, StorageRefused, StorageUnavailable
from meshtoll.storage.breaker import CircuitBreaker
from meshtoll.storage.redis_access import (
    REDIS_FAILURES,
    LeanScript,
    RedisFailures,
    lean_client,
    lua_script,
    redis_py_client,
)
from meshtoll.storage.resp import encode
from meshtoll.storage.urls import RedisTarget, parse_redis_url
from meshtoll.telemetry.histogram import Histogram

_NO_ANSWER = RedisFailures("Redis did not answer")


ERROR_KINDS = ("timeout", "connection", "refused", "breaker_open", "other")
CHECK_SCRIPT = functools.partial(lua_script, "check.lua")
INCREMENT_SCRIPT = functools.partial(lua_script, "increment.lua")
RELEASE_SCRIPT = functools.partial(lua_script, "release.lua")


class RedisCounterStore:
    def __init__(self, url: str, *, timeout_ms: int = 50, breaker: CircuitBreaker | None = None) -> None:
        self.target = parse_redis_url(url)
        self.timeout = timeout_ms / 1000
        self.breaker = breaker or CircuitBreaker()
        # For /metrics: each answered call's round trip (a Cluster decision's slots together),
        # and the calls that failed, by kind (timeout, connection, refused, breaker_open, other).
        self.round_trips = Histogram()
        self.errors: Counter[str] = Counter(dict.fromkeys(ERROR_KINDS, 0))  # each kind shown from the start
        self._cluster = self.target.topology == "cluster"
        self._runner: _LeanRunner | _RedisPyRunner
        if self.target.topology == "standalone":
            self._runner = _LeanRunner(self.target, self.timeout)
        else:
            self._runner = _RedisPyRunner(self.target, self.timeout)

    # check, increment and release are not coroutines: each returns the guard's (`_guarded`),
    # the one frame between its caller and the reply's future, which decodes the reply.

    def check(self, checks: Sequence[Check], now: float) -> Coroutine[Any, Any, list[CheckResult]]:
        if not checks:
            return _nothing([])
        now_ms = int(now * 1000)
        plans = [algorithms.plan(check, now_ms) for check in checks]
        groups = _by_slot([p.keys[0] for p in plans]) if self._cluster else [list(range(len(plans)))]
        return self._guarded(self._check_calls, _check_results, (plans, groups, now_ms))

    def _check_calls(self, request: _CheckRequest) -> list[Awaitable[list[Any]]]:
        plans, groups, now_ms = request
        calls = []
        for group in groups:
            keys = [key for i in group for key in plans[i].keys]
            if self._runner.retries:
                keys.append(decision_marker(keys[0]))
            arguments = [now_ms, *(value for i in group for value in plans[i].arguments())]
            calls.append(self._runner.run(keys, arguments))
        return calls

    def increment(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> Coroutine[Any, Any, list[int]]:
        """One EVALSHA of storage/lua/increment.lua (per Cluster slot: the rule that stops
        at the limit then holds per slot). Sent without a decision marker: like
        envoyproxy/ratelimit's own pipeline, a call redis-py resends may count twice."""
        if not increments:
            return _nothing([])
        groups = _by_slot([each.key for each in increments]) if self._cluster else None
        return self._guarded(self._increment_calls, _increment_counts, (increments, groups, stop_when_over))

    def _increment_calls(self, request: _IncrementRequest) -> list[Awaitable[list[Any]]]:
        increments, groups, stop_when_over = request
        if groups is None:
            return [self._increment(increments, stop_when_over)]
        return [self._increment([increments[i] for i in group], stop_when_over) for group in groups]

    def _increment(self, increments: Sequence[Increment], stop_when_over: bool) -> Awaitable[list[Any]]:
        arguments = [int(stop_when_over)]
        for each in increments:
            arguments += (each.hits, each.limit, each.expire_seconds)
        return self._runner.increment([each.key for each in increments], arguments)

    def release(self, unused: Sequence[Unused], now: float) -> Coroutine[Any, Any, int]:
        """One EVALSHA of storage/lua/release.lua (per Cluster slot), with a marker: given
        back twice, a window's hits would free other processes' hits, an overshoot."""
        if not unused:
            return _nothing(0)
        return self._guarded(self._release_calls, _released, (unused, int(now * 1000)))

    def _release_calls(self, request: tuple[Sequence[Unused], int]) -> list[Awaitable[Any]]:
        unused, now_ms = request
        plans = [algorithms.plan(each.check, now_ms) for each in unused]
        keys = [p.keys[0] for p in plans]
        groups = _by_slot(keys) if self._cluster else [list(range(len(keys)))]
        return [
            self._runner.release(
                [*(keys[i] for i in group), decision_marker(keys[group[0]])],
                [v for i in group for v in algorithms.release_arguments(plans[i], unused[i])],
            )
            for group in groups
        ]

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout * 4):
                return await self._runner.ping()
        except REDIS_FAILURES:
            return False

    async def close(self) -> None:
        await self._runner.close()

    async def _guarded(
        self,
        calls: Callable[[_Request], list[Awaitable[Any]]],
        decode: Callable[[_Request, list[Any]], _T],
        request: _Request,
    ) -> _T:
        """`decode(request, replies)` of the calls `calls(request)` makes (a Cluster
        decision's, one per slot), made only if the circuit breaker allows, bounded in time,
        their failures counted and translated (StorageUnavailable, or what Redis refused)."""
        if not self.breaker.allows():
            self.errors["breaker_open"] += 1
            raise StorageUnavailable("Redis is failing: the circuit breaker is open")
        try:
            sent = calls(request)
            started = perf_counter()
            one = len(sent) == 1
            waiting = sent[0] if one else asyncio.gather(*sent)
            if self._runner.bounded:
                # No async context manager around the call: even a null one is two more
                # coroutines to create and run per Redis call. The lean client bounds its
                # calls itself.
                replies = await waiting
            else:
                # redis-py's socket timeouts bound each read; this bounds its whole call,
                # connection set-up and retries included.
                async with asyncio.timeout(self.timeout * 2):
                    replies = await waiting
            replies = [replies] if one else list(replies)
        except REDIS_FAILURES as exc:
            self.breaker.failed()
            self.errors[error_kind(exc)] += 1
            raise _NO_ANSWER.unavailable(exc) from None  # what Redis or the network raised stays the context
        except asyncio.CancelledError:
            # Envoy closed the connection or a gRPC deadline passed: the caller left, Redis did
            # nothing wrong. Counted as a failure, three such would open the breaker and fail
            # the next real decision.
            self.breaker.abandoned()
            raise
        except Exception as exc:
            self.breaker.failed()
            self.errors[error_kind(exc)] += 1
            raise
        self.round_trips.observe(perf_counter() - started)
        self.breaker.succeeded()
        return decode(request, replies)


_T = TypeVar("_T")
_Request = TypeVar("_Request")
_CheckRequest = tuple[list[algorithms.Plan], list[list[int]], int]  # plans, slot groups, now in ms
_IncrementRequest = tuple[Sequence[Increment], list[list[int]] | None, bool]  # groups None: one call


async def _nothing(answer: _T) -> _T:
    return answer


def _check_results(request: _CheckRequest, replies: list[Any]) -> list[CheckResult]:
    plans, groups, now_ms = request
    if len(groups) == 1 and len(plans) == 1:
        allowed, first, second, grant = replies[0]  # check.lua answers integers
        return [algorithms.result(plans[0], first, second, bool(allowed), now_ms, grant)]
    results: list[CheckResult] = [None] * len(plans)  # type: ignore[list-item]
    for group, reply in zip(groups, replies, strict=True):
        for n, i in enumerate(group):
            allowed, first, second, grant = reply[4 * n : 4 * n + 4]
            results[i] = algorithms.result(plans[i], first, second, bool(allowed), now_ms, grant)
    return results


def _increment_counts(request: _IncrementRequest, replies: list[Any]) -> list[int]:
    increments, groups, _ = request
    if groups is None:
        counts: list[int] = replies[0]  # increment.lua answers its INCRBYs' integers
        return counts
    counts = [0] * len(increments)
    for group, reply in zip(groups, replies, strict=True):
        for n, i in enumerate(group):
            counts[i] = reply[n]
    return counts


def _released(request: tuple[Sequence[Unused], int], replies: list[Any]) -> int:
    return sum(int(reply) for reply in replies)


def error_kind(exc: BaseException) -> str:
    """A failed Redis call's kind, as /metrics counts it."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, StorageRefused | ResponseError):
        return "refused"  # Redis answered with an error: a script or permission problem
    if isinstance(exc, ConnectionLost | OSError | RedisConnectionError):
        return "connection"
    return "other"


def decision_marker(first_key: str) -> str:
    """A fresh key in the same Cluster slot as `first_key`, naming one decision."""
    start = first_key.find("{")
    end = first_key.find("}", start + 1) if start != -1 else -1
    if start != -1 and end > start + 1:
        base = first_key  # its hash tag decides the slot, suffix or not
    elif "}" not in first_key:
        base = f"{{{first_key}}}"  # an untagged key hashes whole: as a tag it hashes the same
    else:
        base = f"{{{_tag_for_slot(key_slot(first_key.encode()))}}}"
    return f"{base}_decision_{secrets.token_hex(8)}"


@functools.cache
def _tag_for_slot(slot: int) -> str:
    # For the rare untagged key with a stray '}': the first short text hashing to its slot.
    return next(text for text in map(str, itertools.count()) if key_slot(text.encode()) == slot)


def _by_slot(keys: list[str]) -> list[list[int]]:
    """Indexes of `keys`, grouped by Cluster slot."""
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(index)
    return list(groups.values())


class _LeanRunner:
    """Standalone Redis through the pipelining client (storage/resp.py): the hot path."""

    # Never resends a decision that may have run (a timeout drops the connection instead),
    # so its calls need no decision marker.
    retries = False
    # Its watchdog fails a call Redis leaves unanswered for the timeout, and connecting has
    # a bound of its own (storage/resp.py): no timer per call on top (a call sent again after
    # NOSCRIPT may take up to two timeouts).
    bounded = True

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self._redis = lean_client(target, timeout)
        self._check = LeanScript(CHECK_SCRIPT(), "the decision script")
        self._increment = LeanScript(INCREMENT_SCRIPT(), "the increment script")
        self._release = LeanScript(RELEASE_SCRIPT(), "the release script")

    # Not coroutines: the reply's future, sent at once (the store calls these only once the
    # circuit breaker allows).

    def run(self, keys: list[str], arguments: list[int]) -> Awaitable[list[Any]]:
        return self._check.call(self._redis, self._check.evalsha(keys, arguments))

    def increment(self, keys: list[str], arguments: list[int]) -> Awaitable[list[Any]]:
        return self._increment.call(self._redis, self._increment.evalsha(keys, arguments))

    def release(self, keys: list[str], arguments: list[int]) -> Awaitable[Any]:
        return self._release.call(self._redis, self._release.evalsha(keys, arguments))

    async def ping(self) -> bool:
        return await self._redis.call(encode(["PING"])) == b"PONG"

    async def close(self) -> None:
        await self._redis.close()


class _RedisPyRunner:
    """Sentinel and Cluster through redis-py, which finds the master or the slot's node."""

    retries = True  # redis-py may resend after a lost reply: every call carries a marker
    bounded = False  # by its socket timeouts, read by read: the store bounds the whole call

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self._client, self._sentinels = redis_py_client(target, timeout)
        self._script = self._client.register_script(CHECK_SCRIPT())
        self._increment = self._client.register_script(INCREMENT_SCRIPT())
        self._release = self._client.register_script(RELEASE_SCRIPT())
        self._initialized = not isinstance(self._client, RedisCluster)
        self._initializing = asyncio.Lock()

    async def run(self, keys: list[str], arguments: list[int]) -> list[Any]:
        await self._initialize()
        reply: list[Any] = await self._script(keys=keys, args=arguments)
        return reply

    async def increment(self, keys: list[str], arguments: list[int]) -> list[Any]:
        await self._initialize()
        reply: list[Any] = await self._increment(keys=keys, args=arguments)
        return reply

    async def release(self, keys: list[str], arguments: list[int]) -> Any:
        await self._initialize()
        return await self._release(keys=keys, args=arguments)

    async def _initialize(self) -> None:
        if not self._initialized:
            # A burst of first calls would each start the cluster client's slot discovery,
            # which resets connections the others are using: discover once, first.
            async with self._initializing:
                if not self._initialized:
                    await self._client.initialize()
                    self._initialized = True

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()
