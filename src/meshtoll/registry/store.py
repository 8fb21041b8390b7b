"""What a registry store promises: run-time tenants committed one change at a time, each
change atomic (its version check, the key-hash uniqueness among run-time tenants, the
version bump, the change notice and the audit entry together), a change log every instance
follows, and the instances' own heartbeats. Stores: meshtoll.storage.registry_memory and
meshtoll.storage.registry_redis, held to one contract test suite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from meshtoll.registry.records import Change, Commit, InstanceRecord, Snapshot, TenantRecord

# How many changes the log keeps: an instance further behind than this reloads everything.
CHANGE_LOG_LENGTH = 10_000
# How many audit entries are kept (the oldest go first).
AUDIT_LOG_LENGTH = 1_000_000


class TenantRegistry(Protocol):
    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, None when there is none; StorageRefused for one that cannot
        be read (not written by meshtoll)."""
        ...

    async def get_many(self, tenants: Sequence[str]) -> dict[str, TenantRecord | None]:
        """Each tenant's record (None: there is none), in one round trip; one that cannot be
        read counts as absent here (an instance then serves no such tenant)."""
        ...

    async def commit(self, commit: Commit) -> int:
        """Apply `commit` and return the registry's new version. Raises TenantConflict
        (`stale`, with the tenant's current version, when it is not `commit.expected`;
        `key_in_use` when an added key hash belongs to another run-time tenant), and then
        nothing has changed."""
        ...

    async def snapshot(self) -> Snapshot:
        """Every record: for an instance that starts, or that fell too far behind."""
        ...

    async def changes(self, after: str, wait_seconds: float) -> list[Change]:
        """The changes after the cursor `after` ("" for the start of the log), oldest first;
        when there are none yet, waits up to `wait_seconds` for one. A gap in their versions
        means the log was trimmed (or the store reset) past `after`: reload a snapshot."""
        ...

    async def head(self) -> tuple[int, str]:
        """The registry's version and the cursor of its last change ("" when none)."""
        ...

    async def audit(self, since: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        """Audit entries after the cursor `since` ("" from the oldest kept), at most `limit`,
        oldest first, each with its `cursor`; and the cursor to read on from."""
        ...

    async def heartbeat(self, instance: InstanceRecord, expire_seconds: float) -> None:
        """Report an instance alive; one not heard of for `expire_seconds` is dropped."""
        ...

    async def instances(self, now: float, expire_seconds: float) -> list[InstanceRecord]: ...

    async def record_key_use(self, uses: Mapping[tuple[str, str], int]) -> None:
        """(tenant, key id) -> the minute (Unix time // 60) it was last seen in use."""
        ...

    async def key_use(self, tenant: str, key_ids: Sequence[str]) -> dict[str, int]: ...

    async def close(self) -> None: ...
