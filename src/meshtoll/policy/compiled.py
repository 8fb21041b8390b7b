"""Compile a validated Policy into the indexes decisions use: every lookup is a dict hit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import jwt

from meshtoll.policy.billing import PolicyBillingNames
from meshtoll.policy.document import Document
from meshtoll.policy.limits import PolicyLimits
from meshtoll.policy.model import ApiKey, Policy, Route, RouteRule, Tenant

T = TypeVar("T")


class PathMatcher(Generic[T]):
    """Exact and longest-prefix path matching without scanning the rules.

    Prefixes are grouped by length, so a lookup costs one dict probe per distinct prefix
    length (a handful), however many rules there are.
    """

    def __init__(self, rules: Iterable[tuple[RouteRule, T]]) -> None:
        self._exact: dict[str, list[T]] = {}
        self._prefix: dict[str, list[T]] = {}
        for rule, value in rules:
            table = self._exact if rule.exact else self._prefix
            table.setdefault(rule.path, []).append(value)
        self._lengths = sorted({len(prefix) for prefix in self._prefix}, reverse=True)

    def match(self, path: str) -> list[T]:
        """Values of the most specific rule matching `path`: exact first, then longest prefix.

        `path` must be normalised (meshtoll.authz.request_path): matched raw, `/v1/public/../x`
        would match the prefix `/v1/public/` and `/v1//x` would miss `/v1/x`.
        """
        found = self._exact.get(path)
        if found is not None:
            return found
        for length in self._lengths:
            if length <= len(path):
                found = self._prefix.get(path[:length])
                if found is not None:
                    return found
        return []


@dataclass(frozen=True, slots=True)
class CompiledTenant:
    tenant: Tenant
    # Routes the tenant may call: None means every route.
    routes: PathMatcher[frozenset[str]] | None
    # The tenant's plan lets its API keys go on to the upstream (plan.forward_credentials).
    forwards_credentials: bool = False

    @property
    def name(self) -> str:
        return self.tenant.name


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: CompiledTenant
    key: ApiKey


class CompiledPolicy:
    """A policy plus its lookup indexes; immutable once built, shared by every decision."""

    def __init__(self, policy: Policy, document: Document) -> None:
        self.policy = policy
        # Tested before any lookup: a key with this prefix and a bad checksum is refused.
        self.key_prefix = f"{policy.auth.api_key_prefix}_"
        self.tenants = {name: self._compiled(tenant) for name, tenant in policy.tenants.items()}
        self.keys_by_sha256: dict[bytes, KeyEntry] = {}
        self.tenants_by_issuer: dict[str, list[CompiledTenant]] = {}
        self.tenants_by_spiffe_id: dict[str, CompiledTenant] = {}
        self.inline_jwks: dict[str, jwt.PyJWKSet] = {}
        self.routes: PathMatcher[Route] = PathMatcher((route.rule, route) for route in policy.routes)
        self.route_costs = {route.name: route.cost for route in policy.routes}
        # Routes whose requests go through the ext_proc service, by name.
        self.hooked_routes = {route.name: route for route in policy.routes if route.hooks is not None}
        # Routes whose units ext_proc reads from the response body: their admissions wait
        # for its report.
        self.body_metered_routes = frozenset(
            name for name, route in self.hooked_routes.items() if route.hooks and route.hooks.usage_from_body
        )
        # The counter checks of each (tenant, route), built on first use and kept with this
        # version: a reload starts afresh, nothing else ever rebuilds them.
        self.limits = PolicyLimits(policy)
        # Names in billing systems, for usage delivery (never read on a decision).
        self.billing = PolicyBillingNames(policy)
        for compiled in self.tenants.values():
            self._index(compiled, document)
        self._check_shared_issuers(document)

    def _compiled(self, tenant: Tenant) -> CompiledTenant:
        plan = self.policy.plans.get(tenant.plan)
        forwards = plan is not None and plan.forward_credentials
        return CompiledTenant(tenant, _tenant_routes(tenant), forwards)

    def _index(self, compiled: CompiledTenant, document: Document) -> None:
        tenant = compiled.tenant
        base = ("tenants", tenant.name)
        for index, key in enumerate(tenant.api_keys):
            other = self.keys_by_sha256.setdefault(key.sha256, KeyEntry(compiled, key))
            if other.key is not key:
                document.problem(
                    (*base, "api_keys", index, "sha256"),
                    f"duplicate key hash: already used by tenants.{other.tenant.name} key {other.key.id!r}",
                )
        for index, spiffe_id in enumerate(tenant.spiffe_ids):
            owner = self.tenants_by_spiffe_id.setdefault(spiffe_id, compiled)
            if owner is not compiled:
                document.problem(
                    (*base, "mtls", "spiffe_ids", index), f"already used by tenants.{owner.name}"
                )
        if tenant.jwt is not None:
            self.tenants_by_issuer.setdefault(tenant.jwt.issuer, []).append(compiled)
            if tenant.jwt.jwks is not None:
                try:
                    self.inline_jwks[tenant.name] = jwt.PyJWKSet.from_dict(tenant.jwt.jwks)
                except jwt.PyJWTError as exc:
                    document.problem((*base, "jwt", "jwks"), f"not a usable JWK Set: {exc}")

    def _check_shared_issuers(self, document: Document) -> None:
        # Several tenants may trust one issuer (a shared IdP) only if a claim tells them apart.
        for issuer, tenants in self.tenants_by_issuer.items():
            if len(tenants) < 2:
                continue
            for compiled in tenants:
                assert compiled.tenant.jwt is not None
                if not compiled.tenant.jwt.match_claims:
                    document.problem(
                        ("tenants", compiled.name, "jwt"),
                        f"issuer {issuer!r} is shared by {len(tenants)} tenants: "
                        "each of them needs 'match_claims' to tell its tokens apart",
                    )


def _tenant_routes(tenant: Tenant) -> PathMatcher[frozenset[str]] | None:
    rules = tenant.access.routes
    if rules is None:
        return None
    return PathMatcher((rule, rule.methods) for rule in rules)
