"""The tenant registry in memory: for one `meshtoll serve` process without Redis (a laptop,
the demo) and the contract tests. Each commit is atomic because nothing in it awaits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from meshtoll.errors import TenantConflict
from meshtoll.registry.records import (
    Change,
    Commit,
    InstanceRecord,
    Snapshot,
    TenantRecord,
    decode_record,
    with_version,
)
from meshtoll.registry.store import AUDIT_LOG_LENGTH, CHANGE_LOG_LENGTH


class MemoryTenantRegistry:
    def __init__(self, *, change_log_length: int = CHANGE_LOG_LENGTH) -> None:
        self._documents: dict[str, bytes] = {}  # as the Redis store keeps them
        self._owners: dict[str, str] = {}  # key hash -> tenant
        self._version = 0
        self._changes: list[Change] = []
        self._change_log_length = change_log_length
        self._audit: list[dict[str, Any]] = []
        self._sequence = itertools.count(1)
        self._last_ms = 0
        self._instances: dict[str, InstanceRecord] = {}
        self._key_use: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Condition()

    async def get(self, tenant: str) -> TenantRecord | None:
        found = self._documents.get(tenant)
        return None if found is None else decode_record(found)

    async def get_many(self, tenants: Sequence[str]) -> dict[str, TenantRecord | None]:
        return {tenant: await self.get(tenant) for tenant in tenants}

    async def commit(self, commit: Commit) -> int:
        stored = self._documents.get(commit.tenant)
        current = 0 if stored is None else decode_record(stored).version
        if current != commit.expected:
            raise TenantConflict(
                "stale", f"tenant {commit.tenant!r} is at version {current}", current=current
            )
        for digest in commit.added_hashes:
            owner = self._owners.get(digest)
            if owner is not None and owner != commit.tenant:
                raise TenantConflict("key_in_use", "the key hash belongs to another tenant", detail=owner)
        self._version += 1
        for digest in commit.removed_hashes:
            if self._owners.get(digest) == commit.tenant:
                del self._owners[digest]
        for digest in commit.added_hashes:
            self._owners[digest] = commit.tenant
        for key_id in commit.forgotten_keys:
            self._key_use.pop((commit.tenant, key_id), None)
        if commit.record is None:
            self._documents.pop(commit.tenant, None)
        else:
            self._documents[commit.tenant] = with_version(commit.record.encode(), self._version)
        # Cursors look like Redis stream ids ("<ms>-<n>"), so that a time can stand for one.
        self._last_ms = max(self._last_ms, int(time.time() * 1000))
        cursor = f"{self._last_ms}-{next(self._sequence)}"
        self._changes.append(Change(self._version, commit.tenant, cursor))
        del self._changes[: -self._change_log_length]
        self._audit.append({**commit.audit, "version": self._version, "cursor": cursor})
        del self._audit[:-AUDIT_LOG_LENGTH]
        async with self._changed:
            self._changed.notify_all()
        return self._version

    async def snapshot(self) -> Snapshot:
        version, cursor = await self.head()
        return Snapshot(version, cursor, [decode_record(document) for document in self._documents.values()])

    async def changes(self, after: str, wait_seconds: float) -> list[Change]:
        found = self._after(after)
        if not found and wait_seconds > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait_seconds)
            found = self._after(after)
        return found

    def _after(self, cursor: str) -> list[Change]:
        position = _position(cursor)
        return [change for change in self._changes if _position(change.cursor) > position]

    async def head(self) -> tuple[int, str]:
        return self._version, self._changes[-1].cursor if self._changes else ""

    async def audit(self, since: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        position = _position(since)
        entries = [entry for entry in self._audit if _position(entry["cursor"]) > position][:limit]
        # Copied through JSON: what a caller gets is what Redis would give it.
        entries = [orjson.loads(orjson.dumps(entry)) for entry in entries]
        return entries, entries[-1]["cursor"] if entries else since

    async def heartbeat(self, instance: InstanceRecord, expire_seconds: float) -> None:
        self._instances[instance.id] = instance

    async def instances(self, now: float, expire_seconds: float) -> list[InstanceRecord]:
        for gone in [i for i, found in self._instances.items() if found.heard_at < now - expire_seconds]:
            del self._instances[gone]
        return sorted(self._instances.values(), key=lambda instance: instance.id)

    async def record_key_use(self, uses: Mapping[tuple[str, str], int]) -> None:
        self._key_use.update(uses)

    async def key_use(self, tenant: str, key_ids: Sequence[str]) -> dict[str, int]:
        return {
            key_id: self._key_use[(tenant, key_id)] for key_id in key_ids if (tenant, key_id) in self._key_use
        }

    async def close(self) -> None:
        return None


def _position(cursor: str) -> tuple[int, int]:
    """A cursor "<ms>-<n>" as numbers, ordered as Redis orders stream ids."""
    if not cursor:
        return (0, 0)
    milliseconds, _, sequence = cursor.partition("-")
    return (int(milliseconds), int(sequence or 0))
