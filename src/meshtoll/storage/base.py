"""The storage contract: what every counter store (memory, Redis) promises.

`check` evaluates all checks of one decision at `now`. The decision is admitted when every
non-shadow check admits its cost; then every cost is consumed (shadow ones too), otherwise
nothing is: a refused request never eats quota. Atomic: concurrent callers, in any number
of processes sharing a store, never overshoot. The meaning of each algorithm is the pure
code in `meshtoll.storage.algorithms`, which the memory store runs and the Redis store's
Lua script mirrors; one contract test suite runs against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshtoll.ratelimit.limits import Check, CheckResult


class CounterStore(Protocol):
    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        """Raises meshtoll.errors.StorageUnavailable when the store cannot answer in time."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
