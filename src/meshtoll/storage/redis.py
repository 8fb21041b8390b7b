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
from collections.abc import Awaitable, Coroutine, Sequence
from time import perf_counter
from typing import Any

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

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        if not checks:
            return []
        now_ms = int(now * 1000)
        plans = [algorithms.plan(check, now_ms) for check in checks]
        groups = _by_slot([p.keys[0] for p in plans]) if self._cluster else [list(range(len(plans)))]
        replies = await self._guarded(*(self._run(plans, group, now_ms) for group in groups))
        results: list[CheckResult] = [None] * len(plans)  # type: ignore[list-item]
        for group, reply in zip(groups, replies, strict=True):
            for n, i in enumerate(group):
                allowed, first, second, grant = (int(value) for value in reply[4 * n : 4 * n + 4])
                results[i] = algorithms.result(plans[i], first, second, bool(allowed), now_ms, grant)
        return results

    async def increment(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> list[int]:
        """One EVALSHA of storage/lua/increment.lua (per Cluster slot: the rule that stops
        at the limit then holds per slot). Sent without a decision marker: like
        envoyproxy/ratelimit's own pipeline, a call redis-py resends may count twice."""
        if not increments:
            return []
        if not self._cluster:
            (reply,) = await self._guarded(self._increment(increments, stop_when_over))
            return [int(count) for count in reply]
        groups = _by_slot([each.key for each in increments])
        calls = (self._increment([increments[i] for i in group], stop_when_over) for group in groups)
        replies = await self._guarded(*calls)
        counts = [0] * len(increments)
        for group, reply in zip(groups, replies, strict=True):
            for n, i in enumerate(group):
                counts[i] = int(reply[n])
        return counts

    def _increment(self, increments: Sequence[Increment], stop_when_over: bool) -> Awaitable[list[Any]]:
        arguments = [int(stop_when_over)]
        for each in increments:
            arguments += (each.hits, each.limit, each.expire_seconds)
        return self._runner.increment([each.key for each in increments], arguments)

    async def release(self, unused: Sequence[Unused], now: float) -> int:
        """One EVALSHA of storage/lua/release.lua (per Cluster slot), with a marker: given
        back twice, a window's hits would free other processes' hits, an overshoot."""
        if not unused:
            return 0
        now_ms = int(now * 1000)
        plans = [algorithms.plan(each.check, now_ms) for each in unused]
        keys = [p.keys[0] for p in plans]
        groups = _by_slot(keys) if self._cluster else [list(range(len(keys)))]
        calls = (
            self._runner.release(
                [*(keys[i] for i in group), decision_marker(keys[group[0]])],
                [v for i in group for v in algorithms.release_arguments(plans[i], unused[i])],
            )
            for group in groups
        )
        return sum(int(reply) for reply in await self._guarded(*calls))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout * 4):
                return await self._runner.ping()
        except REDIS_FAILURES:
            return False

    async def close(self) -> None:
        await self._runner.close()

    def _run(self, plans: list[algorithms.Plan], group: list[int], now_ms: int) -> Awaitable[list[Any]]:
        keys = [key for i in group for key in plans[i].keys]
        if self._runner.retries:
            keys.append(decision_marker(keys[0]))
        arguments = [now_ms, *(value for i in group for value in plans[i].arguments())]
        return self._runner.run(keys, arguments)

    async def _guarded(self, *calls: Any) -> list[Any]:
        if not self.breaker.allows():
            for call in calls:
                call.close()
            self.errors["breaker_open"] += 1
            raise StorageUnavailable("Redis is failing: the circuit breaker is open")
        started = perf_counter()
        try:
            # redis-py's socket timeouts bound each read; this bounds its whole call, connection
            # set-up and retries included. The lean client bounds its calls itself.
            one = len(calls) == 1
            waiting = calls[0] if one else asyncio.gather(*calls)
            with _NO_ANSWER:
                if self._runner.bounded:
                    # No async context manager around the call: even a null one is two more
                    # coroutines to create and run per Redis call.
                    replies = await waiting
                else:
                    async with asyncio.timeout(self.timeout * 2):
                        replies = await waiting
            if one:
                replies = [replies]
        except StorageUnavailable as exc:
            self.breaker.failed()
            # RedisFailures keeps what Redis or the network raised as the context.
            self.errors[error_kind(exc.__context__ or exc)] += 1
            raise
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
        return list(replies)


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
    # a bound of its own (storage/resp.py): no timer per call on top (a NOSCRIPT reload, three
    # calls, may take up to three timeouts).
    bounded = True

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self._redis = lean_client(target, timeout)
        self._check = LeanScript(CHECK_SCRIPT(), "the decision script")
        self._increment = LeanScript(INCREMENT_SCRIPT(), "the increment script")
        self._release = LeanScript(RELEASE_SCRIPT(), "the release script")

    def run(self, keys: list[str], arguments: list[int]) -> Coroutine[Any, Any, list[Any]]:
        return self._call(self._check, keys, arguments)

    def increment(self, keys: list[str], arguments: list[int]) -> Coroutine[Any, Any, list[Any]]:
        return self._call(self._increment, keys, arguments)

    def release(self, keys: list[str], arguments: list[int]) -> Coroutine[Any, Any, Any]:
        return self._call(self._release, keys, arguments)

    def _call(self, script: LeanScript, keys: list[str], arguments: list[int]) -> Coroutine[Any, Any, Any]:
        # The script's own call, not a coroutine around it: one layer less per decision.
        return script.call(self._redis, script.evalsha(keys, arguments))

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
