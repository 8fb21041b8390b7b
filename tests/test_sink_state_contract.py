"""One contract for both sink state stores (memory, Redis): the lease lets one owner move a
sink at a time, cursors, quarantine and replay queue move together or not at all, and
pushed windows are kept."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from meshtoll.errors import StorageUnavailable
from meshtoll.sinks.delivery import Refusal
from meshtoll.sinks.state import Cursor, PushedWindow, Quarantined, SinkStateStore
from meshtoll.storage import MemorySinkStateStore
from meshtoll.storage.sink_state_redis import RedisSinkStateStore
from meshtoll.usage.records import UsageRecord
from tests.conftest import ON_REDIS

_sinks = itertools.count()


@pytest.fixture(params=["memory", ON_REDIS])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[SinkStateStore]:
    if request.param == "memory":
        yield MemorySinkStateStore()
        return
    found = RedisSinkStateStore(request.getfixturevalue("redis_url"))
    yield found
    await found.close()


def quarantined(request_id: str) -> Quarantined:
    record = UsageRecord(request_id, 1_796_000_000.5, "acme", "ci", "pro", "", "GET", 200, 1, 2, 0.5, 1)
    return Quarantined(record, Refusal("refused", '{"error": "no such customer"}', 400), 1_796_000_100.0)


async def test_one_owner_holds_the_lease_until_it_gives_it_up(state: SinkStateStore) -> None:
    sink = f"sink{next(_sinks)}"
    assert await state.lease(sink, "first", 30)
    assert await state.lease(sink, "first", 30)  # extended
    assert not await state.lease(sink, "second", 30)
    await state.unlease(sink, "second")  # not the holder: nothing happens
    assert not await state.lease(sink, "second", 30)
    await state.unlease(sink, "first")
    assert await state.lease(sink, "second", 30)


async def test_only_the_lease_holder_moves_cursors_and_quarantines(state: SinkStateStore) -> None:
    sink = f"sink{next(_sinks)}"
    cursor = Cursor(("1796000000000-0", 3), 4, ("1796000000000-0", 9), 1_796_000_000.0)
    assert await state.lease(sink, "holder", 30)
    assert not await state.save(sink, "other", {"acme": cursor}, [quarantined("r1")])
    assert await state.cursors(sink) == {}
    assert await state.quarantined(sink) == []
    assert await state.save(sink, "holder", {"acme": cursor}, [quarantined("r1"), quarantined("r2")])
    assert await state.cursors(sink) == {"acme": cursor}
    assert [item.record.request_id for item in await state.quarantined(sink)] == ["r1", "r2"]
    assert (await state.quarantined(sink))[0] == quarantined("r1")


async def test_replayed_records_leave_the_quarantine_and_settle_or_come_back(state: SinkStateStore) -> None:
    sink = f"sink{next(_sinks)}"
    assert await state.lease(sink, "holder", 30)
    assert await state.save(sink, "holder", {}, [quarantined(f"r{n}") for n in range(3)])
    assert await state.replay(sink, ["acme:r0", "acme:unknown"]) == 1
    assert [item.key for item in await state.replays(sink, 10)] == ["acme:r0"]
    assert await state.replay(sink, None) == 2  # every one left
    assert await state.quarantined(sink) == []
    # r0 delivered, r1 refused again (back with its new answer), r2 still queued.
    assert await state.save(sink, "holder", {}, [quarantined("r1")], ["acme:r0"])
    assert [item.key for item in await state.replays(sink, 10)] == ["acme:r2"]
    assert [item.key for item in await state.quarantined(sink)] == ["acme:r1"]


async def test_pushed_windows_are_kept_by_the_lease_holder(state: SinkStateStore) -> None:
    sink = f"sink{next(_sinks)}"
    window = PushedWindow(1_796_000_000.0, 1_796_086_400.0, {"acme": ("1796000000000-0", 5)})
    assert await state.pushed(sink) == []
    assert not await state.save_pushed(sink, "nobody", [window])
    assert await state.lease(sink, "push", 30)
    assert await state.save_pushed(sink, "push", [window])
    assert await state.pushed(sink) == [window]


EVERY_CALL: dict[str, Callable[[RedisSinkStateStore], Awaitable[object]]] = {
    "lease": lambda state: state.lease("lago", "me", 30),
    "unlease": lambda state: state.unlease("lago", "me"),
    "cursors": lambda state: state.cursors("lago"),
    "save": lambda state: state.save("lago", "me", {}),
    "quarantined": lambda state: state.quarantined("lago"),
    "replay": lambda state: state.replay("lago", None),
    "replays": lambda state: state.replays("lago", 10),
    "pushed": lambda state: state.pushed("lago"),
    "save_pushed": lambda state: state.save_pushed("lago", "me", []),
}


@pytest.mark.parametrize("call", sorted(EVERY_CALL))
async def test_every_call_to_an_unreachable_redis_fails_as_storage_unavailable(call: str) -> None:
    state = RedisSinkStateStore("redis://127.0.0.1:1/0", timeout_ms=50)  # nothing listens on port 1
    try:
        with pytest.raises(StorageUnavailable, match=r"^Redis did not answer"):
            await EVERY_CALL[call](state)
    finally:
        await state.close()
