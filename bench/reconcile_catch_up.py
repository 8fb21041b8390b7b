"""How fast reconciliation drains a backlog: overdue admissions billed per second by one
`reconcile` call, on the in-memory store and on a real redis-server, with the backlog spread
over few or many tenants (as after a Redis outage at a steady request rate).

    python bench/reconcile_catch_up.py [--admissions N] [--tenants 4,1000] [--store memory,redis]

The test suite checks what must hold (everything due billed in one round, nothing twice);
the rate belongs here, because on a loaded machine any fixed threshold fails by chance.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from meshtoll.local.devstack import RedisServer
from meshtoll.meter.reconcile import reconcile
from meshtoll.storage import MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.records import Admission
from meshtoll.usage.store import UsageStore

T = 1_795_000_000.0
# What a backlog is measured against: a steady request rate the meter must keep up with.
STEADY_REQUESTS_PER_SECOND = 430


async def admissions_per_second(store: UsageStore, admissions: int, tenants: int) -> float:
    """Admissions billed per second of wall time by one reconciliation of a fresh backlog."""
    names = [f"catch-up-{time.time_ns()}-{n}" for n in range(tenants)]
    backlog = [
        Admission(f"backlog-{n}", T + n / 1000, names[n % tenants], "ci", "pro", "search", "GET", 5)
        for n in range(admissions)
    ]
    await store.admit(backlog)
    started = time.perf_counter()
    billed = await reconcile(store, now=T + admissions, grace=10)
    took = time.perf_counter() - started
    if billed != admissions:
        raise SystemExit(f"reconciliation billed {billed} of {admissions} admissions")
    return admissions / took


async def measure(redis_url: str | None, admissions: int, tenants: int) -> float:
    """On a fresh in-memory store, or on the store at `redis_url`."""
    store: UsageStore = MemoryUsageStore() if redis_url is None else RedisUsageStore(redis_url)
    try:
        return await admissions_per_second(store, admissions, tenants)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admissions", type=int, default=20_000)
    parser.add_argument("--tenants", default="4,1000", help="comma-separated tenant counts")
    parser.add_argument("--store", default="memory,redis", help="memory, redis, or both")
    args = parser.parse_args()
    tenant_counts = [int(count) for count in args.tenants.split(",")]
    stores = args.store.split(",")
    print(f"{args.admissions:,} overdue admissions, one reconcile call each")
    print("| store | tenants | admissions/s | x a steady 430 requests/s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="meshtoll-reconcile-bench-") as directory, ExitStack() as running:
        redis = running.enter_context(RedisServer(Path(directory))) if "redis" in stores else None
        for store in stores:
            url = redis.url if store == "redis" and redis is not None else None
            for tenants in tenant_counts:
                rate = asyncio.run(measure(url, args.admissions, tenants))
                ratio = rate / STEADY_REQUESTS_PER_SECOND
                print(f"| {store} | {tenants:,} | {rate:,.0f} | {ratio:.0f} |")


if __name__ == "__main__":
    main()
