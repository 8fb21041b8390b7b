"""The in-memory counter store: one process, no Redis (the local stack without redis-server,
and the reference the Redis store is tested against). Atomic because the event loop runs
one `check` at a time and `check` never awaits in between."""

from __future__ import annotations

from collections.abc import Sequence

from meshtoll.counting import algorithms
from meshtoll.counting.limits import Check, CheckResult, Increment, Unused

_PURGE_EVERY = 10_000  # writes between sweeps of expired counters


class MemoryCounterStore:
    def __init__(self) -> None:
        self._values: dict[str, tuple[int, int]] = {}  # key -> (value, expires at, ms)
        self._writes = 0

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        now_ms = int(now * 1000)
        plans = [algorithms.plan(check, now_ms) for check in checks]
        stored = [(self._get(p.keys[0], now_ms), self._get(p.keys[1], now_ms)) for p in plans]
        verdicts = [
            algorithms.admits(p, first, second, now_ms)
            for p, (first, second) in zip(plans, stored, strict=True)
        ]
        admitted = all(ok or p.shadow for p, ok in zip(plans, verdicts, strict=True))
        results = []
        for p, (first, second), ok in zip(plans, stored, verdicts, strict=True):
            grant = algorithms.lease_grant(p, first, second, now_ms) if admitted else 0
            if admitted and p.cost > 0:
                first = algorithms.consumed(p, first, now_ms, grant)
                self._set(p.keys[0], first, now_ms + p.expire_ms, now_ms)
            results.append(algorithms.result(p, first, second, ok, now_ms, grant))
        return results

    async def increment(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> list[int]:
        now_ms = int(now * 1000)
        current = [self._get(each.key, now_ms) for each in increments]
        hits = algorithms.hits_to_add(current, increments, stop_when_over)
        counts = []
        for each, value, add in zip(increments, current, hits, strict=True):
            self._set(each.key, value + add, now_ms + each.expire_seconds * 1000, now_ms)
            counts.append(value + add)
        return counts

    async def release(self, unused: Sequence[Unused], now: float) -> int:
        now_ms = int(now * 1000)
        given = 0
        for each in unused:
            p = algorithms.plan(each.check, now_ms)
            found = self._values.get(p.keys[0])
            value = self._get(p.keys[0], now_ms)
            after = algorithms.after_release(p, value, each)
            if found is not None and after is not None:
                self._values[p.keys[0]] = (after, found[1])
                given += each.hits if p.algorithm == algorithms.BUCKET else value - after
        return given

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._values.clear()

    def _get(self, key: str, now_ms: int) -> int:
        found = self._values.get(key)
        if found is None or found[1] <= now_ms:
            return 0
        return found[0]

    def _set(self, key: str, value: int, expires_ms: int, now_ms: int) -> None:
        self._values[key] = (value, expires_ms)
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            self._values = {k: v for k, v in self._values.items() if v[1] > now_ms}
