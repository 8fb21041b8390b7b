"""µs of meshtoll CPU per streaming gRPC call, in-process: the ext_proc service (one stream
per hooked request) or the access-log service (one long-lived stream, many messages) served
in this process by meshtoll's own h2c server (transport/h2_server.py, `meshtoll serve`'s
gRPC port since round 9), called by a grpcio client in a child process, so that this
process's CPU is the server's alone. `--server grpc-aio` serves only the floor (`--floor`)
now: the services' grpc.aio servicers are gone, so their figures in bench/README.md (round 9)
need main before round 9 (its servicers and this script's grpc-aio side).

    python bench/stream_calls.py --service extproc|als [--server h2|grpc-aio]
                                 [--decisions N] [--concurrency C] [--entries E] [--repeat R]
                                 [--floor]

extproc: a decision is one stream as Envoy opens it for a route whose hooks change request
headers: one ProcessingRequest (its request headers) in, one ProcessingResponse out, the
stream ended. als: a decision is one StreamAccessLogsMessage of E entries (requests authz
refused: read, not settled, so the settlement's store stays out of the figure), on
`concurrency` streams that stay open for the whole run. `--floor` measures a server's own
per-stream machinery: each message answered with the same bytes (ext_proc: a
ProcessingResponse; als: the empty response at the end), no service behind it. Under
bench/instructions.py only this process is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from meshtoll.extproc.service import ExternalProcessorServicer
from meshtoll.meter.als import AccessLogServicer
from meshtoll.meter.settle import Settlement
from meshtoll.policy import load_policy_text
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.storage import MemoryUsageStore

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
ACCESS_LOGS = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"

POLICY = """
plans: {pro: {}}
tenants:
  acme: {plan: pro, api_keys: [{id: app, sha256: %s}]}
routes:
  - prefix: /v1/chat
    name: chat
    hooks:
      request_headers: {set: {x-tenant-id: "{tenant}"}, remove: [x-api-key]}
""" % ("a" * 64)

CLIENT = """
import asyncio, sys
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_pb2_grpc

def headers_request():
    fields = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "api.example.com",
              "x-meshtoll-tenant": "acme", "x-meshtoll-plan": "pro", "x-meshtoll-consumer": "app",
              "x-meshtoll-route": "chat", "x-meshtoll-extproc": "closed",
              "x-request-id": "4c7e1d52-0b1e-4f3a-9d2c-8e4f1a2b3c4d", "x-api-key": "k-secret"}
    headers = ext_proc_pb2.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in fields.items()]))
    return ext_proc_pb2.ProcessingRequest(request_headers=headers)

def log_message(entries):
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "meshtoll"
    for n in range(entries):
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = f"refused-{n}"
        entry.request.request_headers_bytes = 200
        entry.response.response_code.value = 401
        entry.response.response_headers_bytes = 90
        entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(2)
    return message

async def main(service, target, calls, concurrency, entries):
    async with grpc.aio.insecure_channel(target) as channel:
        if service == "extproc":
            stub = ext_proc_pb2_grpc.ExternalProcessorStub(channel)
            request = headers_request()

            async def caller(count):
                for _ in range(count):
                    call = stub.Process(timeout=120)
                    await call.write(request)
                    answer = await call.read()
                    assert answer.HasField("request_headers"), answer
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF
        else:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            message = log_message(entries)

            async def caller(count):
                async def messages():
                    for _ in range(count):
                        yield message
                await stub.StreamAccessLogs(messages(), timeout=600)

        await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


async def constant(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    """The floor's handler of either service: a constant answer to every message."""
    async for _ in requests:
        yield CONSTANT


CONSTANT = b"\x0a\x02\x0a\x00"  # a ProcessingResponse: request_headers, an empty CommonResponse in it


async def serve(server: str, floor: bool) -> tuple[int, Callable[[], Awaitable[None]]]:
    """The two services on `server`; its port and how to stop it."""
    policy = load_policy_text(POLICY, "policy.yaml")
    hooks = ExternalProcessorServicer(lambda: policy)
    meter = AccessLogServicer(Settlement(MemoryUsageStore(), clock=time.time))
    if server == "grpc-aio" and floor:
        import grpc

        aio = grpc.aio.server()
        handlers = {
            path.rsplit("/", 1)[1]: grpc.stream_stream_rpc_method_handler(constant)
            for path in (PROCESS, ACCESS_LOGS)
        }
        for path in (PROCESS, ACCESS_LOGS):
            service, name = path[1:].split("/")
            aio.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, {name: handlers[name]}),)
            )
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()
        return port, lambda: aio.stop(None)
    # Here, not at the top: main's code before round 9 has no streaming calls, and its
    # grpc.aio figure is counted with this script.
    from meshtoll.transport.h2_server import StreamHandler, serve_grpc

    sock = socket.create_server(("127.0.0.1", 0))
    streams: dict[str, StreamHandler] = (
        {PROCESS: constant, ACCESS_LOGS: constant}
        if floor
        else {PROCESS: hooks.process_stream, ACCESS_LOGS: meter.stream_access_logs}
    )
    listener = serve_grpc({}, sock, streams=streams)

    async def stop() -> None:
        listener.close()
        await listener.wait_closed()

    return sock.getsockname()[1], stop


async def serve_and_call(
    server: str, service: str, decisions: int, concurrency: int, entries: int, floor: bool
) -> float:
    """µs of this process's CPU per decision."""
    port, stop = await serve(server, floor)

    async def client(calls: int) -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            service,
            f"127.0.0.1:{port}",
            str(calls),
            str(concurrency),
            str(entries),
        )
        if await child.wait() != 0:
            raise RuntimeError("the client failed")

    try:
        await client(concurrency * 50)  # warm-up: the channel, the script loaded, caches
        calls = decisions // concurrency * concurrency
        started = time.process_time()
        await client(calls)
        spent = time.process_time() - started
    finally:
        await stop()
    return spent / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--service", choices=("extproc", "als"), required=True)
    parser.add_argument("--server", choices=("h2", "grpc-aio"), default="h2")
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="streams at once")
    parser.add_argument("--entries", type=int, default=1, help="entries in each access-log message")
    parser.add_argument("--floor", action="store_true", help="a constant answer, no service")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    args = parser.parse_args(argv)
    if args.server == "grpc-aio" and not args.floor:
        parser.error(
            "--server grpc-aio serves only --floor: the servicers' grpc.aio forms need main before round 9"
        )
    for _ in range(args.repeat):
        calling = serve_and_call(
            args.server, args.service, args.decisions, args.concurrency, args.entries, args.floor
        )
        spent = run_on_event_loop(calling, args.event_loop)
        print(f"{spent:.1f} µs CPU per {args.service} {'stream' if args.service == 'extproc' else 'message'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
