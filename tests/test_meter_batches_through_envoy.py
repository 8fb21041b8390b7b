"""Envoy's OpenTelemetry logger, as meshtoll ships it, sends the meter Exports as large as the
configuration asks (64 KiB), not its 16 KiB default: the meter's work per call (a gRPC call,
a settle step, a Redis script call) is shared by about 700 records instead of 160: a tenth
of meshtoll's CPU a request in row (g) (bench/README.md, Round 8). Envoy 1.40 reads the
buffer's size only from the deprecated common_config and ignored it beside the newer
top-level grpc_service; nothing else showed it, since every record was still billed.

Here Envoy runs the shipped logger in front of a direct 200, its Exports going to a receiver
in this process that keeps their sizes; its flush interval is made longer than the test, so
that an Export leaves when the buffer is full, at any rate the machine sends."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshtoll.meter.otlp import LOGS_SERVICE
from meshtoll.render.local_filters import LocalFilters
from tests.envoy_harness import envoy_process

pytestmark = pytest.mark.integration

ENVOY_DEFAULT_BUFFER_BYTES = 16_384  # what Envoy buffers when it reads no buffer_size_bytes
SENDERS = 4
DEADLINE_SECONDS = 30.0
FLUSH_SECONDS = 3600  # never within the test


@dataclass
class Exports:
    """A LogsService that keeps the size of each Export and answers it at once."""

    sizes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.sizes.append(len(request))
        return b""  # an empty ExportLogsServiceResponse

    def largest(self) -> int:
        with self.lock:
            return max(self.sizes, default=0)


@pytest.fixture
def exports() -> Iterator[tuple[Exports, int]]:
    received = Exports()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(received.export)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(LOGS_SERVICE, {"Export": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield received, port
    finally:
        server.stop(None)


def bootstrap(logger: dict[str, Any], receiver_port: int) -> dict[str, Any]:
    """One listener answering 200 itself and logging every request with `logger`, whose
    cluster (meshtoll's gRPC port in the stack) is the receiver."""
    config = logger["typed_config"]
    grpc_service = config.get("common_config", config)["grpc_service"]  # the deprecated place or the new
    cluster = grpc_service["envoy_grpc"]["cluster_name"]
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "metered",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        "http_filters": [router],
        "access_log": [logger],
    }
    listener = {
        "name": "metered",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    endpoint = {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": receiver_port}}}
    }
    receiver = {
        "name": cluster,
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": [receiver]},
    }


def send_until(port: int, done: threading.Event) -> None:
    """GETs on one keep-alive connection, as fast as Envoy answers, until `done`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while not done.is_set():
            connection.request("GET", "/v1/items")
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200
    finally:
        connection.close()


def test_the_shipped_logger_fills_exports_past_envoys_default_buffer(
    exports: tuple[Exports, int], envoy_binary: Path, tmp_path: Path
) -> None:
    received, receiver_port = exports
    logger = LocalFilters.load().connection_manager("full")["access_log"][0]
    config = logger["typed_config"]
    # Flushed only when full, in the place the buffer's size is set: then an Export's size is
    # the buffer's, whatever rate this machine sends at.
    config.get("common_config", config)["buffer_flush_interval"] = f"{FLUSH_SECONDS}s"
    metered = bootstrap(logger, receiver_port)  # no deadline: the logger's calls have none
    envoy = envoy_process("meter-batches", metered, tmp_path, binary=envoy_binary, shipped_timeouts=True)
    try:
        envoy.wait_ready(60)
        port = envoy.listener_ports()["metered"]
        done = threading.Event()
        senders = [threading.Thread(target=send_until, args=(port, done)) for _ in range(SENDERS)]
        for sender in senders:
            sender.start()
        # A buffer of Envoy's default never sends more than 16 KiB and one record.
        deadline = time.monotonic() + DEADLINE_SECONDS
        while received.largest() <= 2 * ENVOY_DEFAULT_BUFFER_BYTES and time.monotonic() < deadline:
            time.sleep(0.1)
        done.set()
        for sender in senders:
            sender.join()
    finally:
        envoy.stop()
    assert received.largest() > 2 * ENVOY_DEFAULT_BUFFER_BYTES, sorted(received.sizes)[-5:]
