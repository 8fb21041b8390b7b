"""The admin HTTP port: liveness, readiness and the state of the policy; tenants' data
(everything but the probes and metrics) only to whom `AdminAccess` lets in."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from meshtoll.counting.store import CounterStore
from meshtoll.errors import BadPeriod, NotBillable, StorageError, UnknownTenant
from meshtoll.meter.billing import invoice_document, tenant_invoice
from meshtoll.meter.billing_periods import read_period
from meshtoll.meter.usage_report import usage_document
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.quota import tenant_quota
from meshtoll.server.admin_access import OPEN_PATHS, AdminAccess
from meshtoll.server.admin_sinks import answer_sink_path, is_sink_path
from meshtoll.server.dashboard import Dashboard, serves
from meshtoll.server.dashboard_data import policy_document
from meshtoll.server.tenant_api import TenantApi
from meshtoll.sinks.state import SinkStateStore
from meshtoll.telemetry.metrics import Metrics
from meshtoll.transport.http_server import BodyHandler, response
from meshtoll.usage.store import UsageStore

if TYPE_CHECKING:
    from meshtoll.policy import CompiledPolicy

    # (usage store, policy, tenant, period as the query gave it, None when it gave none)
    Report = Callable[[UsageStore, CompiledPolicy, str, str | None], Awaitable[dict[str, Any]]]

_JSON = (("content-type", "application/json"),)
_NOT_FOUND = response(404, "Not Found", _JSON, b'{"error":"not_found","message":"no such admin endpoint"}')
_NOT_READY = response(
    503,
    "Service Unavailable",
    _JSON,
    b'{"error":"not_ready","message":"the policy is not loaded yet"}',
)
_HEALTHY = response(200, "OK", _JSON, b'{"status":"ok"}')
REDIS_PROBE_SECONDS = 2.0


class StoreProbe:
    """Keeps the admin port's view of Redis current; readiness does not depend on it, since
    what a dead Redis means is the configured failure policy."""

    def __init__(self, store: CounterStore | None) -> None:
        self._store = store
        self.reachable: bool | None = None  # None: no Redis configured

    async def run_forever(self) -> None:
        while self._store is not None:
            self.reachable = await self._store.ping()
            await asyncio.sleep(REDIS_PROBE_SECONDS)


def while_starting(method: str, target: str, headers: dict[str, str], peer: str, body: bytes) -> bytes:
    """The admin port before the policy has loaded: alive, not ready, nothing else yet."""
    return _HEALTHY if target.partition("?")[0] == "/healthz" else _NOT_READY


class AdminPort:
    """The admin port's handler from the moment it listens: `while_starting` until the
    services are built, then theirs."""

    def __init__(self) -> None:
        self._handler: BodyHandler = while_starting

    def ready(self, handler: BodyHandler) -> None:
        self._handler = handler

    def __call__(
        self, method: str, target: str, headers: dict[str, str], peer: str, body: bytes
    ) -> bytes | Awaitable[bytes]:
        return self._handler(method, target, headers, peer, body)


class AdminHandler:
    def __init__(
        self,
        access: AdminAccess,
        metrics: Metrics,
        policy: PolicyHolder,
        store: CounterStore,
        usage: UsageStore,
        probe: StoreProbe,
        *,
        tenants: TenantApi | None = None,
        tenants_loaded: Callable[[], bool] = lambda: True,
        sink_state: SinkStateStore | None = None,
        dashboard: Dashboard | None = None,
    ) -> None:
        """`tenants`: the run-time tenants' API; `tenants_loaded`: whether they are in place
        (the instance is not ready before); `sink_state`: the billing sinks' quarantine;
        `dashboard`: the pages on `/` and their JSON API."""
        self.access = access
        self.metrics = metrics
        self.policy = policy
        self.store = store
        self.usage = usage
        self.probe = probe
        self.tenants = tenants
        self.tenants_loaded = tenants_loaded
        self.sink_state = sink_state
        self.dashboard = dashboard

    def __call__(
        self, method: str, target: str, headers: dict[str, str], peer: str, body: bytes = b""
    ) -> bytes | Awaitable[bytes]:
        path, _, query = target.partition("?")
        if self.dashboard is not None and serves(path):
            return self.dashboard(method, target, headers, peer, body)  # its own sessions
        # Deny by default: any path but the open ones, known or not, needs access first.
        if path not in OPEN_PATHS:
            caller = self.access.caller(method, headers, peer)
            if isinstance(caller, bytes):
                return caller
            if (
                self.dashboard is not None
                and (answer := self.dashboard.api(method, path, query, caller)) is not None
            ):
                return answer
            if self.tenants is not None and not _report_path(path):
                handled = self.tenants.handle(method, path, query, headers, body, caller)
                if handled is not None:
                    return handled
        if is_sink_path(path) and self.sink_state is not None:
            return answer_sink_path(self.sink_state, method, target)
        if path.startswith("/api/tenants/") and path.endswith("/quota"):
            return self._quota(path.removeprefix("/api/tenants/").removesuffix("/quota"))
        for report, build in (("usage", self._usage_document), ("invoice", self._invoice_document)):
            if path.startswith("/api/tenants/") and path.endswith(f"/{report}"):
                period = parse_qs(target.partition("?")[2]).get("period", [None])[0]
                tenant = path.removeprefix("/api/tenants/").removesuffix(f"/{report}")
                return self._tenant_report(tenant, period, build)
        if path == "/metrics":
            # Prometheus text by default, OpenMetrics when the scraper asks for it.
            exposition, content_type = self.metrics.exposition(headers.get("accept", ""))
            return response(200, "OK", (("content-type", content_type),), exposition)
        return self._answer(path)

    def _answer(self, path: str) -> bytes:
        if path == "/healthz":
            return _HEALTHY
        if path == "/readyz":
            return self._ready()
        if path == "/api/policy":
            return _json(200, policy_document(self.policy))
        return _NOT_FOUND

    async def _quota(self, tenant: str) -> bytes:
        try:
            quota = await tenant_quota(self.policy.current, self.store, tenant, time.time())
        except UnknownTenant:
            return _json(404, {"error": "unknown_tenant", "message": f"no tenant {tenant!r} in the policy"})
        except StorageError as exc:
            return _json(503, {"error": "store_unavailable", "message": str(exc)})
        return _json(200, quota)

    async def _tenant_report(self, tenant: str, period: str | None, build: Report) -> bytes:
        try:
            # A tenant that has left the policy still has its usage and owes its invoice.
            if tenant not in self.policy.current.tenants and not await self.usage.has_usage(tenant):
                message = f"no tenant {tenant!r} in the policy or in the usage store"
                return _json(404, {"error": "unknown_tenant", "message": message})
            return _json(200, await build(self.usage, self.policy.current, tenant, period))
        except BadPeriod as exc:
            return _json(400, {"error": "bad_period", "message": f"period {exc}"})
        except NotBillable as exc:
            return _json(404, {"error": "not_billable", "message": str(exc)})
        except StorageError as exc:
            return _json(503, {"error": "store_unavailable", "message": str(exc)})

    @staticmethod
    async def _usage_document(
        usage: UsageStore, policy: CompiledPolicy, tenant: str, period: str | None
    ) -> dict[str, Any]:
        return usage_document(await usage.usage(tenant, read_period(period, "month")))

    @staticmethod
    async def _invoice_document(
        usage: UsageStore, policy: CompiledPolicy, tenant: str, period: str | None
    ) -> dict[str, Any]:
        return invoice_document(await tenant_invoice(policy, usage, tenant, period))

    def _ready(self) -> bytes:
        if not self.tenants_loaded():
            # Serving without them would refuse every run-time tenant's requests with 401.
            return _json(503, {"error": "not_ready", "message": "the run-time tenants are not loaded yet"})
        document: dict[str, object] = {"status": "ready", "policy_version": self.policy.version}
        if self.probe.reachable is not None:
            document["redis"] = "ok" if self.probe.reachable else "unreachable"
        return _json(200, document)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
_REPORTS = ("/quota", "/usage", "/invoice")


def _report_path(path: str) -> bool:
    """A tenant's quota, usage or invoice: read from the counters and the usage store, for
    any tenant name (one that has left the policy still has usage)."""
    return path.startswith("/api/tenants/") and path.endswith(_REPORTS) and path.count("/") == 4


def _json(status: int, document: dict[str, object]) -> bytes:
    return response(status, _REASONS.get(status, "Error"), _JSON, json.dumps(document).encode())
