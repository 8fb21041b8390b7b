"""Which tenants get series of their own (`--metrics-tenant-labels`): none by default, the
N busiest (`top:N`), or a list of names. Every series with a `tenant` label is selected here,
after the workers' collections are merged, so that all of them rank the same counts.

Tenant names come only from the policy (authz's verdict), never from a request, so even
the counts kept for every tenant are bounded by the policy; the selection bounds what a
scrape carries, and so what Prometheus stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from meshtoll.telemetry.families import Family, Labels

TENANT_LABEL = "tenant"
MAX_TOP = 1000
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # a tenant name, as the policy allows it


@dataclass(frozen=True, slots=True)
class TenantLabels:
    top: int = 0  # the N tenants with the most decisions; 0: no ranking
    names: frozenset[str] = frozenset()  # an allow-list

    @property
    def enabled(self) -> bool:
        return self.top > 0 or bool(self.names)

    def select(self, family: Family) -> Family:
        """`family` with only the chosen tenants' series (others' are left out, not summed
        into a catch-all: a tenant entering the top N would make such a series fall)."""
        tenants = [(key, dict(key).get(TENANT_LABEL)) for key in family.samples]
        if all(tenant is None for _, tenant in tenants):
            return family
        chosen = self.names if self.names else self._busiest(tenants, family)
        kept = {key: family.samples[key] for key, tenant in tenants if tenant is None or tenant in chosen}
        return replace(family, samples=kept)

    def _busiest(self, tenants: list[tuple[Labels, str | None]], family: Family) -> set[str]:
        totals: dict[str, float] = {}
        for key, tenant in tenants:
            if tenant is not None:
                totals[tenant] = totals.get(tenant, 0.0) + family.samples[key]
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        return {tenant for tenant, _ in ranked[: self.top]}


def parse_tenant_labels(text: str) -> TenantLabels:
    """`""` (none), `top:N` or `NAME,NAME...`; ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        return TenantLabels()
    if text.startswith("top:"):
        count = text.removeprefix("top:")
        if not count.isdigit() or not 1 <= int(count) <= MAX_TOP:
            raise ValueError(f"{text!r}: top:N needs N from 1 to {MAX_TOP}")
        return TenantLabels(top=int(count))
    names = [name.strip() for name in text.split(",")]
    bad = [name for name in names if not _NAME.match(name)]
    if bad:
        raise ValueError(f"{text!r}: {bad[0]!r} is not a tenant name (letters, digits, '.', '_', '-')")
    return TenantLabels(names=frozenset(names))
