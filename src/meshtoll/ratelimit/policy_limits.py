"""The counter checks the tenant policy asks for on a request, built once per (tenant, route).

Keys carry the tenant as a Redis hash tag, so that every check of one decision lives on one
shard of a Redis Cluster and one Lua call can take them all.
"""

from __future__ import annotations

from meshtoll.policy import CompiledPolicy
from meshtoll.policy.model import Route, Tenant
from meshtoll.ratelimit.limits import Check, RateLimit

CACHE_LIMIT = 100_000


def counter_key(tenant: str, scope: str, limit: RateLimit) -> str:
    return f"meshtoll_{{{tenant}}}_{scope}_{limit.name}"


class PolicyLimits:
    """One per policy version; the checks of each (tenant, route) are built on first use."""

    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self._routes = {route.name: route for route in policy.policy.routes}
        self._cache: dict[tuple[str, str, str], tuple[Check, ...]] = {}

    def route(self, name: str) -> Route | None:
        return self._routes.get(name)

    def enforced_in(self, route: str) -> str:
        found = self._routes.get(route)
        default = self.policy.policy.ratelimit.enforced_in
        return default if found is None or found.enforced_in is None else found.enforced_in

    def checks(self, tenant: str, route: str, *, where: str) -> tuple[Check, ...]:
        """The checks of a request of `tenant` on `route` (a route name, or "") when the
        limits are enforced `where` ("authz" or "service"); none when they are enforced
        elsewhere, so that no request is ever counted twice."""
        key = (tenant, route, where)
        found = self._cache.get(key)
        if found is None:
            found = self._build(tenant, route) if self.enforced_in(route) == where else ()
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def tenant_checks(self, tenant: str) -> tuple[Check, ...]:
        """The tenant's own limits alone (plan or override): what `quota show` reports."""
        compiled = self.policy.tenants.get(tenant)
        if compiled is None:
            return ()
        return tuple(
            Check(counter_key(tenant, "tenant", limit), limit)
            for limit in _tenant_limits(self.policy, compiled.tenant)
        )

    def route_checks(self, tenant: str) -> tuple[tuple[str, Check], ...]:
        """(route name, check) for every route limit of the tenant."""
        return tuple(
            (route.name, Check(counter_key(tenant, f"route_{route.name}", limit), limit))
            for route in self.policy.policy.routes
            for limit in route.limits
        )

    def _build(self, tenant: str, route: str) -> tuple[Check, ...]:
        own = self.tenant_checks(tenant)
        found = self._routes.get(route)
        if found is None or not found.limits:
            return own
        return own + tuple(
            Check(counter_key(tenant, f"route_{route}", limit), limit) for limit in found.limits
        )


def _tenant_limits(policy: CompiledPolicy, tenant: Tenant) -> tuple[RateLimit, ...]:
    if tenant.limits is not None:
        return tenant.limits
    plan = policy.policy.plans.get(tenant.plan)
    return () if plan is None else plan.limits
