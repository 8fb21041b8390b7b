"""The access-log and ext_proc services' stream handlers (meter/als.py `stream_access_logs`,
extproc/service.py `process_stream`) on meshtoll's own h2c server, behind a real Envoy
configured with the project's own ext_proc filter and gRPC access logger (envoy/local.yaml's
`hooks_base` and `meter_als`): a hooked request has its headers changed both ways, and its
access-log entry settles the request's admission."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.extproc.service import ExternalProcessorServicer
from meshtoll.meter.als import AccessLogServicer
from meshtoll.meter.settle import Settlement
from meshtoll.policy import load_policy_text
from meshtoll.storage import MemoryUsageStore
from meshtoll.transport.h2_server import serve_grpc
from meshtoll.transport.http_listener import HttpListener, listening_socket
from meshtoll.usage.records import Admission
from tests.client import fetch
from tests.envoy_harness import envoy_process
from tests.test_h2_server import TIMEOUT
from tests.waiting import eventually_async

pytestmark = pytest.mark.integration

ENVOY_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "local.yaml"
ACCESS_LOG = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

POLICY = f"""
plans: {{pro: {{}}}}
tenants:
  acme: {{plan: pro, api_keys: [{{id: app, sha256: {hashlib.sha256(b"k-acme").hexdigest()}}}]}}
routes:
  - prefix: /v1/chat
    name: chat
    hooks:
      request_headers: {{set: {{x-tenant-id: "{{tenant}}"}}}}
      response_headers: {{set: {{x-served-for: "{{tenant}}"}}}}
"""


class Upstream:
    """An HTTP/1.1 upstream that answers 200 and keeps each request's head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
    protocol: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def bootstrap(grpc_port: int, upstream_port: int) -> dict[str, Any]:
    """One listener with the project's ext_proc filter (on every request: no authz here to
    mark one) and its gRPC access logger, both calling the h2c server as `meshtoll_grpc`."""
    shared = yaml.safe_load(ENVOY_TEMPLATE.read_text())["x-shared"]
    hooks = {**shared["hooks_base"], "stat_prefix": "hooks", "failure_mode_allow": False}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "streams",
        # The test's client plays authz: its request id is the one admitted.
        "preserve_external_request_id": True,
        "access_log": shared["meter_als"],
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": hooks},
            shared["router"],
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "streams",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("upstream", upstream_port, http2=False),
                cluster("meshtoll_grpc", grpc_port, http2=True),
            ],
        },
    }


@dataclass
class Gateway:
    url: str
    store: MemoryUsageStore
    settlement: Settlement
    hooks: ExternalProcessorServicer
    upstream: Upstream


@pytest.fixture
async def gateway(envoy_binary: Path, tmp_path: Path) -> AsyncIterator[Gateway]:
    store = MemoryUsageStore()
    settlement = Settlement(store, clock=time.time)
    policy = load_policy_text(POLICY, "policy.yaml")
    hooks = ExternalProcessorServicer(lambda: policy)
    meter = AccessLogServicer(settlement)
    grpc_sock = listening_socket("127.0.0.1", 0)
    listener: HttpListener = serve_grpc(
        {}, grpc_sock, streams={ACCESS_LOG: meter.stream_access_logs, PROCESS: hooks.process_stream}
    )
    upstream = Upstream()
    upstream_server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    try:
        upstream_port = upstream_server.sockets[0].getsockname()[1]
        envoy = envoy_process(
            "streams-envoy",
            bootstrap(grpc_sock.getsockname()[1], upstream_port),
            tmp_path,
            binary=envoy_binary,
        )
        try:
            await asyncio.to_thread(envoy.wait_ready, TIMEOUT)
            port = envoy.listener_ports()["streams"]
            yield Gateway(f"http://127.0.0.1:{port}/v1/chat", store, settlement, hooks, upstream)
        finally:
            await asyncio.to_thread(envoy.stop)
    finally:
        upstream_server.close()
        listener.close()
        await listener.wait_closed()
        await upstream_server.wait_closed()


async def test_a_hooked_request_is_processed_and_its_access_log_entry_settles_its_admission(
    gateway: Gateway,
) -> None:
    request_id = str(uuid.uuid4())
    await gateway.store.admit(
        [Admission(request_id, time.time(), "acme", "app", "pro", "chat", "GET", 1, False)]
    )
    identity = {
        "x-meshtoll-tenant": "acme",
        "x-meshtoll-plan": "pro",
        "x-meshtoll-consumer": "app",
        "x-meshtoll-route": "chat",
        "x-meshtoll-extproc": "closed",
        "x-request-id": request_id,
    }
    reply = await asyncio.to_thread(fetch, gateway.url, headers=identity)
    assert (reply.status, reply.headers.get("x-served-for")) == (200, "acme")
    (head,) = gateway.upstream.heads
    assert b"\r\nx-tenant-id: acme\r\n" in head
    assert b"x-meshtoll-extproc" not in head  # the marker has done its job
    assert gateway.hooks.outcomes["streams"] == 1
    await eventually_async(
        lambda: gateway.settlement.outcomes["billed"],
        lambda billed: billed == 1,
        timeout=TIMEOUT,
        message="the access-log entry settled",
    )
    usage = await gateway.store.usage("acme", time.strftime("%Y-%m", time.gmtime()))
    assert (usage.requests, usage.units) == (1, 1)
