"""Counter storage behind one small Protocol (base.CounterStore): in memory, or Redis."""

from __future__ import annotations

from meshtoll.storage.base import CounterStore
from meshtoll.storage.memory import MemoryCounterStore


def open_counter_store(url: str | None, *, timeout_ms: int = 50) -> CounterStore:
    """The Redis store for `url`, or the in-memory one when there is no URL."""
    if url is None:
        return MemoryCounterStore()
    from meshtoll.storage.redis import RedisCounterStore

    return RedisCounterStore(url, timeout_ms=timeout_ms)


__all__ = ["CounterStore", "MemoryCounterStore", "open_counter_store"]
