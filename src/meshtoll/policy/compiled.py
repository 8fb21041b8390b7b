"""Compile a validated Policy into the indexes decisions use: every lookup is a dict hit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import jwt

from meshtoll.policy.billing import PolicyBillingNames
from meshtoll.policy.document import Document, FieldPath
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
    runtime: bool = False  # from the tenant registry, not the policy file

    @property
    def name(self) -> str:
        return self.tenant.name


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: CompiledTenant
    key: ApiKey


class CompiledPolicy:
    """A policy file plus its lookup indexes, shared by every decision.

    What the file says never changes once built. Run-time tenants (the tenant registry's) are
    installed into the same indexes one at a time (`install`, `uninstall`): each in one
    synchronous step between two decisions, since decisions run on the same event loop and
    read the indexes without awaiting, so that a decision sees a tenant whole or not at all.
    """

    def __init__(self, policy: Policy, document: Document) -> None:
        self.policy = policy
        # Tested before any lookup: a key with this prefix and a bad checksum is refused.
        self.key_prefix = f"{policy.auth.api_key_prefix}_"
        self.tenants = {
            name: self._compiled(tenant, runtime=False) for name, tenant in policy.tenants.items()
        }
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
        # version: a reload starts afresh; a run-time tenant's are dropped when it changes.
        self.limits = PolicyLimits(policy, self.tenants)
        # Names in billing systems, for usage delivery (never read on a decision): a run-time
        # tenant's billing block is found through the same index.
        self.billing = PolicyBillingNames(policy, self.tenants)
        for compiled in self.tenants.values():
            self._index(compiled, document)
        self._check_shared_issuers(document)

    def _compiled(self, tenant: Tenant, *, runtime: bool) -> CompiledTenant:
        plan = self.policy.plans.get(tenant.plan)
        forwards = plan is not None and plan.forward_credentials
        return CompiledTenant(tenant, _tenant_routes(tenant), forwards, runtime)

    def conflicts(self, tenant: Tenant) -> list[tuple[FieldPath, str]]:
        """Why `tenant`, a run-time tenant, cannot be installed next to this policy's
        tenants (its own earlier version aside): (field path, message) pairs, none if it can.
        The registry itself keeps key hashes unique among run-time tenants; this checks them
        against the file's, and everything else an instance alone can know."""
        found: list[tuple[FieldPath, str]] = []
        existing = self.tenants.get(tenant.name)
        if existing is not None and not existing.runtime:
            found.append((("name",), "the policy file has a tenant of this name: change it there"))
            return found
        if tenant.plan not in self.policy.plans:
            known = ", ".join(sorted(self.policy.plans)) or "none defined"
            found.append((("plan",), f"unknown plan {tenant.plan!r} (plans: {known})"))
        for key in tenant.api_keys:
            entry = self.keys_by_sha256.get(key.sha256)
            if entry is not None and entry.tenant.name != tenant.name:
                found.append((("keys", key.id), f"its hash is already a key of tenant {entry.tenant.name!r}"))
        for index, spiffe_id in enumerate(tenant.spiffe_ids):
            owner = self.tenants_by_spiffe_id.get(spiffe_id)
            if owner is not None and owner.name != tenant.name:
                found.append((("mtls", "spiffe_ids", index), f"already used by tenant {owner.name!r}"))
        if tenant.jwt is not None:
            sharing = [t for t in self.tenants_by_issuer.get(tenant.jwt.issuer, ()) if t.name != tenant.name]
            if sharing and not (tenant.jwt.match_claims and all(_has_match_claims(t) for t in sharing)):
                found.append(
                    (
                        ("jwt", "issuer"),
                        f"issuer {tenant.jwt.issuer!r} is trusted by tenant {sharing[0].name!r} too: "
                        "each of them needs 'match_claims' to tell its tokens apart",
                    )
                )
        return found

    def install(self, tenant: Tenant) -> list[tuple[FieldPath, str]]:
        """Put a run-time tenant (new, or a new version of one) into every index; or, when it
        conflicts, take it out (its older version too: serving that one would keep a key
        working that the new version revoked) and return the conflicts. Synchronous on
        purpose (see above)."""
        problems = self.conflicts(tenant)
        key_set = None
        if not problems and tenant.jwt is not None and tenant.jwt.jwks is not None:
            try:
                key_set = jwt.PyJWKSet.from_dict(tenant.jwt.jwks)
            except jwt.PyJWTError as exc:
                problems = [(("jwt", "jwks"), f"not a usable JWK Set: {exc}")]
        self.uninstall(tenant.name)
        if problems:
            return problems
        compiled = self._compiled(tenant, runtime=True)
        self.tenants[tenant.name] = compiled
        for key in tenant.api_keys:
            self.keys_by_sha256[key.sha256] = KeyEntry(compiled, key)
        for spiffe_id in tenant.spiffe_ids:
            self.tenants_by_spiffe_id[spiffe_id] = compiled
        if tenant.jwt is not None:
            self.tenants_by_issuer.setdefault(tenant.jwt.issuer, []).append(compiled)
            if key_set is not None:
                self.inline_jwks[tenant.name] = key_set
        return []

    def uninstall(self, name: str) -> None:
        """Take a run-time tenant out of every index (a file tenant is never touched)."""
        compiled = self.tenants.get(name)
        if compiled is None or not compiled.runtime:
            return
        del self.tenants[name]
        tenant = compiled.tenant
        for key in tenant.api_keys:
            entry = self.keys_by_sha256.get(key.sha256)
            if entry is not None and entry.tenant is compiled:
                del self.keys_by_sha256[key.sha256]
        for spiffe_id in tenant.spiffe_ids:
            if self.tenants_by_spiffe_id.get(spiffe_id) is compiled:
                del self.tenants_by_spiffe_id[spiffe_id]
        if tenant.jwt is not None:
            issuers = self.tenants_by_issuer.get(tenant.jwt.issuer, [])
            remaining = [other for other in issuers if other is not compiled]
            if remaining:
                self.tenants_by_issuer[tenant.jwt.issuer] = remaining
            else:
                self.tenants_by_issuer.pop(tenant.jwt.issuer, None)
        self.inline_jwks.pop(name, None)
        self.limits.forget(name)

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


def _has_match_claims(compiled: CompiledTenant) -> bool:
    return compiled.tenant.jwt is not None and bool(compiled.tenant.jwt.match_claims)


def _tenant_routes(tenant: Tenant) -> PathMatcher[frozenset[str]] | None:
    rules = tenant.access.routes
    if rules is None:
        return None
    return PathMatcher((rule, rule.methods) for rule in rules)
