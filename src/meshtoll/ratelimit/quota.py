"""A tenant's limits with their current use: what `meshtoll quota show` prints and the admin
port's `/api/tenants/{tenant}/quota` serves. Looking never consumes (every check costs 0)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from meshtoll.counting.limits import Check
from meshtoll.errors import UnknownTenant
from meshtoll.policy import CompiledPolicy

if TYPE_CHECKING:
    from meshtoll.counting.store import CounterStore


async def tenant_quota(
    policy: CompiledPolicy, store: CounterStore, tenant: str, now: float
) -> dict[str, Any]:
    if tenant not in policy.tenants:
        raise UnknownTenant(tenant)
    limits = policy.limits
    scoped = [("tenant", check) for check in limits.tenant_checks(tenant)]
    scoped += [(f"route:{route}", check) for route, check in limits.route_checks(tenant)]
    peeks = [Check(check.key, check.limit, cost=0) for _, check in scoped]
    results = await store.check(peeks, now) if peeks else []
    return {
        "tenant": tenant,
        "plan": policy.tenants[tenant].tenant.plan,
        "limits": [
            {
                "name": check.limit.name,
                "scope": scope,
                "algorithm": check.limit.algorithm,
                "limit": check.limit.capacity,
                "per": check.limit.period,
                "used": result.used,
                "remaining": result.remaining,
                "reset_seconds": math.ceil(result.reset_seconds),
                "shadow": check.limit.shadow,
            }
            for (scope, check), result in zip(scoped, results, strict=True)
        ],
    }


def quota_table(quota: dict[str, Any]) -> str:
    header = ("limit", "scope", "algorithm", "used", "remaining", "of", "per", "resets in")
    rows = [
        (
            entry["name"] + (" (shadow)" if entry["shadow"] else ""),
            entry["scope"],
            entry["algorithm"],
            str(entry["used"]),
            str(entry["remaining"]),
            str(entry["limit"]),
            entry["per"],
            f"{entry['reset_seconds']}s",
        )
        for entry in quota["limits"]
    ]
    if not rows:
        return f"tenant {quota['tenant']} (plan {quota['plan']}): no limits"
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [f"tenant {quota['tenant']} (plan {quota['plan']})"]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)
