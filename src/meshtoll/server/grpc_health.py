"""grpc.health.v1.Health/Check on meshtoll's own h2c server (transport/h2_server.py), on the
call's bytes: the answers both servers' health services give, and `meshtoll serve`'s.
Watch is not served (UNIMPLEMENTED): Envoy's and Kubernetes' gRPC probes call Check."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode

HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # its HTTP/2 :path
SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING
).SerializeToString()
NOT_SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.NOT_SERVING
).SerializeToString()


def requested_service(request: bytes) -> str:
    """The service a HealthCheckRequest names; CallAborted (INTERNAL, as grpcio answers a
    request its deserialiser refuses) for bytes that are not one."""
    try:
        service: str = health_pb2.HealthCheckRequest.FromString(request).service
    except DecodeError:
        raise CallAborted(StatusCode.INTERNAL, "the request is not a HealthCheckRequest") from None
    return service


class ServeHealth:
    """`meshtoll serve`'s health: its gRPC port opens once the services are built, so it
    answers SERVING for "" (the whole server) and each service it serves from the start, and
    NOT_SERVING from the moment it stops (draining: the admissions are refused, calls in flight
    finish), so that a gRPC health check stops sending before the port closes. Any other name
    is NOT_FOUND, as grpcio's health servicer answers."""

    def __init__(self, services: Iterable[str]) -> None:
        self._services = frozenset(("", *services))
        self.stopping = False

    def check(self, request: bytes, context: CallContext) -> bytes:
        service = requested_service(request)
        if service not in self._services:
            raise CallAborted(StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return NOT_SERVING if self.stopping else SERVING
