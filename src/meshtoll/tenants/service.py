"""Changing run-time tenants and keys: what the admin API and the command line both do.

Every change reads the tenant's record, makes the new one, checks it as the policy file's
tenants are checked (meshtoll.policy.runtime) and against this instance's policy file, then
commits it with the version it was made from. A change refused for any reason changes
nothing. A client that named a version (If-Match) gets `precondition_failed` when the tenant
has moved on; otherwise the change is made again from the newer record, so that two clients
changing one tenant at once both land.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from meshtoll.api_keys import generate_key, key_hint, key_sha256
from meshtoll.errors import TenantChangeRefused, TenantConflict
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.document import format_path
from meshtoll.policy.runtime import api_key, check_spec
from meshtoll.policy.schema import name_problem
from meshtoll.registry.records import Commit, KeyRecord, TenantRecord
from meshtoll.registry.store import TenantRegistry
from meshtoll.tenants.documents import audit_summary, parse_time

# Changes made again from a newer record before giving up. Each loss means another change to
# the same tenant landed in between, so N clients changing one tenant at once all land within
# N attempts; the bound only stops a change that a flood of others keeps overtaking.
ATTEMPTS = 64
# After a loss, a pause of up to this many seconds times the losses so far, at random, so
# that clients that lost together do not collide again at once.
BACKOFF_SECONDS = 0.002
# Keys a tenant keeps, revoked and expired ones included; beyond, the oldest of those go
# (they then answer invalid_api_key rather than revoked_api_key or expired_api_key).
MAX_KEYS = 100
MAX_OVERLAP_SECONDS = 366 * 86400
_SHA256_HEX = frozenset("0123456789abcdef")

Mutation = Callable[[TenantRecord | None], TenantRecord | None]


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str | None  # the key itself, shown once; None for an imported hash
    record: KeyRecord
    tenant: TenantRecord


class TenantService:
    def __init__(
        self,
        registry: TenantRegistry,
        policy: Callable[[], CompiledPolicy],
        *,
        committed: Callable[[str, TenantRecord | None], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`policy`: the instance's current policy (its plans, its file tenants, its keys);
        `committed`: told of each change once it is committed (the instance installs it)."""
        self.registry = registry
        self._policy = policy
        self._committed = committed
        self._clock = clock

    async def get(self, name: str) -> TenantRecord:
        found = await self.registry.get(name)
        if found is None:
            self._refuse_file_tenant(name)
            raise TenantChangeRefused("unknown_tenant", f"no run-time tenant {name!r}")
        return found

    async def create(self, body: object, actor: str) -> TenantRecord:
        if not isinstance(body, dict):
            raise _invalid((("", "expected a JSON object with the tenant's name and fields"),))
        spec = dict(body)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise _invalid((("name", "expected the tenant's name, a string"),))
        self._refuse_file_tenant(name)
        now = self._clock()

        def make(current: TenantRecord | None) -> TenantRecord:
            if current is not None:
                raise TenantChangeRefused("tenant_exists", f"tenant {name!r} exists: change it with PATCH")
            return TenantRecord(name, spec, (), now, now)

        return _kept_record(await self._change(name, 0, actor, "tenant.create", make))

    async def update(self, name: str, patch: object, expected: int | None, actor: str) -> TenantRecord:
        if not isinstance(patch, dict):
            raise _invalid((("", "expected a JSON object of the fields to change (null removes one)"),))
        if "name" in patch:
            raise _invalid((("name", "a tenant's name cannot change: create another tenant"),))
        self._refuse_file_tenant(name)

        def make(current: TenantRecord | None) -> TenantRecord:
            found = _existing(name, current)
            spec = {**found.spec, **patch}
            for field, value in patch.items():
                if value is None:
                    del spec[field]
            return replace(found, spec=spec, updated_at=self._clock())

        return _kept_record(await self._change(name, expected, actor, "tenant.update", make))

    async def delete(self, name: str, expected: int | None, actor: str) -> int:
        """Its usage and ledger stay in the store, billable; its keys stop at once."""
        self._refuse_file_tenant(name)

        def make(current: TenantRecord | None) -> None:
            _existing(name, current)
            return None

        _, version = await self._change(name, expected, actor, "tenant.delete", make)
        return version

    async def issue_key(self, name: str, body: object, actor: str) -> IssuedKey:
        fields = _mapping(body, ("id", "expires_at", "sha256"))
        key_id = _key_id(fields.get("id"), name)
        expires_at = _optional_time(fields, "expires_at")
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise _invalid((("expires_at", "is not in the future"),))
        key, record = self._new_key(key_id, fields.get("sha256"), now, expires_at)

        def make(current: TenantRecord | None) -> TenantRecord:
            found = _existing(name, current)
            if found.key(key_id) is not None:
                raise TenantChangeRefused("key_exists", f"tenant {name!r} has a key {key_id!r}")
            return replace(found, keys=_kept((*found.keys, record), now), updated_at=now)

        tenant = _kept_record(await self._change(name, None, actor, "key.create", make))
        return IssuedKey(key, record, tenant)

    async def roll_key(self, name: str, key_id: str, body: object, actor: str) -> IssuedKey:
        """A new key at once; the old one keeps working `overlap_seconds` more."""
        fields = _mapping(body, ("overlap_seconds", "id", "expires_at"))
        overlap = fields.get("overlap_seconds")
        if type(overlap) is not int or not 0 <= overlap <= MAX_OVERLAP_SECONDS:
            message = f"required: whole seconds from 0 (the old key stops now) to {MAX_OVERLAP_SECONDS}"
            raise _invalid((("overlap_seconds", message),))
        new_id = _key_id(fields.get("id"), name)
        now = self._clock()
        key, record = self._new_key(new_id, None, now, _optional_time(fields, "expires_at"))

        def make(current: TenantRecord | None) -> TenantRecord:
            found = _existing(name, current)
            old = _usable_key(found, key_id)
            if found.key(new_id) is not None:
                raise TenantChangeRefused("key_exists", f"tenant {name!r} has a key {new_id!r}")
            ends = now + overlap if old.expires_at is None else min(old.expires_at, now + overlap)
            keys = tuple(replace(k, expires_at=ends) if k.id == key_id else k for k in found.keys)
            return replace(found, keys=_kept((*keys, record), now), updated_at=now)

        tenant = _kept_record(await self._change(name, None, actor, "key.roll", make))
        return IssuedKey(key, record, tenant)

    async def update_key(self, name: str, key_id: str, body: object, actor: str) -> TenantRecord:
        """Set or clear a key's expiry: `expires_at` now or earlier ends a roll's overlap."""
        fields = _mapping(body, ("expires_at",))
        if "expires_at" not in fields:
            raise _invalid((("expires_at", "required: an RFC 3339 time, or null for no expiry"),))
        expires_at = _optional_time(fields, "expires_at")

        def make(current: TenantRecord | None) -> TenantRecord:
            found = _existing(name, current)
            _usable_key(found, key_id)
            keys = tuple(replace(k, expires_at=expires_at) if k.id == key_id else k for k in found.keys)
            return replace(found, keys=keys, updated_at=self._clock())

        return _kept_record(await self._change(name, None, actor, "key.update", make))

    async def revoke_key(self, name: str, key_id: str, actor: str) -> TenantRecord:
        """Refused (401 revoked_api_key) by every instance once it applies the change."""

        def make(current: TenantRecord | None) -> TenantRecord:
            found = _existing(name, current)
            key = found.key(key_id)
            if key is None:
                raise TenantChangeRefused("unknown_key", f"tenant {name!r} has no key {key_id!r}")
            now = self._clock()
            revoked = replace(key, revoked_at=key.revoked_at or now)
            keys = tuple(revoked if k.id == key_id else k for k in found.keys)
            return replace(found, keys=keys, updated_at=now)

        return _kept_record(await self._change(name, None, actor, "key.revoke", make))

    def _new_key(
        self, key_id: str, imported: object, now: float, expires_at: float | None
    ) -> tuple[str | None, KeyRecord]:
        if imported is not None:
            if not isinstance(imported, str) or len(imported) != 64 or not set(imported) <= _SHA256_HEX:
                raise _invalid((("sha256", "expected 64 lower-case hex digits (the SHA-256 of the key)"),))
            return None, KeyRecord(key_id, imported, "", now, expires_at)
        prefix = self._policy().policy.auth.api_key_prefix
        key = generate_key(prefix)
        return key, KeyRecord(key_id, key_sha256(key).hex(), key_hint(key, prefix), now, expires_at)

    async def _change(
        self, name: str, expected: int | None, actor: str, action: str, make: Mutation
    ) -> tuple[TenantRecord | None, int]:
        """The committed record (None: deleted) with its version, and the registry's version."""
        for attempt in range(ATTEMPTS):
            current = await self.registry.get(name)
            version = 0 if current is None else current.version
            if expected is not None and version != expected:
                raise _stale(name, expected, version)
            record = make(current)
            self._check(record)
            commit = _commit(name, version, current, record, actor, action, self._clock())
            try:
                committed = await self.registry.commit(commit)
            except TenantConflict as conflict:
                if conflict.kind == "key_in_use":
                    raise TenantChangeRefused(
                        "key_in_use", f"the key is already a key of tenant {conflict.detail!r}"
                    ) from None
                if expected is not None:
                    raise _stale(name, expected, conflict.current) from None
                # Another change landed first: make this one again from it.
                await asyncio.sleep(random.uniform(0, BACKOFF_SECONDS * (attempt + 1)))
                continue
            landed = None if record is None else replace(record, version=committed)
            if self._committed is not None:
                await self._committed(name, landed)
            return landed, committed
        raise TenantChangeRefused("conflict", f"tenant {name!r} kept changing under this change: retry")

    def _check(self, record: TenantRecord | None) -> None:
        """As the policy file's tenants are checked, then against this instance's file."""
        if record is None:
            return
        policy = self._policy()
        tenant, problems = check_spec(record.name, record.spec, policy.policy.plans)
        if tenant is None:
            raise _invalid(tuple((problem.path, problem.message) for problem in problems))
        keys = tuple(api_key(key) for key in record.keys)
        conflicts = policy.conflicts(replace(tenant, api_keys=keys))
        taken = [f"key {path[1]!r}: {message}" for path, message in conflicts if path[:1] == ("keys",)]
        if taken:
            raise TenantChangeRefused("key_in_use", taken[0])
        if conflicts:
            raise _invalid(tuple((format_path(path), message) for path, message in conflicts))

    def _refuse_file_tenant(self, name: str) -> None:
        found = self._policy().tenants.get(name)
        if found is not None and not found.runtime:
            raise TenantChangeRefused(
                "file_tenant", f"tenant {name!r} comes from the policy file: change it there"
            )


def _commit(
    name: str,
    version: int,
    current: TenantRecord | None,
    record: TenantRecord | None,
    actor: str,
    action: str,
    now: float,
) -> Commit:
    before = set() if current is None else current.key_hashes()
    after = set() if record is None else record.key_hashes()
    kept_ids = set() if record is None else {key.id for key in record.keys}
    changed = sorted(
        field
        for field in {*(current.spec if current else {}), *(record.spec if record else {})}
        if (current.spec if current else {}).get(field) != (record.spec if record else {}).get(field)
    )
    audit: dict[str, Any] = {
        "at": now,
        "actor": actor,
        "action": action,
        "tenant": name,
        "changed": changed,
        "before": audit_summary(current),
        "after": audit_summary(record),
    }
    return Commit(
        name,
        version,
        record,
        audit,
        added_hashes=tuple(sorted(after - before)),
        removed_hashes=tuple(sorted(before - after)),
        forgotten_keys=tuple(key.id for key in (current.keys if current else ()) if key.id not in kept_ids),
    )


def _existing(name: str, current: TenantRecord | None) -> TenantRecord:
    if current is None:
        raise TenantChangeRefused("unknown_tenant", f"no run-time tenant {name!r}")
    return current


def _usable_key(record: TenantRecord, key_id: str) -> KeyRecord:
    key = record.key(key_id)
    if key is None:
        raise TenantChangeRefused("unknown_key", f"tenant {record.name!r} has no key {key_id!r}")
    if key.revoked_at is not None:
        raise TenantChangeRefused("unknown_key", f"key {key_id!r} of tenant {record.name!r} is revoked")
    return key


def _kept_record(changed: tuple[TenantRecord | None, int]) -> TenantRecord:
    record, _ = changed
    assert record is not None  # only a deletion commits no record
    return record


def _kept(keys: tuple[KeyRecord, ...], now: float) -> tuple[KeyRecord, ...]:
    """At most MAX_KEYS, dropping the oldest revoked or expired ones first."""
    surplus = len(keys) - MAX_KEYS
    if surplus <= 0:
        return keys
    spent = sorted(
        (k for k in keys if k.revoked_at is not None or (k.expires_at is not None and k.expires_at <= now)),
        key=lambda k: k.created_at,
    )
    if len(spent) < surplus:
        raise _invalid((("keys", f"a tenant has at most {MAX_KEYS} keys: revoke some first"),))
    dropped = {k.id for k in spent[:surplus]}
    return tuple(k for k in keys if k.id not in dropped)


def _mapping(body: object, known: tuple[str, ...]) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _invalid((("", "expected a JSON object"),))
    unknown = [field for field in body if field not in known]
    if unknown:
        raise _invalid(
            tuple((str(field), f"unknown field (expected one of: {', '.join(known)})") for field in unknown)
        )
    return body


def _key_id(value: object, tenant: str) -> str:
    if value is None:
        return f"{tenant[:100]}-{secrets.token_hex(3)}"
    problem = name_problem(value) if isinstance(value, str) else "expected a string"
    if problem is not None:
        raise _invalid((("id", problem),))
    assert isinstance(value, str)
    return value


def _optional_time(fields: dict[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise _invalid(((name, str(exc)),)) from None


def _invalid(problems: tuple[tuple[str, str], ...]) -> TenantChangeRefused:
    return TenantChangeRefused("invalid_tenant", "the change is not valid; nothing was changed", problems)


def _stale(name: str, expected: int, current: int) -> TenantChangeRefused:
    return TenantChangeRefused(
        "precondition_failed",
        f"tenant {name!r} is at version {current}, not {expected} (If-Match): read it again",
        current=current,
    )
