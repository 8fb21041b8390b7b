"""µs of meshtoll CPU per fused decision, in-process: the HTTP ext_authz handler, the
Authorizer, the Limiter and the Redis counter store against a real redis-server, driven as
the HTTP server drives them (each decision in a loop callback, a Task only for one that waits
on Redis; one waiting for a grant in flight answers with a future, taken as it is), without
Envoy, wrk or sockets on the client side, so that the figure moves only
with meshtoll's own code.

    python bench/fused_decision.py [--decisions N] [--concurrency C] [--event-loop uvloop|asyncio]
                                   [--redis tcp|unix] [--lease-max L] [--tenant limited|unlimited]
                                   [--ratelimit-headers always|near_limit|never]
                                   [--no-admissions] [--profile FILE] [--trace-ratio R]

--trace-ratio turns tracing on with a parent-based ratio sampler (0.01: 1% of decisions
recorded), spans exported in batches to an exporter that drops them; without it tracing is
off, as in `meshtoll serve` without OTEL_EXPORTER_OTLP_ENDPOINT.
--tenant unlimited makes the same decisions for a tenant without limits: row (c)'s path, the
yardstick of issue 21's targets ((f) at most 1.4x (c)'s CPU).
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
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.local.devstack import RedisServer
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.telemetry.sampling import sampling_from_environment
from meshtoll.telemetry.tracing import Tracing
from meshtoll.usage.recorder import AdmissionRecorder

KEYS = {"limited": "fused-bench-key", "unlimited": "plain-bench-key"}
DIGESTS = {tenant: hashlib.sha256(key.encode()).hexdigest() for tenant, key in KEYS.items()}
POLICY = f"""
plans:
  pro: {{}}
  metered:
    limits: [{{requests: 1000000000, per: second}}, {{requests: 100000000000, per: day, name: daily}}]
tenants:
  limited: {{plan: metered, api_keys: [{{id: limited, sha256: {DIGESTS["limited"]}}}]}}
  unlimited: {{plan: pro, api_keys: [{{id: unlimited, sha256: {DIGESTS["unlimited"]}}}]}}
routes: [{{prefix: /v1/, name: v1}}]
"""


async def decide_many(
    redis_url: str,
    policy: Path,
    decisions: int,
    concurrency: int,
    lease_max: int,
    key: str,
    admissions: bool,
    profile: Path | None,
    tracing: Tracing | None = None,
) -> float:
    """µs of this process's CPU per decision, over `decisions` made `concurrency` at a time."""
    # A generous timeout: on a loaded machine a 50 ms one would time out and measure the failure path.
    store = RedisCounterStore(redis_url, timeout_ms=1000)
    usage = RedisUsageStore(redis_url)
    recorder = AdmissionRecorder(usage)
    holder = PolicyHolder.from_file(policy)
    limiter = Limiter(store, lease_max=lease_max)
    authorizer = Authorizer(
        holder, JwksCache(), transport="http", limiter=limiter, recorder=recorder if admissions else None
    )
    handler = HttpAuthzHandler(authorizer, tracing=tracing)
    flushing = asyncio.create_task(recorder.flush_forever())
    ids = iter(range(sys.maxsize))

    def connection(count: int, done: asyncio.Future[None]) -> None:
        """`count` decisions one after the other, as one of Envoy's connections sends them:
        each decided in a loop callback (HttpProtocol's data_received), a Task only for a
        handler that returns an awaitable, and the next request one loop turn later. The
        recorder's flush runs between them as it does in a server."""

        def next_decision(remaining: int) -> None:
            if remaining == 0:
                done.set_result(None)
                return
            headers = {
                "host": "meshtoll-authz",
                "x-api-key": key,
                "x-request-id": f"bench-{next(ids)}",
                "x-meshtoll-peer-address": "127.0.0.1",
                "content-length": "0",
            }
            reply = handler("GET", "/v1/items", headers, "127.0.0.1")
            if isinstance(reply, bytes):
                answered(reply, remaining)
                return
            # As HttpProtocol takes it: a future as it is, any other awaitable in a Task.
            task = reply if isinstance(reply, asyncio.Future) else asyncio.ensure_future(reply)
            task.add_done_callback(lambda finished: answered(finished.result(), remaining))

        def answered(reply: bytes, remaining: int) -> None:
            assert reply.startswith(b"HTTP/1.1 200"), reply
            loop.call_soon(next_decision, remaining - 1)

        loop.call_soon(next_decision, count)

    async def decide_concurrently(connections: int, each: int) -> None:
        finished = [loop.create_future() for _ in range(connections)]
        for done in finished:
            connection(each, done)
        await asyncio.gather(*finished)

    loop = asyncio.get_running_loop()
    await decide_concurrently(concurrency, 50)  # warm-up: connections, the script loaded, caches
    profiler = cProfile.Profile() if profile is not None else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    await decide_concurrently(concurrency, decisions // concurrency)
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    spent = time.process_time() - started
    flushing.cancel()
    await store.close()
    await usage.close()
    return spent / (decisions // concurrency * concurrency) * 1e6


class _Dropped(SpanExporter):
    """Takes every batch and keeps nothing: the cost measured is meshtoll's, not a collector's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def sampled_tracing(ratio: float) -> Tracing:
    """As `meshtoll serve` traces with OTEL_TRACES_SAMPLER=parentbased_traceidratio."""
    sampler, gate = sampling_from_environment(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    )
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    return Tracing(provider, gate)


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
    parser.add_argument(
        "--tenant",
        default="limited",
        choices=tuple(KEYS),
        help="limited: the fused path, as row (f); unlimited: the same decision without limits, as (c)",
    )
    parser.add_argument(
        "--ratelimit-headers",
        default="always",
        choices=("always", "near_limit", "never"),
        help="the policy's ratelimit.headers",
    )
    parser.add_argument(
        "--no-admissions",
        action="store_true",
        help="record no admission (what an admitted request's record and its flush cost, by difference)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one run here")
    parser.add_argument("--trace-ratio", type=float, default=None, help="tracing on, sampling this share")
    args = parser.parse_args(argv)
    tracing = None if args.trace_ratio is None else sampled_tracing(args.trace_ratio)
    with (
        tempfile.TemporaryDirectory(prefix="meshtoll-fused-") as directory,
        RedisServer(unix_socket=True) as redis,
    ):
        policy = Path(directory) / "policy.yaml"
        # The default left unsaid, so that the driver runs on code from before the setting.
        headers = (
            ""
            if args.ratelimit_headers == "always"
            else f"ratelimit: {{headers: {args.ratelimit_headers}}}\n"
        )
        policy.write_text(headers + POLICY)
        url = redis.unix_url if args.redis == "unix" else redis.url
        for _ in range(1 if args.profile else args.repeat):
            deciding = decide_many(
                url, policy, args.decisions, args.concurrency, args.lease_max, KEYS[args.tenant],
                not args.no_admissions, args.profile, tracing,
            )  # fmt: skip
            spent = run_on_event_loop(deciding, args.event_loop)
            print(f"{spent:.1f} µs CPU per decision ({args.event_loop}, Redis over {args.redis})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
