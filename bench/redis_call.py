"""The Redis call alone, in-process: RedisCounterStore.increment (the RLS call's counting,
`--kind increment`) or check (the fused path's store call and its refills, `--kind check`)
against a real redis-server, `--concurrency` calls in flight, each awaited as a decision
awaits it: the EVALSHA built and sent, the reply read and decoded, the coroutines between.
Under bench/instructions.py it counts what one Redis call costs meshtoll, without the gRPC
or HTTP server around it.

    python bench/redis_call.py [--decisions N] [--concurrency C] [--kind increment|check]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from meshtoll.counting.limits import Check, Increment, RateLimit
from meshtoll.local.devstack import RedisServer
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.storage.redis import RedisCounterStore

# Never over their limits; a timeout no run under valgrind on a loaded machine reaches.
INCREMENTS = [Increment("bench_api_key_bench-key_1700000000", 1, 10**9, 3600)]
CHECKS = [Check("tenant:{acme}:per_hour", RateLimit(10**9, "hour"), 1)]
TIMEOUT_MS = 60_000


async def calls(redis_url: str, decisions: int, concurrency: int, kind: str) -> None:
    store = RedisCounterStore(redis_url, timeout_ms=TIMEOUT_MS)

    async def caller(count: int) -> None:
        for _ in range(count):
            if kind == "increment":
                await store.increment(INCREMENTS, time.time())
            else:
                await store.check(CHECKS, time.time())

    try:
        await asyncio.gather(*(caller(50) for _ in range(concurrency)))  # warm-up: connected, loaded
        await asyncio.gather(*(caller(decisions // concurrency) for _ in range(concurrency)))
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--kind", default="increment", choices=("increment", "check"))
    parser.add_argument("--repeat", type=int, default=1, help="runs (bench/instructions.py passes 1)")
    args = parser.parse_args(argv)
    with RedisServer() as redis:
        for _ in range(args.repeat):
            run_on_event_loop(calls(redis.url, args.decisions, args.concurrency, args.kind), "uvloop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
