"""The limiter around a store: refusals remembered locally, global shadow mode, and the
failure policy when the store cannot answer. Clock injected; a real memory store."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meshtoll.counting.limits import Check, CheckResult, RateLimit
from meshtoll.errors import StorageUnavailable
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.storage import MemoryCounterStore

LIMIT = Check("meshtoll_{acme}_tenant_2/minute", RateLimit(2, "minute"))


class CountingStore(MemoryCounterStore):
    """The memory store, counting how often it is asked (and failing on request)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.down = False

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        self.calls += 1
        if self.down:
            raise StorageUnavailable("store down for the test")
        return await super().check(checks, now)


async def test_a_refused_counter_costs_no_store_call_until_it_could_admit_again() -> None:
    now = [120.0]
    store = CountingStore()
    limiter = Limiter(store, clock=lambda: now[0])
    verdicts = [await limiter.check([LIMIT]) for _ in range(6)]
    assert [verdict.admitted for verdict in verdicts] == [True, True, False, False, False, False]
    assert store.calls == 3  # the third call refused; the next three never reached the store
    assert dict(verdicts[5].headers)["retry-after"] == "60"
    now[0] = 180.0  # the next window
    assert (await limiter.check([LIMIT])).admitted
    assert store.calls == 4


async def test_global_shadow_mode_counts_but_never_refuses() -> None:
    store = CountingStore()
    limiter = Limiter(store, shadow=True, clock=lambda: 120.0)
    assert all([(await limiter.check([LIMIT])).admitted for _ in range(5)])
    (looked,) = await store.check([Check(LIMIT.key, LIMIT.limit, cost=0)], 120.0)
    assert looked.used == 5


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_the_failure_policy_decides_when_the_store_is_down(mode: str) -> None:
    store = CountingStore()
    store.down = True
    limiter = Limiter(store, failure_mode=mode)  # type: ignore[arg-type]
    if mode == "open":
        assert (await limiter.check([LIMIT])).admitted
        assert limiter.outcomes["store_unavailable_open"] == 1
    else:
        with pytest.raises(StorageUnavailable):
            await limiter.check([LIMIT])
