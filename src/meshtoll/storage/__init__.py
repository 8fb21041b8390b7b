"""The ground floor: stores that implement meshtoll.counting.store.CounterStore and
meshtoll.usage.store.UsageStore, in memory or in Redis (standalone, Sentinel, Cluster)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from meshtoll.counting.store import CounterStore
from meshtoll.registry.store import TenantRegistry
from meshtoll.sinks.state import SinkStateStore
from meshtoll.storage.memory import MemoryCounterStore
from meshtoll.storage.sink_state_memory import MemorySinkStateStore
from meshtoll.storage.usage_memory import MemoryUsageStore
from meshtoll.usage.store import DEFAULT_LEDGER_RETENTION_SECONDS, UsageStore


def open_counter_store(url: str | None, *, timeout_ms: int = 50) -> CounterStore:
    """The Redis store for `url`, or the in-memory one when there is no URL."""
    if url is None:
        return MemoryCounterStore()
    from meshtoll.storage.redis import RedisCounterStore

    return RedisCounterStore(url, timeout_ms=timeout_ms)


def open_usage_store(
    url: str | None, *, ledger_retention_seconds: float = DEFAULT_LEDGER_RETENTION_SECONDS
) -> UsageStore:
    if url is None:
        return MemoryUsageStore(ledger_retention_seconds=ledger_retention_seconds)
    from meshtoll.storage.usage_redis import RedisUsageStore

    return RedisUsageStore(url, ledger_retention_seconds=ledger_retention_seconds)


def open_sink_state_store(url: str | None) -> SinkStateStore:
    """Where billing sinks keep their cursors, lease and quarantine: Redis for `url`, else
    this process's memory."""
    if url is None:
        return MemorySinkStateStore()
    from meshtoll.storage.sink_state_redis import RedisSinkStateStore

    return RedisSinkStateStore(url)


def open_tenant_registry(url: str | None) -> TenantRegistry:
    """The tenant registry on Redis, or in memory (one process's own) when there is no URL."""
    if url is None:
        from meshtoll.storage.registry_memory import MemoryTenantRegistry

        return MemoryTenantRegistry()
    from meshtoll.storage.registry_redis import RedisTenantRegistry

    return RedisTenantRegistry(url)


@contextlib.asynccontextmanager
async def counter_store(url: str | None, *, timeout_ms: int = 50) -> AsyncIterator[CounterStore]:
    """open_counter_store, closed when the block ends: for commands that read and leave."""
    store = open_counter_store(url, timeout_ms=timeout_ms)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def usage_store(url: str | None) -> AsyncIterator[UsageStore]:
    """open_usage_store, closed when the block ends."""
    store = open_usage_store(url)
    try:
        yield store
    finally:
        await store.close()


__all__ = [
    "CounterStore",
    "MemoryCounterStore",
    "MemorySinkStateStore",
    "MemoryUsageStore",
    "counter_store",
    "open_counter_store",
    "open_sink_state_store",
    "open_tenant_registry",
    "open_usage_store",
    "usage_store",
]
