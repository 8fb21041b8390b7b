"""Full garbage collections while a 100,000-tenant version is built, in-process: what
server/long_lived.py's `building()` is for. A registry reload of `--tenants` run-time tenants
(the follower loading every record again) and a new version of a policy file of `--tenants`
tenants (the watcher compiling it in its thread), each `--reloads` times, on an instance made
by `build()` (its start frozen). Counted with gc.callbacks: generation-2 collections and their
pauses; the event loop's longest wait between two 1 ms ticks besides.

    python bench/reload_collections.py --tenants 100000 --reloads 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from run import write_policy

from meshtoll.registry.records import KeyRecord, TenantRecord, with_version
from meshtoll.server import services as services_module
from meshtoll.server.services import build
from meshtoll.settings import Settings
from meshtoll.storage.registry_memory import MemoryTenantRegistry


class Collections:
    """The pauses of each generation's collections while installed in gc.callbacks."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)


async def longest_waits(stop: asyncio.Event) -> list[float]:
    """The event loop's three longest waits between two 1 ms ticks."""
    waits, last = [0.0], time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        waits, last = sorted([*waits, now - last])[-3:], now
    return waits


def registry_of(count: int) -> MemoryTenantRegistry:
    """`count` run-time tenants as bench/runtime_tenants.py seeds them, in memory."""
    registry = MemoryTenantRegistry()
    now = time.time()
    for index in range(count):
        name, digest = f"rt{index}", hashlib.sha256(f"bench-rt-key-{index:06d}".encode()).hexdigest()
        record = TenantRecord(name, {"plan": "pro"}, (KeyRecord("k", digest, "", now),), now, now)
        registry._documents[name] = with_version(record.encode(), index + 1)
        registry._owners[digest] = name
    registry._version = count
    return registry


async def measured(what: str, reload: Any) -> None:
    collections = Collections()
    stop = asyncio.Event()
    ticker = asyncio.create_task(longest_waits(stop))
    await asyncio.sleep(0)  # the ticker runs from the reload's first step
    gc.callbacks.append(collections)
    started = time.perf_counter()
    try:
        await reload()
    finally:
        gc.callbacks.remove(collections)
    took = time.perf_counter() - started
    stop.set()
    waits = await ticker
    full, young = collections.pauses[2], collections.pauses[1]

    def ms(pauses: list[float]) -> str:
        return ", ".join(f"{pause * 1000:.0f}" for pause in pauses) or "-"

    print(
        f"{what}: {took:.2f} s; {len(full)} full collections (ms: {ms(full)}); "
        f"{len(young)} generation-1, longest {max(young, default=0) * 1000:.0f} ms; "
        f"event loop's longest waits (ms) {ms(waits)}; threshold after {gc.get_threshold()}",
        flush=True,
    )


async def main_async(tenants: int, reloads: int, directory: Path) -> None:
    registry = registry_of(tenants)
    services_module.open_tenant_registry = lambda url: registry  # type: ignore[attr-defined]
    small = write_policy(directory, 10)
    services = await build(Settings(policy=small))
    assert services.tenants is not None
    follower = services.tenants.follower
    for n in range(reloads):
        await measured(f"registry reload {n + 1}, {tenants} run-time tenants", lambda: follower._load())

    large = write_policy(directory, tenants)
    services = await build(Settings(policy=large))
    holder = services.policy
    changed = asyncio.Event()
    holder.on_change(lambda _: changed.set())  # after build()'s keep_built: the version is frozen

    async def reload() -> None:
        changed.clear()
        watching = asyncio.create_task(holder.watch(0.01))
        try:
            await asyncio.wait_for(changed.wait(), 600)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    for n in range(reloads):
        text = large.read_text()  # t7's plan changes at each version, pro and metered in turn
        before, after = ("pro", "metered") if n % 2 == 0 else ("metered", "pro")
        large.write_text(text.replace(f"t7: {{plan: {before}", f"t7: {{plan: {after}", 1))
        await measured(f"policy file reload {n + 1}, {tenants} tenants", reload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--reloads", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main_async(args.tenants, args.reloads, Path(directory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
