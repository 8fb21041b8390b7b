"""Usage as people and APIs read it: the admin port's JSON and `meshtoll usage show`."""

from __future__ import annotations

from typing import Any

from meshtoll.usage.tallies import TenantUsage


def usage_document(usage: TenantUsage) -> dict[str, Any]:
    return {
        "tenant": usage.tenant,
        "period": usage.period,
        "requests": usage.requests,
        "units": usage.units,
        "by_route": [{"route": r.route, "requests": r.requests, "units": r.units} for r in usage.by_route],
        "by_status": usage.by_status,
        "unreconciled": usage.unreconciled,
    }


def usage_table(usage: TenantUsage) -> str:
    lines = [
        f"tenant {usage.tenant}, {usage.period}: {usage.requests} requests, {usage.units} units"
        + (f", {usage.unreconciled} unreconciled" if usage.unreconciled else "")
    ]
    width = max([len(r.route or "(no route)") for r in usage.by_route] + [5])
    lines += [f"  {'route'.ljust(width)}  requests  units"]
    lines += [
        f"  {(r.route or '(no route)').ljust(width)}  {r.requests:>8}  {r.units:>5}" for r in usage.by_route
    ]
    return "\n".join(lines)
