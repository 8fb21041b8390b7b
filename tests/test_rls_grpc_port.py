"""`meshtoll ratelimit`'s gRPC port, served by meshtoll's own h2c server: what grpcio
clients (a health probe, a caller of the wrong method, a neighbouring pod) get from it."""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningRls, StartRls

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).parent / "fixtures" / "ratelimit" / "config"


@pytest.fixture(scope="module")
def rls(start_rls: StartRls, tmp_path_factory: pytest.TempPathFactory) -> RunningRls:
    root = tmp_path_factory.mktemp("runtime")
    (root / "ratelimit" / "config").mkdir(parents=True)
    shutil.copy(CONFIG / "basic_config.yaml", root / "ratelimit" / "config")
    return start_rls(root)


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


def test_calls_are_decided_and_counted(rls: RunningRls) -> None:
    """key3: one an hour, so the second call of the same value is over the limit."""
    request = rls_pb2.RateLimitRequest(
        domain="test-domain",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="key3", value=uuid.uuid4().hex)]
            )
        ],
    )
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
