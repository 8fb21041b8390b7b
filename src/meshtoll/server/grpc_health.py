"""grpc.health.v1.Health on meshtoll's own HTTP/2 server (transport/h2_server.py), on the
call's bytes: the answers both servers' health services give, and `meshtoll serve`'s Check
and Watch (`meshtoll ratelimit` serves Check alone, as envoyproxy/ratelimit does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode

HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # its HTTP/2 :path
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING
).SerializeToString()
NOT_SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.NOT_SERVING
).SerializeToString()
SERVICE_UNKNOWN: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
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
    NOT_SERVING from the moment it stops (the admissions refused, calls in flight finishing).
    Only a Watch open at that moment sees it: the port closes in the same step (GOAWAY, new
    connections refused), so a checker that polls with Check sees the port go instead, as
    serve waits no drain period on any of its ports (a Kubernetes pod is taken out of its
    Service when it begins terminating, not by this answer). Check answers
    any other name NOT_FOUND, as grpcio's health servicer does; Watch, SERVICE_UNKNOWN, and
    holds the call, as health.proto says."""

    def __init__(self, services: Iterable[str]) -> None:
        self._services = frozenset(("", *services))
        self._stopping = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """From now on NOT_SERVING; every Watch is told."""
        self._stopping.set()

    def check(self, request: bytes, context: CallContext) -> bytes:
        service = requested_service(request)
        if service not in self._services:
            raise CallAborted(StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return NOT_SERVING if self.stopping else SERVING

    async def watch(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        """The status now, then each change (there is one: to NOT_SERVING when stopping); the
        call stays open until the client ends it or the server's shutdown does."""
        request = await anext(requests, None)
        if request is None:
            raise CallAborted(StatusCode.INTERNAL, "no HealthCheckRequest was sent")
        service = requested_service(request)
        if service not in self._services:
            yield SERVICE_UNKNOWN
        else:
            if not self.stopping:
                yield SERVING
                await self._stopping.wait()
            yield NOT_SERVING
        await asyncio.Future()  # held: nothing changes any more
