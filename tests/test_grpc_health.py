"""`meshtoll serve`'s gRPC health on the h2c server: SERVING for the whole server and each
service it serves, NOT_SERVING once it stops, NOT_FOUND for a name it does not serve."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from meshtoll.server.grpc_health import ServeHealth
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode

SERVICES = ("envoy.service.auth.v3.Authorization", "envoy.service.ratelimit.v3.RateLimitService")


def status(health: ServeHealth, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    answer = health_pb2.HealthCheckResponse.FromString(health.check(request, CallContext(())))
    return int(answer.status)


def test_the_whole_server_and_each_service_serve_until_it_stops() -> None:
    health = ServeHealth(SERVICES)
    for service in ("", *SERVICES):
        assert status(health, service) == health_pb2.HealthCheckResponse.SERVING
    health.stopping = True
    for service in ("", *SERVICES):
        assert status(health, service) == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("service", ["ratelimit.v2", "envoy.service.auth.v3.authorization"])
def test_a_service_not_served_is_not_found(service: str) -> None:
    with pytest.raises(CallAborted) as aborted:
        status(ServeHealth(SERVICES), service)
    assert aborted.value.code == StatusCode.NOT_FOUND


def test_bytes_that_are_not_a_health_request_end_the_call_internal() -> None:
    with pytest.raises(CallAborted) as aborted:
        ServeHealth(SERVICES).check(b"\x0a\x05ab", CallContext(()))
    assert aborted.value.code == StatusCode.INTERNAL
