"""What the dashboard's pages show, as JSON documents: the overview, a tenant, the policy, a
tenant's daily usage and recent refusals. The JSON API serves these documents and the pages
are rendered from them, so the numbers cannot differ; each is assembled from the functions
the rest of the admin API and the command line use (the tenant API, `tenant_quota`,
`usage_document`, `tenant_invoice`), never from a second reading of the stores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import orjson

from meshtoll.counting.store import CounterStore
from meshtoll.errors import NotBillable, StorageError, UnknownTenant
from meshtoll.meter.billing import invoice_document, tenant_invoice
from meshtoll.meter.usage_report import usage_document
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.quota import tenant_quota
from meshtoll.server.admin_access import Caller
from meshtoll.server.tenant_api import Reply, TenantApi
from meshtoll.server.traffic import Traffic
from meshtoll.telemetry.recent_denials import RecentDenials
from meshtoll.tenants.documents import rfc3339
from meshtoll.usage.store import UsageStore

T = TypeVar("T")
OVERVIEW_PAGE = 50
DAYS = 30
TOP_ROUTES = 10
# Longer periods first: a tenant's quota is the tenant-wide limit of the longest period.
_PERIOD_ORDER = ("year", "month", "week", "day", "hour", "minute", "second")


class DashboardData:
    def __init__(
        self,
        policy: PolicyHolder,
        store: CounterStore,
        usage: UsageStore,
        api: TenantApi,
        denials: RecentDenials,
        traffic: Traffic,
        redis_reachable: Callable[[], bool | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._store = store
        self._usage = usage
        self._api = api
        self._denials = denials
        self._traffic = traffic
        self._redis_reachable = redis_reachable
        self._clock = clock

    async def overview(self, cursor: str, caller: Caller) -> dict[str, Any]:
        query = urlencode({"limit": OVERVIEW_PAGE, **({"cursor": cursor} if cursor else {})})
        status, listing = await api_document(self._api.handle("GET", "/api/tenants", query, {}, b"", caller))
        if status != 200:
            raise ValueError(listing.get("message", "bad cursor"))
        month = self._period("%Y-%m")
        rows = await asyncio.gather(*(self._tenant_row(item, month) for item in listing["tenants"]))
        _, instances = await api_document(self._api.handle("GET", "/api/instances", "", {}, b"", caller))
        reachable = self._redis_reachable()
        return {
            "traffic": self._traffic.figures(),
            "redis": None if reachable is None else ("ok" if reachable else "unreachable"),
            "policy_version": self._policy.version,
            "tenants_version": listing["version"],
            "instances": instances.get("instances"),
            "reconcile_backlog": await _or_none(self._usage.backlog()),
            "period": month,
            "tenants": rows,
            "next": listing["next"],
        }

    async def tenant(self, name: str, caller: Caller) -> dict[str, Any] | None:
        """The tenant page's document; None for a tenant neither the file nor the registry has."""
        path = f"/api/tenants/{quote(name, safe='')}"
        status, shown = await api_document(self._api.handle("GET", path, "", {}, b"", caller))
        if status == 404:
            return None
        month = self._period("%Y-%m")
        usage, quota, daily, invoice = await asyncio.gather(
            _or_none(self._usage.usage(name, month)),
            self._quota(name),
            self.daily_usage(name, DAYS),
            self._invoice(name),
        )
        document = None if usage is None else usage_document(usage)
        routes = [] if document is None else document["by_route"]
        return {
            "tenant": shown if status == 200 else {"name": name, "error": shown.get("message")},
            "period": month,
            "usage": document,
            "quota": None if quota is None else quota_of(quota["limits"]),
            "limits": None if quota is None else quota["limits"],
            "daily": daily["days"],
            "top_routes": sorted(routes, key=lambda r: (-r["requests"], r["route"]))[:TOP_ROUTES],
            "denials": self.denials(name)["denials"],
            "keys": shown.get("keys", []),
            "invoice": invoice,
        }

    def plans(self) -> list[str]:
        return list(self._policy.current.policy.plans)

    def policy(self) -> dict[str, Any]:
        return policy_document(self._policy)

    async def daily_usage(self, name: str, days: int) -> dict[str, Any]:
        """Requests and units per UTC day, oldest first, from the usage store's daily
        counters (one read per day; a day the store cannot answer for is null)."""
        now = self._clock()
        backwards = range(days - 1, -1, -1)
        dates = [time.strftime("%Y-%m-%d", time.gmtime(now - back * 86400)) for back in backwards]
        found = await asyncio.gather(*(_or_none(self._usage.usage(name, date)) for date in dates))
        return {
            "tenant": name,
            "days": [
                {
                    "date": date,
                    "requests": None if usage is None else usage.requests,
                    "units": None if usage is None else usage.units,
                }
                for date, usage in zip(dates, found, strict=True)
            ],
        }

    def denials(self, name: str) -> dict[str, Any]:
        return {
            "tenant": name,
            "denials": [
                {"at": rfc3339(d.at), "route": d.route, "code": d.code, "message": d.message}
                for d in self._denials.of(name)
            ],
        }

    async def _tenant_row(self, item: dict[str, Any], month: str) -> dict[str, Any]:
        name = item["name"]
        usage, quota = await asyncio.gather(_or_none(self._usage.usage(name, month)), self._quota(name))
        return {
            "name": name,
            "source": item["source"],
            "plan": item["plan"],
            "status": item["status"],
            "requests": None if usage is None else usage.requests,
            "units": None if usage is None else usage.units,
            "quota": None if quota is None else quota_of(quota["limits"]),
        }

    async def _quota(self, name: str) -> dict[str, Any] | None:
        try:
            return await tenant_quota(self._policy.current, self._store, name, self._clock())
        except (UnknownTenant, StorageError):
            return None  # not served by this instance, or the counters cannot be read now

    async def _invoice(self, name: str) -> dict[str, Any]:
        try:
            bill = await tenant_invoice(self._policy.current, self._usage, name, None)
        except NotBillable as exc:
            return {"error": "not_billable", "message": str(exc)}
        except StorageError as exc:
            return {"error": "store_unavailable", "message": str(exc)}
        return invoice_document(bill)

    def _period(self, form: str) -> str:
        return time.strftime(form, time.gmtime(self._clock()))


def policy_document(holder: PolicyHolder) -> dict[str, Any]:
    """What `GET /api/policy` serves and the policy page shows: the active version, where it
    came from and when, and the last version rejected with its located problems."""
    current = holder.current.policy
    rejection = holder.last_rejection
    return {
        "file": current.source,
        "version": holder.version,
        "loaded_at": rfc3339(holder.loaded_at),
        "rejected_versions": holder.rejected_versions,
        "last_rejection": None
        if rejection is None
        else {
            "at": rfc3339(rejection.at),
            "problems": [
                {"file": p.file, "line": p.line, "path": p.path, "message": p.message}
                for p in rejection.problems
            ],
        },
        "plans": len(current.plans),
        "tenants": len(current.tenants),
        "routes": len(current.routes),
    }


def quota_of(limits: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tenant-wide limit of the longest period (a monthly quota before a per-second
    rate), with its use: what the overview and the tenant page draw as the quota bar."""
    tenant_wide = [limit for limit in limits if limit["scope"] == "tenant"]
    if not tenant_wide:
        return None
    rank = {period: index for index, period in enumerate(_PERIOD_ORDER)}
    chosen = min(tenant_wide, key=lambda limit: rank.get(limit["per"], len(rank)))
    return {key: chosen[key] for key in ("name", "limit", "per", "used", "remaining")}


async def api_document(reply: Reply | None) -> tuple[int, dict[str, Any]]:
    """The status and JSON document of an answer of the tenant API (None: a path it does
    not serve, which the dashboard never asks for)."""
    if reply is None:
        return 404, {"error": "not_found", "message": "no such admin endpoint"}
    answer = reply if isinstance(reply, bytes) else await reply
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    document = orjson.loads(body) if body else {}
    return status, document if isinstance(document, dict) else {}


async def _or_none(awaitable: Awaitable[T]) -> T | None:
    try:
        return await awaitable
    except StorageError:
        return None
