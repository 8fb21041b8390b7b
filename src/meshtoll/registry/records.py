"""Run-time tenants as the registry stores them: plain values, encoded as JSON by meshtoll
alone (a client's text never reaches the store unparsed).

A tenant record holds its `spec`, the tenant's fields exactly as a policy file writes them
(plan, status, allow, limits, jwt, mtls, billing, ...) without `api_keys`, and its keys as
`KeyRecord`s: the SHA-256 of each key, never the key. The spec is validated by the policy's
own schema wherever it is read (meshtoll.policy.runtime), so that the store carries no second
list of tenant fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    sha256: str  # 64 lower-case hex digits
    hint: str  # what listings show of the key: its prefix and first characters ("" if imported)
    created_at: float
    expires_at: float | None = None  # refused from then on (a roll's overlap ends here)
    revoked_at: float | None = None  # refused from then on, with revoked_api_key

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "hint": self.hint,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    spec: dict[str, Any]
    keys: tuple[KeyRecord, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0  # assigned by the store when the record is committed; 0: never committed

    def key(self, key_id: str) -> KeyRecord | None:
        return next((key for key in self.keys if key.id == key_id), None)

    def key_hashes(self) -> frozenset[str]:
        return frozenset(key.sha256 for key in self.keys)

    def encode(self) -> bytes:
        """The stored JSON document without its version: the store splices the version in
        as the first field when it commits (see storage/lua/registry.lua)."""
        return orjson.dumps(
            {
                "name": self.name,
                "spec": self.spec,
                "keys": [key.document() for key in self.keys],
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            }
        )


def with_version(document: bytes, version: int) -> bytes:
    """A document as `encode` made it, with `"version": N` as its first field."""
    return b'{"version":%d,%s' % (version, document[1:])


def decode_record(data: bytes | str) -> TenantRecord:
    """A stored document back into a record; ValueError, saying what, when it is not one
    meshtoll wrote (a store edited by hand must not take an instance down)."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        keys = tuple(_key(item) for item in raw.get("keys", ()))
        name, spec, version = raw["name"], raw["spec"], raw["version"]
        if not isinstance(name, str) or not isinstance(spec, dict) or type(version) is not int:
            raise TypeError("name, spec or version of the wrong type")
        return TenantRecord(name, spec, keys, float(raw["created_at"]), float(raw["updated_at"]), version)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a tenant record: {exc!r}") from None


def _key(raw: object) -> KeyRecord:
    if not isinstance(raw, dict):
        raise TypeError("a key that is not an object")
    expires, revoked = raw.get("expires_at"), raw.get("revoked_at")
    return KeyRecord(
        str(raw["id"]),
        str(raw["sha256"]),
        str(raw.get("hint", "")),
        float(raw["created_at"]),
        None if expires is None else float(expires),
        None if revoked is None else float(revoked),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change: the registry's version after it, and the tenant it touched.
    Instances read the tenant's record again rather than trusting a copy in the change, so
    that applying changes twice or out of date does no harm."""

    version: int
    tenant: str
    cursor: str  # where the change sits in the store's change log (opaque)


@dataclass(frozen=True, slots=True)
class Commit:
    """A change to one tenant, applied whole or not at all.

    `expected`: the tenant's version the change was made from (0: the tenant must not exist);
    `record`: the new record, None to delete the tenant; `audit`: what the audit log keeps of
    the change (never a key, never a key's hash)."""

    tenant: str
    expected: int
    record: TenantRecord | None
    audit: dict[str, Any]
    # Key hashes the record gains (checked against every other run-time tenant) and loses.
    added_hashes: tuple[str, ...] = ()
    removed_hashes: tuple[str, ...] = ()
    # Key ids whose last-used times go with the change (a revoked or deleted tenant's keys).
    forgotten_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every record, and the change log's position they are at least as new as: applying the
    changes after `cursor` brings them up to date."""

    version: int
    cursor: str
    records: list[TenantRecord]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (tenant, why)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A running meshtoll process as it reports itself."""

    id: str
    host: str
    pid: int
    started_at: float
    version: int  # the registry version it has applied
    heard_at: float
    skipped: int = 0  # run-time tenants it does not serve (they conflict with its policy file)

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "version": self.version,
            "heard_at": self.heard_at,
            "skipped_tenants": self.skipped,
        }


def decode_instance(data: bytes | str) -> InstanceRecord:
    raw = orjson.loads(data)
    return InstanceRecord(
        str(raw["id"]),
        str(raw["host"]),
        int(raw["pid"]),
        float(raw["started_at"]),
        int(raw["version"]),
        float(raw["heard_at"]),
        int(raw.get("skipped_tenants", 0)),
    )
