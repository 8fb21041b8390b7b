"""Run-time tenants without a server: the key format, expiry and hiding in the decision,
installing a tenant into the compiled policy one at a time, a file reload that keeps them,
and an instance following the registry (memory store) with an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from meshtoll.api_keys import checksum_fails, generate_key, key_hint, key_sha256
from meshtoll.authz.decide import decide
from meshtoll.authz.verdict import Allow, CheckRequest, Deny
from meshtoll.errors import StorageError, TenantChangeRefused
from meshtoll.policy import CompiledPolicy, load_policy_text
from meshtoll.policy.reload import PolicyHolder
from meshtoll.policy.runtime import check_spec, runtime_tenant
from meshtoll.registry.records import Change, KeyRecord, TenantRecord
from meshtoll.storage.registry_memory import MemoryTenantRegistry
from meshtoll.tenants.follower import RegistryFollower
from meshtoll.tenants.installed import InstalledTenants
from meshtoll.tenants.key_use import KeyUse
from meshtoll.tenants.service import TenantService
from meshtoll.usage.records import Admission
from tests.tenant_policy import FILE_KEY, POLICY
from tests.waiting import eventually_async

NOW = 1_796_000_000.0


def policy() -> CompiledPolicy:
    return load_policy_text(POLICY, "policy.yaml")


def ask(compiled: CompiledPolicy, key: str, now: float = NOW, path: str = "/v1/x") -> Allow | Deny:
    return decide(CheckRequest("GET", path, {"x-api-key": key}, "127.0.0.1"), compiled, {}, now)


def record(name: str, spec: dict[str, object], *keys: KeyRecord, version: int = 1) -> TenantRecord:
    return TenantRecord(name, spec, keys, NOW, NOW, version)


def key_record(key: str, key_id: str = "k1", **times: float | None) -> KeyRecord:
    return KeyRecord(key_id, key_sha256(key).hex(), key_hint(key, "mt_live"), NOW, **times)


def test_a_generated_key_has_the_prefix_and_a_checksum_that_catches_a_typo() -> None:
    key = generate_key("mt_live")
    assert key.startswith("mt_live_")
    assert len(key) == len("mt_live_") + 32 + 1 + 8
    assert not checksum_fails(key, "mt_live")
    typo = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
    assert checksum_fails(typo, "mt_live")
    assert checksum_fails(key[:-1], "mt_live")
    assert key_hint(key, "mt_live") == key[:12] + "..."


def test_a_mistyped_key_is_refused_before_any_lookup() -> None:
    compiled = policy()
    key = generate_key()
    compiled.install(
        runtime_tenant(record("globex", {"plan": "free"}, key_record(key)), compiled.policy.plans)
    )
    assert isinstance(ask(compiled, key), Allow)
    mistyped = key[:-1] + ("0" if key[-1] != "0" else "1")
    # Were the checksum not looked at, this would be a lookup that misses: the same answer.
    # So the proof is that no lookup happens: an index that raises on any probe.
    compiled.keys_by_sha256 = _NoLookups()
    verdict = ask(compiled, mistyped)
    assert isinstance(verdict, Deny)
    assert verdict.code == "invalid_api_key"


class _NoLookups(dict):  # type: ignore[type-arg]
    def get(self, key: object, default: object = None) -> object:
        raise AssertionError("the key index was looked up")


def test_an_expired_key_is_refused_from_its_expiry_on_by_the_injected_clock() -> None:
    compiled = policy()
    key = generate_key()
    compiled.install(
        runtime_tenant(
            record("globex", {"plan": "free"}, key_record(key, expires_at=NOW + 60)), compiled.policy.plans
        )
    )
    assert isinstance(ask(compiled, key, NOW + 59.999), Allow)
    expired = ask(compiled, key, NOW + 60)
    assert isinstance(expired, Deny)
    assert (expired.status, expired.code) == (401, "expired_api_key")


def test_the_key_header_is_hidden_unless_the_plan_forwards_it() -> None:
    compiled = load_policy_text(POLICY.replace("  pro: {", "  pro: {forward_credentials: true, "), "p.yaml")
    forwarded = ask(compiled, FILE_KEY)
    assert isinstance(forwarded, Allow)
    assert "x-api-key" not in forwarded.remove_headers
    hidden = ask(policy(), FILE_KEY)
    assert isinstance(hidden, Allow)
    assert "x-api-key" in hidden.remove_headers


def test_a_runtime_spec_is_checked_by_the_files_rules_with_its_messages() -> None:
    tenant, problems = check_spec(
        "globex", {"plan": "gold", "allow": {"ip": ["10.0.0/8"]}}, policy().policy.plans
    )
    assert tenant is None
    assert [(p.path, p.message) for p in problems] == [
        ("plan", "unknown plan 'gold' (plans: free, pro)"),
        ("allow.ip[0]", "'10.0.0/8' is not a CIDR"),
    ]
    _, screened = check_spec("globex", {"plan": "free", "status": "active\u0000"}, policy().policy.plans)
    assert [p.path for p in screened] == ["status"]


def test_installing_a_tenant_touches_only_that_tenant_and_a_conflict_installs_nothing() -> None:
    compiled = policy()
    plans = compiled.policy.plans
    keys = {name: generate_key() for name in ("globex", "initech")}
    for name, key in keys.items():
        assert compiled.install(runtime_tenant(record(name, {"plan": "free"}, key_record(key)), plans)) == []
    assert isinstance(ask(compiled, keys["globex"]), Allow)
    limits = compiled.limits.checks("globex", "v1", where="authz")
    assert [check.limit.capacity for check in limits] == [10]
    # A plan change: the tenant's limits are built anew, the other tenant's are kept.
    other = compiled.limits.checks("initech", "v1", where="authz")
    upgraded = runtime_tenant(record("globex", {"plan": "pro"}, key_record(keys["globex"]), version=2), plans)
    assert compiled.install(upgraded) == []
    assert [check.limit.capacity for check in compiled.limits.checks("globex", "v1", where="authz")] == [1000]
    assert compiled.limits.checks("initech", "v1", where="authz") is other
    # A file tenant's name, or the file's key: the file wins, the tenant is not served.
    stolen = runtime_tenant(record("globex", {"plan": "pro"}, key_record(FILE_KEY), version=3), plans)
    assert [path for path, _ in compiled.install(stolen)] == [("keys", "k1")]
    assert isinstance(ask(compiled, keys["globex"]), Deny)
    assert ask(compiled, FILE_KEY).tenant == "acme"  # type: ignore[union-attr]
    clash = runtime_tenant(record("acme", {"plan": "free"}), plans)
    assert [path for path, _ in compiled.install(clash)] == [("name",)]
    compiled.uninstall("initech")
    assert isinstance(ask(compiled, keys["initech"]), Deny)
    assert "initech" not in compiled.tenants


async def test_a_file_reload_keeps_the_runtime_tenants_and_the_file_wins_a_conflict(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    holder = PolicyHolder.from_file(path)
    installed = InstalledTenants(holder)
    key, other = generate_key(), generate_key()
    await installed.apply(
        {
            "globex": record("globex", {"plan": "free"}, key_record(key)),
            "hooli": record("hooli", {"plan": "pro"}, key_record(other)),
        },
        2,
        "c2",
    )
    assert isinstance(ask(holder.current, key), Allow)
    # The new file drops plan pro and adds a tenant named globex.
    new_text = (
        POLICY.replace("  pro: {limits: [{requests: 1000, per: minute}]}\n", "")
        .replace("plan: pro, api_keys", "plan: free, api_keys")
        .replace("routes:", "  globex: {plan: free}\nroutes:")
    )
    new = load_policy_text(new_text, "p.yaml")
    await holder.replace(new)
    assert holder.current is new
    assert isinstance(ask(new, key), Deny)  # the file's globex has no such key
    assert isinstance(ask(new, other), Deny)  # hooli's plan is gone
    assert set(installed.skipped) == {"globex", "hooli"}
    assert (installed.version, len(installed.records)) == (2, 2)


async def test_an_instance_follows_changes_and_reloads_after_a_gap(tmp_path: Path) -> None:
    registry = MemoryTenantRegistry(change_log_length=3)
    holder = holder_of(tmp_path)
    installed = InstalledTenants(holder)
    follower = RegistryFollower(registry, installed, wait_seconds=0.05)
    service = TenantService(registry, lambda: holder.current, clock=lambda: NOW)
    await service.create({"name": "globex", "plan": "free"}, "test")
    await follower.load_first()
    assert installed.version == 1
    running = asyncio.create_task(follower.run_forever())
    try:
        issued = await service.issue_key("globex", {"id": "ci"}, "test")
        assert issued.key is not None
        await eventually_async(
            lambda: installed.version, lambda v: v == 2, timeout=5, message="change applied"
        )
        assert isinstance(ask(holder.current, issued.key), Allow)
        await service.revoke_key("globex", "ci", "test")
        await eventually_async(
            lambda: installed.version, lambda v: v == 3, timeout=5, message="revocation applied"
        )
        assert ask(holder.current, issued.key).code == "revoked_api_key"  # type: ignore[union-attr]
    finally:
        running.cancel()
    # Offline while five changes land (the log keeps three): reading on finds a gap.
    for n in range(5):
        await service.create({"name": f"t{n}", "plan": "free"}, "test")
    running = asyncio.create_task(follower.run_forever())
    try:
        await eventually_async(lambda: installed.version, lambda v: v == 8, timeout=5, message="caught up")
        assert follower.reloads == 1
        assert {f"t{n}" for n in range(5)} <= set(holder.current.tenants)
    finally:
        running.cancel()


class BreakableRegistry(MemoryTenantRegistry):
    """The memory registry, whose change log cannot be read while `broken`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.failed_reads = 0

    async def changes(self, after: str, wait_seconds: float) -> list[Change]:
        if self.broken:
            self.failed_reads += 1
            raise StorageError("the registry is cut off")
        return await super().changes(after, wait_seconds)


async def test_staleness_grows_only_while_the_registry_cannot_be_read(tmp_path: Path) -> None:
    registry = BreakableRegistry()
    holder = holder_of(tmp_path)
    installed = InstalledTenants(holder)
    clock = [1000.0]
    follower = RegistryFollower(
        registry, installed, wait_seconds=0.01, retry_seconds=0.01, clock=lambda: clock[0]
    )
    service = TenantService(registry, lambda: holder.current, clock=lambda: NOW)
    await follower.load_first()
    assert follower.staleness() == 0
    clock[0] += 5  # no read since the snapshot
    assert follower.staleness() == 5
    running = asyncio.create_task(follower.run_forever())
    try:
        await eventually_async(follower.staleness, lambda s: s == 0, timeout=5, message="a read")
        await service.create({"name": "globex", "plan": "free"}, "test")
        await eventually_async(
            lambda: follower.changes_applied, lambda n: n == 1, timeout=5, message="the change applied"
        )
        registry.broken = True
        reads = registry.failed_reads
        await eventually_async(
            lambda: registry.failed_reads, lambda n: n > reads, timeout=5, message="a failed read"
        )
        clock[0] += 60
        await eventually_async(
            lambda: registry.failed_reads, lambda n: n > reads + 1, timeout=5, message="another"
        )
        assert follower.staleness() == 60  # failed reads do not count
        registry.broken = False
        await eventually_async(follower.staleness, lambda s: s == 0, timeout=5, message="caught up")
        assert (follower.changes_applied, follower.reloads) == (1, 0)
    finally:
        running.cancel()


async def test_a_roll_keeps_the_old_key_for_the_overlap_by_the_injected_clock(tmp_path: Path) -> None:
    registry = MemoryTenantRegistry()
    holder = holder_of(tmp_path)
    installed = InstalledTenants(holder)
    clock = [NOW]
    service = TenantService(
        registry, lambda: holder.current, committed=installed.apply_own, clock=lambda: clock[0]
    )
    await service.create({"name": "globex", "plan": "free"}, "test")
    old = (await service.issue_key("globex", {"id": "old"}, "test")).key
    new = (await service.roll_key("globex", "old", {"overlap_seconds": 300, "id": "new"}, "test")).key
    assert old is not None
    assert new is not None
    assert isinstance(ask(holder.current, old, NOW + 299), Allow)
    assert isinstance(ask(holder.current, new, NOW + 299), Allow)
    assert ask(holder.current, old, NOW + 300).code == "expired_api_key"  # type: ignore[union-attr]
    assert isinstance(ask(holder.current, new, NOW + 10**6), Allow)


async def test_concurrent_changes_to_one_tenant_lose_neither(tmp_path: Path) -> None:
    registry = MemoryTenantRegistry()
    holder = holder_of(tmp_path)
    service = TenantService(registry, lambda: holder.current)
    await service.create({"name": "globex", "plan": "free"}, "test")
    await asyncio.gather(*(service.issue_key("globex", {"id": f"k{n}"}, "test") for n in range(10)))
    found = await registry.get("globex")
    assert found is not None
    assert sorted(key.id for key in found.keys) == sorted(f"k{n}" for n in range(10))


async def test_a_key_change_commits_nothing_when_invalid(tmp_path: Path) -> None:
    registry = MemoryTenantRegistry()
    holder = holder_of(tmp_path)
    service = TenantService(registry, lambda: holder.current)
    await service.create({"name": "globex", "plan": "free"}, "test")
    for body in (
        {"id": "bad id"},
        {"expires_at": "tomorrow"},
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"x": 1},
    ):
        with pytest.raises(TenantChangeRefused) as refused:
            await service.issue_key("globex", body, "test")
        assert refused.value.code == "invalid_tenant", body
    assert (await registry.head())[0] == 1


def holder_of(directory: Path) -> PolicyHolder:
    path = directory / "policy.yaml"
    path.write_text(POLICY)
    return PolicyHolder.from_file(path)


async def test_key_use_is_written_once_a_minute_per_key_off_the_admission_flush(tmp_path: Path) -> None:
    registry = MemoryTenantRegistry()
    holder = holder_of(tmp_path)
    installed = InstalledTenants(holder)
    service = TenantService(
        registry, lambda: holder.current, committed=installed.apply_own, clock=lambda: NOW
    )
    await service.create({"name": "globex", "plan": "free"}, "test")
    await service.issue_key("globex", {"id": "ci"}, "test")
    writes: list[dict[tuple[str, str], int]] = []
    record_key_use = registry.record_key_use

    async def counted(uses: Mapping[tuple[str, str], int]) -> None:
        writes.append(dict(uses))
        await record_key_use(uses)

    registry.record_key_use = counted  # type: ignore[method-assign]
    key_use = KeyUse(registry, installed)

    def admitted(at: float, tenant: str = "globex", consumer: str = "ci") -> Admission:
        return Admission(f"r{at}", at, tenant, consumer, "free", "", "GET", 1)

    minute = int(NOW // 60)
    await key_use.admitted([admitted(minute * 60 + s) for s in range(0, 50, 5)])
    await key_use.admitted([admitted(minute * 60 + 55), admitted(minute * 60 + 56, "acme", "acme-ci")])
    await key_use.admitted([admitted(minute * 60 + 57, consumer="a-jwt-subject")])
    await key_use.admitted([admitted(minute * 60 + 61)])
    assert writes == [{("globex", "ci"): minute}, {("globex", "ci"): minute + 1}]
    assert await registry.key_use("globex", ["ci"]) == {"ci": minute + 1}
