"""The storage contract: what every counter store (memory, Redis) promises.

`check` evaluates all checks of one decision at `now`. The decision is admitted when every
non-shadow check admits its cost; then every cost is consumed (shadow ones too), otherwise
nothing is: a refused request never eats quota. Atomic: concurrent callers, in any number
of processes sharing a store, never overshoot. The meaning of each algorithm is the pure
code in `meshtoll.counting.algorithms`, which the memory store runs and the Redis store's
Lua script mirrors; one contract test suite runs against both.

A check may ask for a token lease (`Check.lease`): hits reserved beyond its cost, granted
only within the limit and consumed with the cost (`CheckResult.leased`); `release` gives
back what a process did not use.

`increment` is envoyproxy/ratelimit's counting instead (every hit counted, refused or not),
for its configuration domains in strict compatibility.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from meshtoll.counting.limits import Check, CheckResult, Increment, Unused

# What a limit does when its store cannot answer: admit ("open") or refuse ("closed").
FailureMode = Literal["open", "closed"]
FAILURE_MODES: tuple[FailureMode, ...] = ("open", "closed")

# How envoyproxy/ratelimit's configuration domains are counted: "strict" as that project
# counts (`increment`: every hit, refused or not), "meshtoll" as meshtoll's own limits are
# (`check`: all or nothing, calendar months).
Compat = Literal["strict", "meshtoll"]
COMPAT_MODES: tuple[Compat, ...] = ("strict", "meshtoll")


class CounterStore(Protocol):
    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        """Raises meshtoll.errors.StorageUnavailable when the store cannot answer in time."""
        ...

    async def increment(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> list[int]:
        """envoyproxy/ratelimit's counting (algorithms.hits_to_add): each counter's value
        after adding its hits, every counter refreshed to its expiry. Atomic per call (per
        Cluster slot). Raises meshtoll.errors.StorageUnavailable like `check`."""
        ...

    async def release(self, unused: Sequence[Unused], now: float) -> int:
        """Give back leased hits never used (algorithms.after_release); the number of hits
        given back. Raises meshtoll.errors.StorageUnavailable like `check`."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
