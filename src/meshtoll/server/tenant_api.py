"""The admin API of run-time tenants and keys, of instances and of the audit log (JSON on the
admin port, behind AdminAccess): the HTTP side of meshtoll.tenants.service.

    GET    /api/tenants?limit=&cursor=&plan=&status=    file and run-time tenants, by name
    POST   /api/tenants                                 {"name", "plan", ...} -> 201
    GET    /api/tenants/{t}                             with ETag: "<version>"
    PATCH  /api/tenants/{t}                             fields to change, null removes one
    DELETE /api/tenants/{t}
    GET    /api/tenants/{t}/keys
    POST   /api/tenants/{t}/keys                        {"id"?, "expires_at"?, "sha256"?} -> 201
    PATCH  /api/tenants/{t}/keys/{id}                   {"expires_at": time | null}
    DELETE /api/tenants/{t}/keys/{id}                   revokes
    POST   /api/tenants/{t}/keys/{id}/roll              {"overlap_seconds": N} -> 201
    GET    /api/instances
    GET    /api/audit?since=&limit=

PATCH and DELETE take If-Match: a stale one gets 412 and changes nothing. Refusals are
`{"error": <stable code>, "message"}`, with `problems: [{"field", "message"}]` for
invalid_tenant.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from meshtoll.errors import StorageError, TenantChangeRefused
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.reload import PolicyHolder
from meshtoll.registry.records import TenantRecord
from meshtoll.server.admin_access import Caller
from meshtoll.tenants.documents import (
    file_tenant_document,
    key_document,
    parse_time,
    rfc3339,
    runtime_tenant_document,
)
from meshtoll.tenants.installed import InstalledTenants
from meshtoll.tenants.instances import EXPIRE_SECONDS
from meshtoll.tenants.service import TenantService
from meshtoll.transport.http_server import response

Reply = bytes | Coroutine[Any, Any, bytes]
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    503: "Service Unavailable",
}
_STATUS_OF = {
    "invalid_tenant": 400,
    "unknown_tenant": 404,
    "unknown_key": 404,
    "file_tenant": 409,
    "tenant_exists": 409,
    "key_exists": 409,
    "key_in_use": 409,
    "conflict": 409,
    "precondition_failed": 412,
}
MAX_PAGE = 1000
DEFAULT_PAGE = 100
# An audit cursor that stands for a time: every entry from that millisecond on comes after it.
_LAST_SEQUENCE = 2**64 - 1
_CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


class TenantApi:
    def __init__(
        self,
        policy: PolicyHolder,
        installed: InstalledTenants | None,
        service: TenantService | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`service` and `installed` None: no registry (several workers without Redis)."""
        self._policy = policy
        self._installed = installed
        self._service = service
        self._clock = clock
        self._names: tuple[object, list[str]] = ((), [])
        # Changes asked of this instance by outcome: committed, unavailable, or the refusal's
        # code; committed there from the start, so that the series exists before the first.
        self.writes: Counter[str] = Counter({"committed": 0})

    def handle(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, caller: Caller
    ) -> Reply | None:
        """The answer for a request of this API, or None for a path it does not serve."""
        parts = [unquote(part) for part in path.removeprefix("/api/").split("/")]
        if parts == ["instances"]:
            return self._only(method, ("GET",)) or self._instances()
        if parts == ["audit"]:
            return self._only(method, ("GET",)) or self._audit(parse_qs(query))
        if parts[0] != "tenants":
            return None
        match parts[1:], method:
            case [], "GET":
                return self._list(parse_qs(query))
            case [], "POST":
                return self._write(201, lambda service: self._create(service, body, caller))
            case [], _:
                return _method_not_allowed(("GET", "POST"))
            case [tenant], "GET":
                return self._show(tenant)
            case [tenant], "PATCH":
                return self._write(200, lambda s: self._update(s, tenant, body, headers, caller))
            case [tenant], "DELETE":
                return self._write(200, lambda s: self._delete(s, tenant, headers, caller))
            case [_], _:
                return _method_not_allowed(("GET", "PATCH", "DELETE"))
            case [tenant, "keys"], "GET":
                return self._keys(tenant)
            case [tenant, "keys"], "POST":
                return self._write(201, lambda s: self._issue(s, tenant, body, caller))
            case [_, "keys"], _:
                return _method_not_allowed(("GET", "POST"))
            case [tenant, "keys", key_id], "PATCH":
                return self._write(200, lambda s: self._update_key(s, tenant, key_id, body, caller))
            case [tenant, "keys", key_id], "DELETE":
                return self._write(200, lambda s: self._revoke(s, tenant, key_id, caller))
            case [_, "keys", _], _:
                return _method_not_allowed(("PATCH", "DELETE"))
            case [tenant, "keys", key_id, "roll"], "POST":
                return self._write(201, lambda s: self._roll(s, tenant, key_id, body, caller))
            case [_, "keys", _, "roll"], _:
                return _method_not_allowed(("POST",))
        return None

    # Changes

    async def _write(
        self, status: int, change: Callable[[TenantService], Awaitable[tuple[dict[str, Any], int | None]]]
    ) -> bytes:
        if self._service is None:
            self.writes["unavailable"] += 1
            return _unavailable("run-time tenants need a shared store: start meshtoll serve with --redis-url")
        try:
            document, etag = await change(self._service)
        except TenantChangeRefused as refused:
            self.writes[refused.code] += 1
            return _refused(refused)
        except StorageError as exc:
            self.writes["unavailable"] += 1
            return _unavailable(f"the tenant registry cannot be reached: {exc}")
        self.writes["committed"] += 1
        return _json(status, document, etag)

    async def _create(
        self, service: TenantService, body: bytes, caller: Caller
    ) -> tuple[dict[str, Any], int]:
        record = await service.create(_body(body), caller.name)
        return runtime_tenant_document(record), record.version

    async def _update(
        self, service: TenantService, tenant: str, body: bytes, headers: dict[str, str], caller: Caller
    ) -> tuple[dict[str, Any], int]:
        record = await service.update(tenant, _body(body), _if_match(headers), caller.name)
        return runtime_tenant_document(record), record.version

    async def _delete(
        self, service: TenantService, tenant: str, headers: dict[str, str], caller: Caller
    ) -> tuple[dict[str, Any], None]:
        version = await service.delete(tenant, _if_match(headers), caller.name)
        return {"deleted": tenant, "version": version}, None

    async def _issue(
        self, service: TenantService, tenant: str, body: bytes, caller: Caller
    ) -> tuple[dict[str, Any], int]:
        issued = await service.issue_key(tenant, _body(body), caller.name)
        document = {**key_document(issued.record), "key": issued.key, "version": issued.tenant.version}
        return document, issued.tenant.version

    async def _roll(
        self, service: TenantService, tenant: str, key_id: str, body: bytes, caller: Caller
    ) -> tuple[dict[str, Any], int]:
        issued = await service.roll_key(tenant, key_id, _body(body), caller.name)
        old = issued.tenant.key(key_id)
        document = {
            **key_document(issued.record),
            "key": issued.key,
            "rolled": None if old is None else key_document(old),
            "version": issued.tenant.version,
        }
        return document, issued.tenant.version

    async def _update_key(
        self, service: TenantService, tenant: str, key_id: str, body: bytes, caller: Caller
    ) -> tuple[dict[str, Any], int]:
        record = await service.update_key(tenant, key_id, _body(body), caller.name)
        key = record.key(key_id)
        assert key is not None
        return {**key_document(key), "version": record.version}, record.version

    async def _revoke(
        self, service: TenantService, tenant: str, key_id: str, caller: Caller
    ) -> tuple[dict[str, Any], int]:
        record = await service.revoke_key(tenant, key_id, caller.name)
        key = record.key(key_id)
        assert key is not None
        return {**key_document(key), "version": record.version}, record.version

    # Reads

    async def _show(self, tenant: str) -> bytes:
        compiled = self._policy.current.tenants.get(tenant)
        if compiled is not None and not compiled.runtime:
            return _json(200, file_tenant_document(compiled))
        if self._service is None:
            return _not_found(tenant)
        try:
            record = await self._service.registry.get(tenant)
            if record is None:
                return _not_found(tenant)
            use = await self._service.registry.key_use(tenant, [key.id for key in record.keys])
        except StorageError as exc:
            return _unavailable(f"the tenant registry cannot be reached: {exc}")
        return _json(200, runtime_tenant_document(record, use, self._skipped(tenant)), record.version)

    async def _keys(self, tenant: str) -> bytes:
        reply = await self._show(tenant)
        head, _, body = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return reply
        document = orjson.loads(body)
        return _json(200, {"tenant": tenant, "source": document["source"], "keys": document["keys"]})

    def _list(self, query: dict[str, list[str]]) -> bytes:
        try:
            limit = int(query.get("limit", [DEFAULT_PAGE])[0])
            after = _decode_cursor(query.get("cursor", [""])[0])
        except (ValueError, binascii.Error):
            return _error(400, "bad_query", f"limit must be 1 to {MAX_PAGE}; cursor the `next` of a page")
        if not 1 <= limit <= MAX_PAGE:
            return _error(400, "bad_query", f"limit must be 1 to {MAX_PAGE}")
        plan, status = query.get("plan", [None])[0], query.get("status", [None])[0]
        policy = self._policy.current
        records = self._installed.records if self._installed is not None else {}
        names = self._sorted_names(policy, records)
        items: list[dict[str, Any]] = []
        last = -1
        for last in range(bisect.bisect_right(names, after) if after else 0, len(names)):
            item = self._item(names[last], policy, records)
            if item is None or (plan and item["plan"] != plan) or (status and item["status"] != status):
                continue
            items.append(item)
            if len(items) == limit:
                break
        more = len(items) == limit and last < len(names) - 1
        next_cursor = _encode_cursor(items[-1]["name"]) if more else None
        version = self._installed.version if self._installed is not None else 0
        return _json(200, {"tenants": items, "next": next_cursor, "version": version})

    def _item(
        self, name: str, policy: CompiledPolicy, records: dict[str, TenantRecord]
    ) -> dict[str, Any] | None:
        compiled = policy.tenants.get(name)
        if compiled is not None and not compiled.runtime:
            return file_tenant_document(compiled)
        record = records.get(name)
        if record is None:
            return None
        document = runtime_tenant_document(record, None, self._skipped(name))
        document.pop("keys")  # the listing names tenants; /keys lists a tenant's keys
        return document

    def _sorted_names(self, policy: CompiledPolicy, records: dict[str, TenantRecord]) -> list[str]:
        # Sorting 100,000 names costs tens of milliseconds: once per policy and registry version.
        stamp = (id(policy), self._installed.version if self._installed is not None else 0, len(records))
        if self._names[0] != stamp:
            self._names = (stamp, sorted({*policy.tenants, *records}))
        return self._names[1]

    def _skipped(self, tenant: str) -> str | None:
        return None if self._installed is None else self._installed.skipped.get(tenant)

    async def _instances(self) -> bytes:
        if self._service is None:
            return _unavailable("no tenant registry: start meshtoll serve with --redis-url")
        registry = self._service.registry
        try:
            version, _ = await registry.head()
            found = await registry.instances(self._clock(), EXPIRE_SECONDS)
        except StorageError as exc:
            return _unavailable(f"the tenant registry cannot be reached: {exc}")
        instances = [
            {**i.document(), "started_at": rfc3339(i.started_at), "heard_at": rfc3339(i.heard_at)}
            for i in found
        ]
        return _json(200, {"version": version, "instances": instances})

    async def _audit(self, query: dict[str, list[str]]) -> bytes:
        if self._service is None:
            return _unavailable("no tenant registry: start meshtoll serve with --redis-url")
        since = query.get("since", [""])[0]
        try:
            limit = int(query.get("limit", [DEFAULT_PAGE])[0])
            if not 1 <= limit <= MAX_PAGE:
                raise ValueError(limit)
            if "T" in since:  # a time, not a cursor: every entry from that moment on
                since = f"{int(parse_time(since) * 1000) - 1}-{_LAST_SEQUENCE}"
            elif since and not _CURSOR.fullmatch(since):
                raise ValueError(since)
        except ValueError:
            return _error(400, "bad_query", f"since: a time (RFC 3339) or a `next`; limit: 1 to {MAX_PAGE}")
        try:
            entries, cursor = await self._service.registry.audit(since, limit)
        except StorageError as exc:
            return _unavailable(f"the tenant registry cannot be reached: {exc}")
        for entry in entries:
            entry["at"] = rfc3339(entry.get("at"))
        return _json(200, {"entries": entries, "next": cursor})

    @staticmethod
    def _only(method: str, allowed: tuple[str, ...]) -> bytes | None:
        return None if method in allowed else _method_not_allowed(allowed)


def _body(body: bytes) -> object:
    if not body.strip():
        return None
    try:
        # orjson refuses nesting beyond 1,024 levels and integers beyond 64 bits itself.
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise TenantChangeRefused(
            "invalid_tenant", "the body is not JSON", (("", f"not JSON: {str(exc)[:200]}"),)
        ) from None


def _if_match(headers: dict[str, str]) -> int | None:
    value = headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 18:
        raise TenantChangeRefused(
            "invalid_tenant",
            "If-Match is not a tenant's ETag",
            (("If-Match", f"{value[:40]!r} is not an ETag"),),
        )
    return int(text)


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> str:
    if not text:
        return ""
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True).decode()


def _json(status: int, document: dict[str, Any], etag: int | None = None) -> bytes:
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    if etag is not None:
        headers += (("etag", f'"{etag}"'),)
    return response(status, _REASONS.get(status, "Error"), headers, orjson.dumps(document))


def _error(status: int, code: str, message: str, **more: Any) -> bytes:
    return _json(status, {"error": code, "message": message, **more})


def _refused(refused: TenantChangeRefused) -> bytes:
    more: dict[str, Any] = {}
    if refused.problems:
        more["problems"] = [{"field": field, "message": message} for field, message in refused.problems]
    if refused.code == "precondition_failed":
        more["version"] = refused.current
    return _error(_STATUS_OF.get(refused.code, 409), refused.code, refused.message, **more)


def _not_found(tenant: str) -> bytes:
    return _error(404, "unknown_tenant", f"no tenant {tenant!r} in the policy file or the registry")


def _unavailable(message: str) -> bytes:
    return _error(503, "store_unavailable", message)


def _method_not_allowed(allowed: tuple[str, ...]) -> bytes:
    body = orjson.dumps({"error": "method_not_allowed", "message": f"use {', '.join(allowed)}"})
    headers = (("content-type", "application/json"), ("allow", ", ".join(allowed)))
    return response(405, "Method Not Allowed", headers, body)
