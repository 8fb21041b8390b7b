"""What an instance builds to keep, its compiled policy and its run-time tenants, is out of
the garbage collector's full collections from the start and after each reload
(server/long_lived.py): with 100,000 tenants a full collection walking them stopped decisions
for longer than Envoy's ext_authz timeout, and every decision in flight failed with a 503.
gc.get_objects() lists what a collection walks, frozen objects left out."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtoll.api_keys import generate_key, key_hint, key_sha256
from meshtoll.policy import load_policy
from meshtoll.policy.reload import PolicyHolder
from meshtoll.registry.records import KeyRecord, Snapshot, TenantRecord
from meshtoll.server import services as services_module
from meshtoll.server.long_lived import NEVER, building
from meshtoll.server.services import build
from meshtoll.settings import Settings
from meshtoll.storage.registry_memory import MemoryTenantRegistry
from meshtoll.tenants.installed import SLICE, InstalledTenants
from tests.tenant_policy import POLICY
from tests.waiting import eventually_async


@pytest.fixture(autouse=True)
def nothing_frozen() -> Iterator[None]:
    """Each test starts with nothing frozen and leaves nothing frozen to the next."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def walked(*objects: object) -> list[object]:
    """Those of `objects` a full collection would walk (each one the collector tracks, so
    that an object it never walks anyway cannot pass for frozen)."""
    assert all(gc.is_tracked(found) for found in objects)
    tracked = {id(found) for found in gc.get_objects()}
    return [found for found in objects if id(found) in tracked]


async def run_until(
    work: Coroutine[Any, Any, object], probe: Callable[[], int], reached: int, message: str
) -> None:
    """Run `work` (a watcher's or follower's loop) until `probe()` reaches `reached`."""
    running = asyncio.create_task(work)
    try:
        await eventually_async(probe, lambda n: n == reached, timeout=5, message=message)
    finally:
        running.cancel()


def policy_file(tmp_path: Path, text: str = POLICY) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def runtime_record(name: str, version: int = 1) -> TenantRecord:
    key = generate_key()
    now = time.time()
    key_record = KeyRecord("k1", key_sha256(key).hex(), key_hint(key, "mt_live"), now)
    return TenantRecord(name, {"plan": "free"}, (key_record,), now, now, version)


async def test_the_policy_an_instance_starts_with_is_not_walked(tmp_path: Path) -> None:
    services = await build(Settings(policy=policy_file(tmp_path)))
    compiled = services.policy.current
    assert walked(compiled, compiled.tenants["acme"]) == []


async def test_a_new_version_of_the_policy_file_is_not_walked(tmp_path: Path) -> None:
    path = policy_file(tmp_path)
    services = await build(Settings(policy=path))
    path.write_text(POLICY.replace("routes:", "  initech: {plan: free}\nroutes:"))
    # What the policy watcher does with a version that loads.
    await services.policy.replace(load_policy(path))
    compiled = services.policy.current
    assert walked(compiled, compiled.tenants["acme"], compiled.tenants["initech"]) == []


async def test_run_time_tenants_loaded_again_from_the_registry_are_not_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A change log of one: three changes made while the follower does not run leave a gap,
    # and it loads every tenant again, as after a trimmed log or a registry started anew.
    monkeypatch.setattr(
        services_module, "open_tenant_registry", lambda url: MemoryTenantRegistry(change_log_length=1)
    )
    services = await build(Settings(policy=policy_file(tmp_path)))
    tenants = services.tenants
    assert tenants is not None
    for name in ("globex", "hooli", "initech"):
        await tenants.service.create({"name": name, "plan": "free"}, "test")
    await run_until(tenants.follower.run_forever(), lambda: tenants.follower.reloads, 1, "reload")
    records = tenants.installed.records
    compiled = services.policy.current.tenants
    assert walked(*records.values(), *(compiled[name] for name in records)) == []


async def test_a_replaced_version_is_freed_without_the_collector(tmp_path: Path) -> None:
    """So that freezing again after a reload keeps nothing of the version it replaced: the
    old policy, records and compiled tenants hold no reference cycles, and go as soon as
    nothing refers to them, frozen or not."""
    path = policy_file(tmp_path)
    holder = PolicyHolder.from_file(path)
    installed = InstalledTenants(holder)
    names = [f"rt{n}" for n in range(2 * SLICE)]  # more than one slice: the yields between them too
    await installed.replace_all([runtime_record(name) for name in names], 1, "1-0")
    gc.collect()
    gc.disable()
    try:
        await installed.replace_all([runtime_record(name, version=2) for name in names], 2, "2-0")
        await holder.replace(load_policy(path))
        # Only meshtoll's objects are looked at: another thread of the test process (one an
        # earlier test left) may make cyclic garbage of its own meanwhile.
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = [found for found in gc.garbage if type(found).__module__.startswith("meshtoll.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


class Thresholds:
    """gc.get_threshold() as seen from inside a reload, each time it is asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def note(self, *_: object) -> None:
        self.seen.append(gc.get_threshold())


class RegistryNoting(MemoryTenantRegistry):
    """Notes the collector's thresholds whenever the follower reads a snapshot."""

    def __init__(self, thresholds: Thresholds) -> None:
        super().__init__(change_log_length=1)
        self._thresholds = thresholds

    async def snapshot(self) -> Snapshot:
        self._thresholds.note()
        return await super().snapshot()


@pytest.fixture
def thresholds_kept() -> Iterator[tuple[int, int, int]]:
    """The thresholds before the test, put back after it whatever it did."""
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_overlapping_builds_hold_full_collections_until_the_last_one_ends(
    thresholds_kept: tuple[int, int, int],
) -> None:
    young, middle, _ = thresholds_kept
    with building():
        assert gc.get_threshold() == (young, middle, NEVER)
        with building():  # a registry reload while a file version compiles
            assert gc.get_threshold() == (young, middle, NEVER)
        assert gc.get_threshold() == (young, middle, NEVER)  # the file's build is not over
    assert gc.get_threshold() == thresholds_kept


def test_a_build_that_fails_restores_full_collections(thresholds_kept: tuple[int, int, int]) -> None:
    with pytest.raises(RuntimeError), building():
        raise RuntimeError("the version could not be built")
    assert gc.get_threshold() == thresholds_kept


async def test_a_registry_reload_is_built_with_full_collections_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thresholds_kept: tuple[int, int, int]
) -> None:
    thresholds = Thresholds()
    # A change log of one: changes made while the follower does not run leave a gap, and it
    # loads every tenant again (as in the registry test above).
    monkeypatch.setattr(services_module, "open_tenant_registry", lambda url: RegistryNoting(thresholds))
    services = await build(Settings(policy=policy_file(tmp_path)))
    tenants = services.tenants
    assert tenants is not None
    for name in ("globex", "hooli", "initech"):
        await tenants.service.create({"name": name, "plan": "free"}, "test")
    thresholds.seen.clear()  # the start's snapshot
    await run_until(tenants.follower.run_forever(), lambda: tenants.follower.reloads, 1, "reload")
    young, middle, _ = thresholds_kept
    assert thresholds.seen == [(young, middle, NEVER)]
    assert gc.get_threshold() == thresholds_kept


async def test_a_new_version_of_the_policy_file_is_built_with_full_collections_held(
    tmp_path: Path, thresholds_kept: tuple[int, int, int]
) -> None:
    path = policy_file(tmp_path)
    services = await build(Settings(policy=path))
    thresholds = Thresholds()
    services.policy.on_change(thresholds.note)
    path.write_text(POLICY.replace("routes:", "  initech: {plan: free}\nroutes:"))
    await run_until(services.policy.watch(0.01), lambda: services.policy.version, 2, "reload")
    young, middle, _ = thresholds_kept
    assert thresholds.seen == [(young, middle, NEVER)]
    assert gc.get_threshold() == thresholds_kept


async def test_a_rejected_version_of_the_policy_file_restores_full_collections(
    tmp_path: Path, thresholds_kept: tuple[int, int, int]
) -> None:
    path = policy_file(tmp_path)
    services = await build(Settings(policy=path))
    path.write_text("tenants: [not, a, mapping]\n")
    await run_until(services.policy.watch(0.01), lambda: services.policy.rejected_versions, 1, "rejection")
    assert gc.get_threshold() == thresholds_kept


def young() -> set[int]:
    return {id(found) for generation in (0, 1) for found in gc.get_objects(generation)}


async def test_an_install_of_every_tenant_leaves_no_whole_set_to_one_young_collection(tmp_path: Path) -> None:
    """Installing a tenant frees about what it allocates (the replaced tenant's objects), so
    the count that starts young collections barely moves: without a collection between slices
    the young generation kept the whole new set, 500,000 objects at 100,000 tenants, for the
    next young collection to walk at once (100-280 ms with the event loop stopped)."""
    holder = PolicyHolder.from_file(policy_file(tmp_path))
    installed = InstalledTenants(holder)
    names = [f"rt{n}" for n in range(4 * SLICE)]
    await installed.replace_all([runtime_record(name) for name in names], 1, "1-0")
    await installed.replace_all([runtime_record(name, version=2) for name in names], 2, "2-0")
    first = holder.current.tenants[names[0]]  # installed in the first slice
    assert id(first) not in young()
