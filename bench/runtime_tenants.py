"""Run-time tenants for the benchmark: written straight into a Redis the way the registry
stores them (records, key hashes, the version, one change-log entry at the end), in
pipelines, since 100,000 changes through the admin API would take minutes to set up. What
an instance then loads is what it would load after 100,000 real changes: the same records.

    seed_runtime_tenants("redis://127.0.0.1:6379/1", 100_000)  # tenant rt<n>, key rt_key(n)
"""

from __future__ import annotations

import hashlib
import time

import redis

from meshtoll.keys import (
    REGISTRY_CHANGES_KEY,
    REGISTRY_KEY_HASHES_KEY,
    REGISTRY_TENANTS_KEY,
    REGISTRY_VERSION_KEY,
)
from meshtoll.registry.records import KeyRecord, TenantRecord, with_version

BATCH = 5_000


def rt_key(index: int) -> str:
    """The API key of run-time tenant `rt<index>` (not meshtoll's format: any key works)."""
    return f"bench-rt-key-{index:06d}"


def seed_runtime_tenants(redis_url: str, count: int, plan: str = "pro") -> float:
    """`count` tenants rt0 .. rt<count-1> on `plan`, each with one key; seconds it took."""
    started = time.monotonic()
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    try:
        for start in range(0, count, BATCH):
            documents: dict[str, bytes] = {}
            owners: dict[str, str] = {}
            for index in range(start, min(count, start + BATCH)):
                name, digest = f"rt{index}", hashlib.sha256(rt_key(index).encode()).hexdigest()
                record = TenantRecord(name, {"plan": plan}, (KeyRecord("k", digest, "", now),), now, now)
                documents[name] = with_version(record.encode(), index + 1)
                owners[digest] = name
            with client.pipeline(transaction=False) as pipe:
                pipe.hset(REGISTRY_TENANTS_KEY, mapping=documents)  # type: ignore[arg-type]
                pipe.hset(REGISTRY_KEY_HASHES_KEY, mapping=owners)  # type: ignore[arg-type]
                pipe.execute()
        client.set(REGISTRY_VERSION_KEY, count)
        client.xadd(REGISTRY_CHANGES_KEY, {"v": count, "t": f"rt{count - 1}"})
    finally:
        client.close()
    return time.monotonic() - started
