"""The usage hash of one tenant and period: the fields each request adds to it
(counter_increments, what both usage stores write) and what they say read back
(tenant_usage). One module, so the writer and the reader cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshtoll.usage.records import Source


def counter_increments(
    route: str, plan: str, status_class: str, source: Source, requests: int, units: int
) -> list[tuple[str, int]]:
    """The usage counters (hash fields) that `requests` requests of one route, plan, status
    class and source add to, with their amounts: what both usage stores write, and what
    tenant_usage below reads back. The plan is counted so that a period can be
    invoiced after its tenant has left the policy."""
    found = [
        ("requests", requests),
        ("units", units),
        (f"route:{route}:requests", requests),
        (f"route:{route}:units", units),
        (f"status:{status_class}", requests),
        (f"plan:{plan}", requests),
    ]
    if source == "admission":
        found.append(("unreconciled", requests))
    return found


@dataclass(frozen=True, slots=True)
class RouteUsage:
    route: str
    requests: int
    units: int


@dataclass(frozen=True, slots=True)
class TenantUsage:
    tenant: str
    period: str  # YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH
    requests: int = 0
    units: int = 0
    by_route: tuple[RouteUsage, ...] = ()
    by_status: dict[str, int] = field(default_factory=dict)
    unreconciled: int = 0
    by_plan: dict[str, int] = field(default_factory=dict)  # requests per plan they were admitted on


def tenant_usage(tenant: str, period: str, fields: dict[str, int]) -> TenantUsage:
    routes: dict[str, dict[str, int]] = {}
    statuses: dict[str, int] = {}
    plans: dict[str, int] = {}
    for name, value in fields.items():
        if name.startswith("route:"):
            route, _, what = name[6:].rpartition(":")
            routes.setdefault(route, {})[what] = value
        elif name.startswith("status:"):
            statuses[name[7:]] = value
        elif name.startswith("plan:"):
            plans[name[5:]] = value
    by_route = tuple(
        RouteUsage(route, counts.get("requests", 0), counts.get("units", 0))
        for route, counts in sorted(routes.items())
    )
    return TenantUsage(
        tenant,
        period,
        fields.get("requests", 0),
        fields.get("units", 0),
        by_route,
        statuses,
        fields.get("unreconciled", 0),
        plans,
    )
