"""µs of meshtoll CPU per rate-limit service call, in-process: `meshtoll ratelimit` (RlsApp,
strict compatibility, counting in a real redis-server) served in this process, called over
gRPC by a client in a child process, so that this process's CPU is the server's alone (its
gRPC machinery, the decision, the Redis call) and moves only with meshtoll's own code.
Row (i) of bench/run.py measures the same service through Envoy.

    python bench/rls_decision.py [--decisions N] [--concurrency C] [--repeat R] [--profile FILE]
                                 [--floor grpc-aio|h2]

`--floor` measures a server's own per-call machinery: no decision, no Redis, the same
constant answer to every call, served by grpc.aio (a generic handler) or by meshtoll's
h2c server (transport/h2_server.py).

Each call is one descriptor `(api_key, <key>)` of domain `bench` (bench/rls_alone.py's
configuration), never over its limit. Under bench/instructions.py only this process is
counted: the client and redis-server are other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rls_alone import CONFIG

from meshtoll.envoyproxy_ratelimit.environment import rls_settings_from
from meshtoll.local.devstack import RedisServer, rls_environment
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.server.rls_app import RlsApp
from meshtoll.transport.h2_server import CallContext, serve_grpc

# The client: `calls` ShouldRateLimit calls, `concurrency` at a time, on one channel (as
# Envoy's one worker keeps one HTTP/2 connection to the service), then it exits.
CLIENT = """
import asyncio, sys
import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

async def main(target, calls, concurrency):
    request = rls_pb2.RateLimitRequest(
        domain="bench",
        descriptors=[ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="api_key", value="bench-key")]
        )],
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)

        async def caller(count):
            for _ in range(count):
                # A deadline on every call, as Envoy's ratelimit filter sends grpc-timeout on
                # every call (grpc core rounds it, so the header block stays the same); far
                # off, as a call under callgrind on a loaded machine may take seconds.
                answer = await stub.ShouldRateLimit(request, timeout=120)
                assert answer.overall_code == rls_pb2.RateLimitResponse.OK, answer

        await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def constant_answer() -> bytes:
    from envoy.service.ratelimit.v3 import rls_pb2

    ok = rls_pb2.RateLimitResponse.OK
    answer = rls_pb2.RateLimitResponse(
        overall_code=ok, statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(code=ok, limit_remaining=99)]
    )
    encoded: bytes = answer.SerializeToString()
    return encoded


class FloorServer:
    """A server answering every ShouldRateLimit with the same bytes: its own cost alone."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ports: dict[str, int] = {}
        self._stop: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        answer = constant_answer()
        if self.kind == "grpc-aio":
            import grpc

            async def constant(request: bytes, context: object) -> bytes:
                return answer

            method = grpc.unary_unary_rpc_method_handler(constant)
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            service, name = SHOULD_RATE_LIMIT[1:].split("/")
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: method}),))
            self.ports["grpc_port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._stop = lambda: server.stop(None)
            return

        def constant_h2(request: bytes, context: CallContext) -> bytes:
            return answer

        sock = socket.create_server(("127.0.0.1", 0))
        listener = serve_grpc({SHOULD_RATE_LIMIT: constant_h2}, sock)
        self.ports["grpc_port"] = sock.getsockname()[1]

        async def stop() -> None:
            listener.close()
            await listener.wait_closed()

        self._stop = stop

    async def stop(self) -> None:
        if self._stop is not None:
            await self._stop()


async def serve_and_call(
    work: Path, redis_url: str, decisions: int, concurrency: int, profile: Path | None, floor: str | None
) -> float:
    """µs of this process's CPU per call, over `decisions` calls `concurrency` at a time."""
    # Every port of the RlsApp its own choice.
    app = RlsApp(rls_settings_from(rls_environment(work, redis_url))) if floor is None else FloorServer(floor)
    await app.start()
    target = f"127.0.0.1:{app.ports['grpc_port']}"

    async def client(calls: int) -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, target, str(calls), str(concurrency)
        )
        if await child.wait() != 0:
            raise RuntimeError("the RLS client failed")

    try:
        await client(concurrency * 50)  # warm-up: the channel, the script loaded, caches
        profiler = cProfile.Profile() if profile is not None else None
        if profiler is not None:
            profiler.enable()
        started = time.process_time()
        await client(decisions // concurrency * concurrency)
        spent = time.process_time() - started
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
    finally:
        await app.stop()
    return spent / (decisions // concurrency * concurrency) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, as wrk -c32")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one run here")
    parser.add_argument(
        "--floor", choices=("grpc-aio", "h2"), default=None, help="a constant answer from this server alone"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshtoll-rls-") as directory, RedisServer() as redis:
        work = Path(directory)
        (work / "ratelimit" / "config").mkdir(parents=True)
        (work / "ratelimit" / "config" / "bench.yaml").write_text(CONFIG)
        for _ in range(1 if args.profile else args.repeat):
            calling = serve_and_call(
                work, redis.url, args.decisions, args.concurrency, args.profile, args.floor
            )
            spent = run_on_event_loop(calling, args.event_loop)
            print(f"{spent:.1f} µs CPU per RLS call ({args.event_loop})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
