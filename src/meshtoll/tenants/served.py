"""The policy as an instance serves it, for the commands that read what `meshtoll serve` keeps
(`quota show`, `billing invoice`): the policy file with the registry's run-time tenants
installed into it, skipping those the file rules out, as an instance does."""

from __future__ import annotations

from meshtoll.errors import PolicyError
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.runtime import RuntimeTenantReader
from meshtoll.registry.records import TenantRecord
from meshtoll.storage import open_tenant_registry


async def install_runtime_tenants(policy: CompiledPolicy, redis_url: str, tenant: str | None = None) -> None:
    """Every run-time tenant, or only `tenant` (one read instead of the whole registry)."""
    registry = open_tenant_registry(redis_url)
    try:
        records: list[TenantRecord | None]
        if tenant is None:
            records = list((await registry.snapshot()).records)
        elif tenant not in policy.tenants:
            records = list((await registry.get_many([tenant])).values())
        else:
            records = []
    finally:
        await registry.close()
    reader = RuntimeTenantReader()
    for record in records:
        if record is None:
            continue
        try:
            policy.install(reader.tenant(record, policy.policy.plans))
        except PolicyError:
            continue  # as an instance: a record its policy file rules out is not served
