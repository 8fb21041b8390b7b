"""`meshtoll ratelimit`'s gRPC port, served by meshtoll's own h2c server: what grpcio
clients (a health probe, a caller of the wrong method, a neighbouring pod) get from it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.ratelimit.rls import RLS_METHOD
from meshtoll.transport.h2_server import ErrorCode
from tests.conftest import RunningRls, StartRls
from tests.test_h2_server import TIMEOUT, RawClient

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).parent / "fixtures" / "ratelimit" / "config"


def runtime_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    (root / "ratelimit" / "config").mkdir(parents=True)
    shutil.copy(CONFIG / "basic_config.yaml", root / "ratelimit" / "config")
    return root


@pytest.fixture(scope="module")
def rls(start_rls: StartRls, tmp_path_factory: pytest.TempPathFactory) -> RunningRls:
    return start_rls(runtime_root(tmp_path_factory))


def channel(rls: RunningRls) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}")


@pytest.mark.parametrize("service", ["", "ratelimit", "envoy.service.ratelimit.v3.RateLimitService"])
def test_health_check_is_serving(rls: RunningRls, service: str) -> None:
    with channel(rls) as open_channel:
        answer = health_pb2_grpc.HealthStub(open_channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(rls: RunningRls) -> None:
    with channel(rls) as open_channel, pytest.raises(grpc.RpcError) as failed:
        health_pb2_grpc.HealthStub(open_channel).Check(
            health_pb2.HealthCheckRequest(service="other"), timeout=5
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_is_not_served(rls: RunningRls) -> None:
    with channel(rls) as open_channel, pytest.raises(grpc.RpcError) as failed:
        next(health_pb2_grpc.HealthStub(open_channel).Watch(health_pb2.HealthCheckRequest(), timeout=5))
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_an_unknown_method_is_unimplemented(rls: RunningRls) -> None:
    with channel(rls) as open_channel, pytest.raises(grpc.RpcError) as failed:
        open_channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(b"", timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_request_that_is_not_a_rate_limit_request_is_an_internal_error(rls: RunningRls) -> None:
    with channel(rls) as open_channel, pytest.raises(grpc.RpcError) as failed:
        open_channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")(
            b"\xff\xff\xff", timeout=5
        )
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "the request is not a RateLimitRequest"


def key3_request() -> rls_pb2.RateLimitRequest:
    """key3: one an hour, of a value no other call has used."""
    return rls_pb2.RateLimitRequest(
        domain="test-domain",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="key3", value=uuid.uuid4().hex)]
            )
        ],
    )


def test_calls_are_decided_and_counted(rls: RunningRls) -> None:
    """key3: one an hour, so the second call of the same value is over the limit."""
    request = key3_request()
    with channel(rls) as open_channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(open_channel)
        answers = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
    assert answers == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]


def test_no_other_socket_can_join_the_port(rls: RunningRls) -> None:
    """grpcio set SO_REUSEPORT, which would let a second listener take part of the calls;
    this port is owned by the one process."""
    joining = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    joining.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with joining, pytest.raises(OSError, match="in use"):
        joining.bind(("127.0.0.1", rls.grpc_port))


class HeldRoadToRedis:
    """A TCP proxy to the real Redis that, once told to, holds the first bytes carrying
    `marker` (and whatever follows them from meshtoll) until released: a call kept in
    flight inside meshtoll for as long as a test needs, without a sleep."""

    def __init__(self, redis_port: int) -> None:
        self._redis = ("127.0.0.1", redis_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._released.set()
        self._listener.close()
        for connection in self._sockets:
            connection.close()

    def hold(self, marker: bytes) -> None:
        self._marker = marker

    def release(self) -> None:
        self._released.set()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._redis, timeout=TIMEOUT)
                self._sockets += (client, upstream)
                threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_redis: bool) -> None:
        with contextlib.suppress(OSError):  # closed by either end
            while data := source.recv(65536):
                if to_redis and self._marker is not None and self._marker in data:
                    self.held.set()
                    self._released.wait(TIMEOUT)
                sink.sendall(data)


async def test_sigterm_sends_goaway_and_answers_the_calls_in_flight(
    start_rls: StartRls, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Graceful drain: a call whose Redis reply has not come when SIGTERM arrives is still
    answered (after a GOAWAY that names it as the last stream taken), then the process exits."""
    with HeldRoadToRedis(urlsplit(redis_url).port or 0) as road:
        rls = start_rls(runtime_root(tmp_path_factory), REDIS_URL=f"127.0.0.1:{road.port}/0")
        client = await RawClient.open(rls.grpc_port)
        road.hold(b"EVALSHA")
        client.send(client.request(1, key3_request().SerializeToString(), RLS_METHOD))
        assert await asyncio.to_thread(road.held.wait, TIMEOUT), "the call never reached Redis"
        os.kill(rls.child.pid, signal.SIGTERM)
        assert await client.goaway() == (1, ErrorCode.NO_ERROR)
        road.release()
        message, trailers = await client.answer(1)
        assert trailers == {"grpc-status": "0"}
        assert rls_pb2.RateLimitResponse.FromString(message).overall_code == rls_pb2.RateLimitResponse.OK
        await client.closed()

        async def exited() -> int:
            while (code := rls.child.returncode) is None:
                await asyncio.sleep(0.05)
            return code

        assert await asyncio.wait_for(exited(), TIMEOUT) == 0
