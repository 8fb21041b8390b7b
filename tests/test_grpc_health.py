"""`meshtoll serve`'s gRPC health on the h2c server: SERVING for the whole server and each
service it serves, NOT_SERVING once it stops, NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch)
for a name it does not serve; Watch tells of the change to NOT_SERVING as it happens."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.server.grpc_health import HEALTH_CHECK, HEALTH_WATCH, ServeHealth
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode, serve_grpc
from meshtoll.transport.http_listener import listening_socket

SERVICES = ("envoy.service.auth.v3.Authorization", "envoy.service.ratelimit.v3.RateLimitService")


def status(health: ServeHealth, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    answer = health_pb2.HealthCheckResponse.FromString(health.check(request, CallContext(())))
    return int(answer.status)


def test_the_whole_server_and_each_service_serve_until_it_stops() -> None:
    health = ServeHealth(SERVICES)
    for service in ("", *SERVICES):
        assert status(health, service) == health_pb2.HealthCheckResponse.SERVING
    health.stop()
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


async def test_watch_sends_the_status_then_not_serving_when_stopping_and_unknown_names_service_unknown() -> (
    None
):
    health = ServeHealth(SERVICES)
    sock = listening_socket("127.0.0.1", 0)
    Answer = health_pb2.HealthCheckResponse
    async with (
        serve_grpc({HEALTH_CHECK: health.check}, sock, streams={HEALTH_WATCH: health.watch}),
        grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        whole = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
        assert (await asyncio.wait_for(whole.read(), 30)).status == Answer.SERVING
        assert (await asyncio.wait_for(unknown.read(), 30)).status == Answer.SERVICE_UNKNOWN
        health.stop()
        assert (await asyncio.wait_for(whole.read(), 30)).status == Answer.NOT_SERVING
        late = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]))
        assert (await asyncio.wait_for(late.read(), 30)).status == Answer.NOT_SERVING
        for call in (whole, unknown, late):
            call.cancel()
