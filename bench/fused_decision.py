"""µs of meshtoll CPU per fused decision, in-process: the HTTP ext_authz handler, the
Authorizer, the Limiter and the Redis counter store against a real redis-server, driven as
the HTTP server drives them (a Task per decision that waits on Redis), without Envoy, wrk or
sockets on the client side, so that the figure moves only with meshtoll's own code.

    python bench/fused_decision.py [--decisions N] [--concurrency C] [--event-loop uvloop|asyncio]
                                   [--redis tcp|unix] [--lease-max L] [--profile FILE]

--profile writes cProfile statistics (pstats) of one run; bench/run.py's rows (f) and (h)
measure the same path through Envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.local.devstack import RedisServer
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.recorder import AdmissionRecorder

KEY = "fused-bench-key"
POLICY = f"""
plans:
  metered:
    limits: [{{requests: 1000000000, per: second}}, {{requests: 100000000000, per: day, name: daily}}]
tenants:
  limited: {{plan: metered, api_keys: [{{id: limited, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]}}
routes: [{{prefix: /v1/, name: v1}}]
"""


async def decide_many(
    redis_url: str, policy: Path, decisions: int, concurrency: int, lease_max: int, profile: Path | None
) -> float:
    """µs of this process's CPU per decision, over `decisions` made `concurrency` at a time."""
    # A generous timeout: on a loaded machine a 50 ms one would time out and measure the failure path.
    store = RedisCounterStore(redis_url, timeout_ms=1000)
    usage = RedisUsageStore(redis_url)
    recorder = AdmissionRecorder(usage)
    holder = PolicyHolder.from_file(policy)
    limiter = Limiter(store, lease_max=lease_max)
    authorizer = Authorizer(holder, JwksCache(), transport="http", limiter=limiter, recorder=recorder)
    handler = HttpAuthzHandler(authorizer)
    flushing = asyncio.create_task(recorder.flush_forever())
    ids = iter(range(sys.maxsize))

    async def client(count: int) -> None:
        for _ in range(count):
            headers = {
                "host": "meshtoll-authz",
                "x-api-key": KEY,
                "x-request-id": f"bench-{next(ids)}",
                "x-meshtoll-peer-address": "127.0.0.1",
                "content-length": "0",
            }
            reply = handler("GET", "/v1/items", headers, "127.0.0.1")
            if not isinstance(reply, bytes):
                reply = await asyncio.ensure_future(reply)  # as HttpProtocol does
            assert reply.startswith(b"HTTP/1.1 200"), reply

    await client(concurrency * 50)  # warm-up: connections, the script loaded, caches
    profiler = cProfile.Profile() if profile is not None else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    await asyncio.gather(*(client(decisions // concurrency) for _ in range(concurrency)))
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    spent = time.process_time() - started
    flushing.cancel()
    await store.close()
    await usage.close()
    return spent / (decisions // concurrency * concurrency) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32, help="decisions in flight, as wrk -c32")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--redis", default="tcp", choices=("tcp", "unix"), help="how to reach Redis")
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    parser.add_argument(
        "--lease-max", type=int, default=1, help="decisions per token lease (1: Redis every decision)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one run here")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="meshtoll-fused-") as directory,
        RedisServer(unix_socket=True) as redis,
    ):
        policy = Path(directory) / "policy.yaml"
        policy.write_text(POLICY)
        url = redis.unix_url if args.redis == "unix" else redis.url
        for _ in range(1 if args.profile else args.repeat):
            spent = run_on_event_loop(
                decide_many(url, policy, args.decisions, args.concurrency, args.lease_max, args.profile),
                args.event_loop,
            )
            print(f"{spent:.1f} µs CPU per decision ({args.event_loop}, Redis over {args.redis})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
