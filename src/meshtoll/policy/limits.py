"""The counter checks the tenant policy asks for on a request, built once per (tenant, route).

Keys carry the tenant as a Redis hash tag, so that every check of one decision lives on one
shard of a Redis Cluster and one Lua call can take them all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Protocol

from meshtoll.counting.limits import Check, RateLimit
from meshtoll.keys import counter_key
from meshtoll.policy.model import Policy, Route, Tenant


class HasTenant(Protocol):
    """A compiled tenant, as far as limits care (policy.compiled.CompiledTenant)."""

    @property
    def tenant(self) -> Tenant: ...


CACHE_LIMIT = 100_000


class PolicyLimits:
    """One per policy version, part of its CompiledPolicy; the checks of each (tenant, route)
    are built on first use, and a run-time tenant's dropped when it changes (`forget`)."""

    def __init__(self, policy: Policy, tenants: Mapping[str, HasTenant]) -> None:
        """`tenants`: the compiled policy's own index, run-time tenants included."""
        self.policy = policy
        self._tenants = tenants
        self._routes = {route.name: route for route in policy.routes}
        self._cache: dict[tuple[str, str, str], tuple[Check, ...]] = {}
        # The cache's keys of each tenant, so that forgetting one costs its own entries only.
        self._cached_for: dict[str, list[tuple[str, str, str]]] = {}

    def route(self, name: str) -> Route | None:
        return self._routes.get(name)

    def enforced_in(self, route: str) -> str:
        found = self._routes.get(route)
        default = self.policy.ratelimit.enforced_in
        return default if found is None or found.enforced_in is None else found.enforced_in

    def checks(self, tenant: str, route: str, *, where: str) -> tuple[Check, ...]:
        """The checks of a request of `tenant` on `route` (a route name, or "") when the
        limits are enforced `where` ("authz" or "service"); none when they are enforced
        elsewhere, so that no request is ever counted twice.

        A limit on requests costs 1. A limit on units costs the route's cost, or nothing
        yet on a route whose units are read from the response body: the request only
        looks (is anything left?) and `charges` consumes the units once they are known."""
        key = (tenant, route, where)
        found = self._cache.get(key)
        if found is None:
            found = self._build(tenant, route) if self.enforced_in(route) == where else ()
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
                self._cached_for.clear()
            self._cache[key] = found
            self._cached_for.setdefault(tenant, []).append(key)
        return found

    def forget(self, tenant: str) -> None:
        """Drop the checks built for `tenant`: its limits (its plan, its overrides) changed."""
        for key in self._cached_for.pop(tenant, ()):
            self._cache.pop(key, None)

    def charges(self, tenant: str, route: str, units: int, *, where: str) -> tuple[Check, ...]:
        """The units a finished request used, against the unit limits that looked before it
        ran. Always consumed, even past the limit: the response has been served, and the
        overdraft is what refuses the tenant's next request."""
        if units <= 0:
            return ()
        return tuple(
            Check(check.key, _forced(check.limit), units)
            for check in self.checks(tenant, route, where=where)
            if check.limit.counts == "units"
        )

    def tenant_checks(self, tenant: str) -> tuple[Check, ...]:
        """The tenant's own limits alone (plan or override): what `quota show` reports."""
        found = self._tenants.get(tenant)
        if found is None:
            return ()
        return tuple(
            Check(counter_key(tenant, "tenant", limit), limit)
            for limit in _tenant_limits(self.policy, found.tenant)
        )

    def route_checks(self, tenant: str) -> tuple[tuple[str, Check], ...]:
        """(route name, check) for every route limit of the tenant."""
        return tuple(
            (route.name, Check(counter_key(tenant, f"route_{route.name}", limit), limit))
            for route in self.policy.routes
            for limit in route.limits
        )

    def _build(self, tenant: str, route: str) -> tuple[Check, ...]:
        found = self._routes.get(route)
        own = tuple(
            Check(check.key, check.limit, _cost(check.limit, found)) for check in self.tenant_checks(tenant)
        )
        if found is None or not found.limits:
            return own
        return own + tuple(
            Check(counter_key(tenant, f"route_{route}", limit), limit, _cost(limit, found))
            for limit in found.limits
        )


def _cost(limit: RateLimit, route: Route | None) -> int:
    if limit.counts == "requests":
        return 1
    if route is None:
        return 1  # a request outside every policy route bills 1 unit
    if route.hooks is not None and route.hooks.usage_from_body is not None:
        return 0
    return route.cost


@functools.cache
def _forced(limit: RateLimit) -> RateLimit:
    # A shadow limit never refuses and is always counted: exactly what a charge needs.
    return dataclasses.replace(limit, shadow=True)


def _tenant_limits(policy: Policy, tenant: Tenant) -> tuple[RateLimit, ...]:
    if tenant.limits is not None:
        return tenant.limits
    plan = policy.plans.get(tenant.plan)
    return () if plan is None else plan.limits
