"""µs of meshtoll CPU per metered request, in-process: what the meter adds to a request authz
admitted (row (g) against row (c)). Admissions are recorded and flushed as authz does, and a
client in a child process sends Envoy's access-log batches for them to meshtoll's meter
served here (the OpenTelemetry logger's Export calls, or the gRPC access log's stream), built
as Envoy 1.40 builds them; the meter settles them against a real redis-server. The meter is
served as `meshtoll serve` serves it, on meshtoll's own h2c server (transport/h2_server.py)
since round 9; bench/README.md's figures before round 9 served its grpc.aio forms, which are
gone: repeating those needs main before round 9.

    python bench/meter_records.py [--decisions N] [--logger otlp|als] [--records-per-export B]
                                  [--rate R] [--tenants T] [--no-meter] [--repeat R]
                                  [--profile FILE]

Time is the schedule's, not the clock's, so that the count does not move with the machine
(or with valgrind's slowness): requests come at `--rate` a second, the recorder flushes its
admissions every FLUSH_SECONDS of that time and the meter retries waiting entries every
RETRY_SECONDS, half a period apart, as their loops do in a server; Envoy sends a batch every
B records (B = what its 64 KiB buffer holds: 713 OpenTelemetry records, 178 full entries).
--no-meter makes the same admissions and flushes and sends nothing: row (c)'s share of the
work, so the meter's cost is the difference. Every run checks that each admitted request was
billed once. Under bench/instructions.py only this process is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from meshtoll.local.devstack import RedisServer
from meshtoll.meter.als import AccessLogServicer
from meshtoll.meter.otlp import EXPORT_METHOD, LOGS_SERVICE, OtlpLogsReceiver
from meshtoll.meter.settle import RETRY_SECONDS, Settlement
from meshtoll.server.app import ALS_METHOD
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.transport.h2_server import serve_grpc
from meshtoll.transport.http_listener import listening_socket
from meshtoll.usage.recorder import FLUSH_SECONDS, AdmissionRecorder
from meshtoll.usage.records import Admission, Observation
from meshtoll.usage.store import UsageStore

# What Envoy 1.40's loggers put in one 64 KiB batch of this benchmark's requests (measured:
# a capture of both loggers behind wrk).
RECORDS_PER_EXPORT = {"otlp": 713, "als": 178}
STARTED = 1_796_600_000.0  # the schedule's time zero, 2026-12-06


def request_id(run: int, n: int) -> str:
    """The n-th request's x-request-id in run `run`, shaped like Envoy's (a UUID, 36
    characters). Runs share a Redis, so no run's batches may be replays of another's."""
    return f"{run:08x}-0000-4000-8000-{n:012x}"


def start_time(n: int, rate: float) -> float:
    return STARTED + n / rate


def tenant_of(n: int, tenants: int) -> str:
    return f"t{4242 + n % tenants}"


class Schedule:
    """The benchmark's clock: the time of the request last admitted."""

    def __init__(self) -> None:
        self.now = STARTED

    def __call__(self) -> float:
        return self.now


class SettledSignal(Settlement):
    """A Settlement that says when it has settled a batch: the gRPC access log's stream has
    no answer per message to wait for."""

    def __init__(self, store: UsageStore, clock: Callable[[], float], recorder: AdmissionRecorder) -> None:
        super().__init__(store, clock=clock, recorder=recorder)
        self.batches: asyncio.Queue[int] = asyncio.Queue()

    async def settle(self, observations: Sequence[Observation]) -> None:
        await super().settle(observations)
        self.batches.put_nowait(len(observations))


async def meter_many(
    run: int,
    redis_url: str,
    decisions: int,
    logger: str,
    per_export: int,
    rate: float,
    tenants: int,
    meter: bool,
    profile: Path | None,
) -> float:
    """µs of this process's CPU per request, over `decisions` requests admitted (and metered)."""
    schedule = Schedule()
    # Redis's answers are waited for as long as it takes, not the store's 1 s default, which
    # is wall-clock time: under valgrind (bench/instructions.py) this process runs some 50
    # times slower, more on a loaded machine, so a usage call could time out with Redis
    # answering in time. Every entry of the batch then waits again (an outage restarts the
    # wait), and `drain` retried them for as long as calls kept timing out: the run did not
    # end (natively with a 2 ms timeout it never did).
    usage = RedisUsageStore(redis_url, timeout_ms=600_000)
    recorder = AdmissionRecorder(usage)
    settlement = SettledSignal(usage, schedule, recorder)  # as meshtoll serve wires them
    sock = listening_socket("127.0.0.1", 0)
    server = serve_grpc(
        {EXPORT_METHOD: OtlpLogsReceiver(settlement).export_bytes},
        sock,
        streams={ALS_METHOD: AccessLogServicer(settlement).stream_access_logs},
    )
    port = sock.getsockname()[1]
    client = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", f"127.0.0.1:{port}", "--logger", logger,
        "--tenants", str(tenants), "--rate", str(rate), "--run", str(run), stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert client.stdin is not None
    flush_every, retry_every = int(rate * FLUSH_SECONDS), int(rate * RETRY_SECONDS)
    admitted = 0

    async def requests(count: int) -> None:
        """`count` more requests: admitted, their batches sent as they fill, the recorder's
        and the meter's loops run on the schedule."""
        nonlocal admitted
        for n in range(admitted, admitted + count):
            schedule.now = start_time(n, rate)
            tenant = tenant_of(n, tenants)
            recorder.admit(Admission(request_id(run, n), schedule.now, tenant, tenant, "pro", "v1", "GET", 1))
            if meter and (n + 1) % per_export == 0:
                await send(n + 1 - per_export, per_export)
            if (n + 1) % flush_every == 0:
                await recorder.flush(held=True)
            if (n + 1 + retry_every // 2) % retry_every == 0:
                await settlement.retry_waiting()
        admitted += count

    async def send(first: int, count: int) -> None:
        assert client.stdin is not None
        client.stdin.write(f"{first} {count}\n".encode())
        settled = 0
        while settled < count:
            settled += await settlement.batches.get()

    async def drain() -> None:
        """Everything admitted so far flushed and, when metered, settled."""
        await recorder.flush()
        while settlement.waiting:
            await settlement.retry_waiting()

    warm_up = 2 * per_export
    await requests(warm_up)  # warm-up: connections, the script loaded, caches
    await drain()
    profiler = cProfile.Profile() if profile is not None else None
    if profiler is not None:
        profiler.enable()
    started = time.process_time()
    measured = decisions // per_export * per_export
    await requests(measured)
    await drain()
    spent = time.process_time() - started
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    client.stdin.close()
    if await client.wait() != 0:
        raise RuntimeError("the access-log client failed")
    server.close()
    await server.wait_closed()
    await usage.close()
    billed = settlement.outcomes["billed"]
    if billed != (admitted if meter else 0):
        raise RuntimeError(f"{billed} billed of {admitted} admitted: {dict(settlement.outcomes)}")
    return spent / measured * 1e6


def otlp_export(run: int, first: int, count: int, tenants: int, rate: float) -> bytes:
    """One Export as Envoy's OpenTelemetry logger sends it with envoy/local.yaml's `meter`
    configuration: one resource without attributes, one scope, a record per request."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    resource_logs.resource.SetInParent()
    scope_logs = getattr(resource_logs, resource_logs.DESCRIPTOR.fields_by_number[2].name).add()
    records = getattr(scope_logs, scope_logs.DESCRIPTOR.fields_by_number[2].name)
    for n in range(first, first + count):
        start = start_time(n, rate)
        record = records.add()
        record.time_unix_nano = int(start * 1e9)
        record.body.string_value = (
            f"mt1 {start:.3f} 200 234 0 91 2 62 {request_id(run, n)} {tenant_of(n, tenants)}"
        )
    data: bytes = request.SerializeToString()
    return data


def als_entry(run: int, n: int, tenants: int, rate: float) -> accesslog_pb2.HTTPAccessLogEntry:
    """One full entry as Envoy's gRPC access log builds it for envoy/local.yaml's `full_als`
    listener (additional_request_headers_to_log: the four x-meshtoll-* headers)."""
    tenant = tenant_of(n, tenants)
    entry = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    common = entry.common_properties
    peer = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=58864)
    )
    common.downstream_remote_address.CopyFrom(peer)
    common.downstream_direct_remote_address.CopyFrom(peer)
    common.downstream_local_address.socket_address.address = "127.0.0.1"
    common.downstream_local_address.socket_address.port_value = 34565
    common.upstream_remote_address.socket_address.address = "127.0.0.1"
    common.upstream_remote_address.socket_address.port_value = 41000
    common.upstream_cluster = "upstream"
    start = start_time(n, rate)
    common.start_time.seconds, common.start_time.nanos = int(start), int(start % 1 * 1e9)
    for field, nanos in (
        ("time_to_last_rx_byte", 27051), ("time_to_first_upstream_tx_byte", 300000),
        ("time_to_last_upstream_tx_byte", 300100), ("time_to_first_upstream_rx_byte", 480000),
        ("time_to_last_upstream_rx_byte", 481000), ("time_to_first_downstream_tx_byte", 490000),
        ("time_to_last_downstream_tx_byte", 495000), ("duration", 497000),
    ):  # fmt: skip
        getattr(common, field).nanos = nanos
    common.stream_id = request_id(run, n)
    common.downstream_wire_bytes_sent, common.downstream_wire_bytes_received = 118, 174
    common.access_log_type = accesslog_pb2.DownstreamEnd
    authz = common.metadata.filter_metadata["envoy.filters.http.ext_authz"].fields
    for key, value in (("tenant", tenant), ("plan", "pro"), ("consumer", tenant), ("route", "v1")):
        authz[key].string_value = value
    request = entry.request
    request.request_method = 1  # GET
    request.scheme, request.authority, request.path = "http", "127.0.0.1:34565", "/v1/items"
    request.request_id = request_id(run, n)
    request.request_headers_bytes, request.downstream_header_bytes_received = 234, 142
    for name, value in (("tenant", tenant), ("route", "v1"), ("plan", "pro"), ("consumer", tenant)):
        request.request_headers[f"x-meshtoll-{name}"] = value
    response = entry.response
    response.response_code.value = 200
    response.response_headers_bytes, response.response_body_bytes = 91, 2
    response.response_code_details = "via_upstream"
    response.downstream_header_bytes_sent = 97
    return entry


async def send_batches(target: str, logger: str, run: int, tenants: int, rate: float) -> None:
    """The child: for each line `first count` on stdin, one batch of those requests' records,
    the OpenTelemetry logger's unary Export or the next message of one access-log stream."""
    lines = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)

    async def batches() -> AsyncIterator[tuple[int, int]]:
        while line := await lines.readline():
            first, count = map(int, line.split())
            yield first, count

    async with grpc.aio.insecure_channel(target) as channel:
        if logger == "otlp":
            export = channel.unary_unary(f"/{LOGS_SERVICE}/Export")
            async for first, count in batches():
                await export(otlp_export(run, first, count, tenants, rate))
            return

        async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
            identifier = als_pb2.StreamAccessLogsMessage.Identifier(log_name="meshtoll")
            identifier.node.user_agent_name = "envoy"
            async for first, count in batches():
                message = als_pb2.StreamAccessLogsMessage(identifier=identifier)
                message.http_logs.log_entry.extend(
                    als_entry(run, n, tenants, rate) for n in range(first, first + count)
                )
                yield message
                identifier = None  # only the stream's first message carries it

        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        await stub.StreamAccessLogs(messages())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20_000, help="requests admitted and metered")
    parser.add_argument("--logger", default="otlp", choices=tuple(RECORDS_PER_EXPORT), help="Envoy's logger")
    parser.add_argument("--records-per-export", type=int, default=None, help="records in one batch")
    parser.add_argument("--rate", type=float, default=10_000, help="requests a second, in schedule time")
    parser.add_argument("--tenants", type=int, default=1, help="tenants the requests take turns among")
    parser.add_argument("--no-meter", action="store_true", help="admissions and flushes only: row (c)'s part")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one run here")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        asyncio.run(send_batches(args.client, args.logger, args.run, args.tenants, args.rate))
        return 0
    per_export = args.records_per_export or RECORDS_PER_EXPORT[args.logger]
    with RedisServer() as redis:
        for run in range(1 if args.profile else args.repeat):
            metering = meter_many(
                run, redis.url, args.decisions, args.logger, per_export, args.rate, args.tenants,
                not args.no_meter, args.profile,
            )  # fmt: skip
            spent = run_on_event_loop(metering, args.event_loop)
            what = "admitted, not metered" if args.no_meter else f"metered through {args.logger}"
            print(f"{spent:.1f} µs CPU per request ({what}, {per_export} records a batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
