"""The tenant registry on Redis (standalone, Sentinel or Cluster), through redis-py.

Not on any decision's path: decisions read the compiled indexes, and this is read when an
instance starts, when a change is announced, and by the admin API. Every change is one call
of storage/lua/registry.lua. Instances follow the change log, a stream, with XREAD BLOCK: a
stream rather than pub/sub because an instance that was cut off reads on from where it was
(pub/sub would have dropped what it missed), and because it works alike on a Cluster.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from meshtoll.errors import StorageRefused, TenantConflict
from meshtoll.keys import (
    REGISTRY_AUDIT_KEY,
    REGISTRY_CHANGES_KEY,
    REGISTRY_HEARD_KEY,
    REGISTRY_INSTANCES_KEY,
    REGISTRY_KEY_HASHES_KEY,
    REGISTRY_KEY_USE_KEY,
    REGISTRY_TENANTS_KEY,
    REGISTRY_VERSION_KEY,
    key_use_field,
)
from meshtoll.registry.records import (
    Change,
    Commit,
    InstanceRecord,
    Snapshot,
    TenantRecord,
    decode_instance,
    decode_record,
)
from meshtoll.registry.store import AUDIT_LOG_LENGTH, CHANGE_LOG_LENGTH
from meshtoll.storage.redis_access import RedisFailures, lua_script, redis_py_client
from meshtoll.storage.urls import parse_redis_url

_UNANSWERED = RedisFailures("the tenant registry's Redis did not answer")
_COMMIT_KEYS = [
    REGISTRY_TENANTS_KEY,
    REGISTRY_KEY_HASHES_KEY,
    REGISTRY_VERSION_KEY,
    REGISTRY_CHANGES_KEY,
    REGISTRY_AUDIT_KEY,
    REGISTRY_KEY_USE_KEY,
]
# Records read per HSCAN round trip while loading everything.
SCAN_COUNT = 2000
# A blocked XREAD holds its connection; the socket timeout must outlast the longest wait.
SOCKET_TIMEOUT_SECONDS = 5.0


class RedisTenantRegistry:
    def __init__(self, url: str, *, timeout_seconds: float = SOCKET_TIMEOUT_SECONDS) -> None:
        self._client, self._sentinels = redis_py_client(parse_redis_url(url), timeout_seconds)
        self._script = self._client.register_script(lua_script("registry.lua"))
        self._wait_limit = timeout_seconds / 2
        self._initialized = not isinstance(self._client, RedisCluster)
        self._initializing = asyncio.Lock()

    async def get(self, tenant: str) -> TenantRecord | None:
        found = await self._call(self._client.hget(REGISTRY_TENANTS_KEY, tenant))
        try:
            return None if found is None else decode_record(found)
        except ValueError as exc:  # not written by meshtoll: an edit by hand
            raise StorageRefused(f"tenant {tenant!r}'s record in Redis cannot be read: {exc}") from None

    async def get_many(self, tenants: Sequence[str]) -> dict[str, TenantRecord | None]:
        if not tenants:
            return {}
        documents = await self._call(self._client.hmget(REGISTRY_TENANTS_KEY, list(tenants)))
        found: dict[str, TenantRecord | None] = {}
        for tenant, document in zip(tenants, documents, strict=True):
            try:
                found[tenant] = None if document is None else decode_record(document)
            except ValueError:
                found[tenant] = None  # unreadable: the snapshot names it; nothing to serve
        return found

    async def commit(self, commit: Commit) -> int:
        document = b"" if commit.record is None else commit.record.encode()
        arguments: list[Any] = [
            commit.tenant, commit.expected, document, orjson.dumps(commit.audit),
            CHANGE_LOG_LENGTH, AUDIT_LOG_LENGTH,
            len(commit.added_hashes), *commit.added_hashes,
            len(commit.removed_hashes), *commit.removed_hashes, *commit.forgotten_keys,
        ]  # fmt: skip
        reply = await self._call(self._script(keys=_COMMIT_KEYS, args=arguments))
        outcome, value = reply[0].decode(), reply[1]
        if outcome == "stale":
            raise TenantConflict(
                "stale", f"tenant {commit.tenant!r} is at version {int(value)}", current=int(value)
            )
        if outcome == "key_in_use":
            raise TenantConflict(
                "key_in_use", "the key hash belongs to another tenant", detail=value.decode()
            )
        return int(value)

    async def snapshot(self) -> Snapshot:
        # The head first: every record read after it is at least that new, and the changes
        # after it (the caller applies them) bring the rest up to date.
        version, cursor = await self.head()
        records: list[TenantRecord] = []
        unreadable: list[tuple[str, str]] = []
        position: int | bytes = 0
        while True:
            position, page = await self._call(
                self._client.hscan(REGISTRY_TENANTS_KEY, position, count=SCAN_COUNT)
            )
            for name, document in page.items():
                try:
                    records.append(decode_record(document))
                except ValueError as exc:
                    unreadable.append((name.decode(errors="replace"), str(exc)))
            if not position:
                return Snapshot(version, cursor, records, unreadable)

    async def changes(self, after: str, wait_seconds: float) -> list[Change]:
        block = max(1, int(min(wait_seconds, self._wait_limit) * 1000)) if wait_seconds > 0 else None
        replies = await self._call(
            self._client.xread({REGISTRY_CHANGES_KEY: after or "0-0"}, count=1000, block=block)
        )
        changes: list[Change] = []
        for _, entries in replies or ():
            for cursor, entry in entries:
                changes.append(Change(int(entry[b"v"]), entry[b"t"].decode(), cursor.decode()))
        return changes

    async def head(self) -> tuple[int, str]:
        last = await self._call(self._client.xrevrange(REGISTRY_CHANGES_KEY, count=1))
        if not last:
            return 0, ""
        cursor, entry = last[0]
        return int(entry[b"v"]), cursor.decode()

    async def audit(self, since: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        start = f"({since}" if since else "-"
        found = await self._call(self._client.xrange(REGISTRY_AUDIT_KEY, start, "+", count=limit))
        entries = [{**orjson.loads(entry[b"e"]), "cursor": cursor.decode()} for cursor, entry in found]
        return entries, entries[-1]["cursor"] if entries else since

    async def heartbeat(self, instance: InstanceRecord, expire_seconds: float) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(REGISTRY_INSTANCES_KEY, instance.id, orjson.dumps(instance.document()))
            pipe.zadd(REGISTRY_HEARD_KEY, {instance.id: instance.heard_at})
            await self._call(pipe.execute())

    async def instances(self, now: float, expire_seconds: float) -> list[InstanceRecord]:
        cutoff = now - expire_seconds
        gone = await self._call(self._client.zrangebyscore(REGISTRY_HEARD_KEY, "-inf", f"({cutoff}"))
        if gone:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(REGISTRY_HEARD_KEY, *gone)
                pipe.hdel(REGISTRY_INSTANCES_KEY, *gone)
                await self._call(pipe.execute())
        alive = await self._call(self._client.zrangebyscore(REGISTRY_HEARD_KEY, cutoff, "+inf"))
        if not alive:
            return []
        documents = await self._call(self._client.hmget(REGISTRY_INSTANCES_KEY, alive))
        found = [decode_instance(document) for document in documents if document is not None]
        return sorted(found, key=lambda instance: instance.id)

    async def record_key_use(self, uses: Mapping[tuple[str, str], int]) -> None:
        if uses:
            mapping = {key_use_field(tenant, key_id): minute for (tenant, key_id), minute in uses.items()}
            await self._call(self._client.hset(REGISTRY_KEY_USE_KEY, mapping=mapping))

    async def key_use(self, tenant: str, key_ids: Sequence[str]) -> dict[str, int]:
        if not key_ids:
            return {}
        fields = [key_use_field(tenant, key_id) for key_id in key_ids]
        minutes = await self._call(self._client.hmget(REGISTRY_KEY_USE_KEY, fields))
        return {key_id: int(minute) for key_id, minute in zip(key_ids, minutes, strict=True) if minute}

    async def close(self) -> None:
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()

    async def _call(self, pending: Any) -> Any:
        """Await a redis-py call: a network failure becomes StorageUnavailable (transient),
        an error reply StorageRefused."""
        try:
            with _UNANSWERED:
                if not self._initialized:
                    # Concurrent first calls would each start the cluster client's slot discovery,
                    # which resets the connections of the others: discover once, first.
                    async with self._initializing:
                        if not self._initialized:
                            await self._client.initialize()
                            self._initialized = True
                try:
                    return await pending
                except redis.exceptions.ResponseError as exc:
                    raise StorageRefused(f"Redis refused a tenant registry call: {exc}") from None
        finally:
            if inspect.iscoroutine(pending) and pending.cr_frame is not None and not pending.cr_running:
                pending.close()  # never awaited (the registry was unreachable first)
