"""Run-time and file tenants and keys as the admin API and the command line show them: JSON
documents with times in RFC 3339, never a key, never a key's hash."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meshtoll.policy import CompiledTenant
from meshtoll.registry.records import KeyRecord, TenantRecord


def rfc3339(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: object) -> float:
    """An RFC 3339 time with its offset ("2026-12-31T23:59:59Z"); ValueError otherwise."""
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError("expected an RFC 3339 time such as 2026-12-31T23:59:59Z")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time such as 2026-12-31T23:59:59Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z (UTC) or an offset")
    return moment.timestamp()


def key_document(key: KeyRecord, last_used_minute: int | None = None) -> dict[str, Any]:
    return {
        "id": key.id,
        "hint": key.hint,
        "created_at": rfc3339(key.created_at),
        "expires_at": rfc3339(key.expires_at),
        "revoked_at": rfc3339(key.revoked_at),
        "last_used_at": rfc3339(None if last_used_minute is None else last_used_minute * 60.0),
    }


def runtime_tenant_document(
    record: TenantRecord, key_use: dict[str, int] | None = None, skipped: str | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": record.name,
        "source": "runtime",
        "version": record.version,
        **record.spec,
        "status": record.spec.get("status", "active"),
        "keys": [key_document(key, (key_use or {}).get(key.id)) for key in record.keys],
        "created_at": rfc3339(record.created_at),
        "updated_at": rfc3339(record.updated_at),
    }
    if skipped is not None:
        document["not_served"] = skipped  # this instance's policy file conflicts with it
    return document


def file_tenant_document(compiled: CompiledTenant) -> dict[str, Any]:
    tenant = compiled.tenant
    return {
        "name": tenant.name,
        "source": "file",
        "plan": tenant.plan,
        "status": tenant.status,
        "keys": [{"id": key.id, "revoked": key.revoked} for key in tenant.api_keys],
    }


def audit_summary(record: TenantRecord | None) -> dict[str, Any] | None:
    """What the audit log keeps of a tenant: its fields and its keys' metadata."""
    if record is None:
        return None
    keys = [
        {name: value for name, value in key.document().items() if name != "sha256"} for key in record.keys
    ]
    return {"spec": record.spec, "keys": keys}
