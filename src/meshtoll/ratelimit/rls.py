"""`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` on grpc.aio: Envoy's
protobufs in and out, the rate-limit service's decision in between."""

from __future__ import annotations

import math

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import duration_pb2

from meshtoll.counting.limits import RateLimit
from meshtoll.errors import InvalidRateLimitRequest, StorageError
from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus
from meshtoll.ratelimit.service import RateLimitService

_Response = rls_pb2.RateLimitResponse
_OK = _Response.OK
_OVER_LIMIT = _Response.OVER_LIMIT
# Envoy's RateLimitUnit numbers -> period names; UNKNOWN (0) and numbers beyond are not units.
_UNITS = {
    number: name.lower()
    for name, number in ratelimit_unit_pb2.RateLimitUnit.items()
    if number != ratelimit_unit_pb2.UNKNOWN
}


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, service: RateLimitService) -> None:
        self._service = service

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        try:
            return await should_rate_limit(self._service, request)
        except StorageError:
            # The "closed" failure policy: UNAVAILABLE lets Envoy's failure_mode_deny refuse.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate-limit store unavailable")
            raise  # abort raises; this line only tells the type checker
        except InvalidRateLimitRequest as exc:
            # envoyproxy/ratelimit returns a plain Go error, which grpc-go sends as UNKNOWN.
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
            raise


async def should_rate_limit(
    service: RateLimitService, request: rls_pb2.RateLimitRequest
) -> rls_pb2.RateLimitResponse:
    """The answer to one RLS request, whichever transport brought it (gRPC, or the HTTP
    `/json` endpoint). Raises StorageUnavailable and InvalidRateLimitRequest."""
    descriptors = [descriptor_from_envoy(descriptor) for descriptor in request.descriptors]
    decision = await service.decide(request.domain, descriptors, request.hits_addend)
    answer = _Response(
        overall_code=_OVER_LIMIT if decision.over_limit else _OK,
        statuses=[status_to_envoy(status) for status in decision.statuses],
    )
    if decision.headers:
        answer.response_headers_to_add.extend(
            base_pb2.HeaderValue(key=name, value=value) for name, value in decision.headers
        )
    if decision.dynamic_metadata is not None:
        answer.dynamic_metadata.update(decision.dynamic_metadata)
    return answer


def descriptor_from_envoy(descriptor: ratelimit_pb2.RateLimitDescriptor) -> Descriptor:
    entries = tuple((entry.key, entry.value) for entry in descriptor.entries)
    override = None
    if descriptor.HasField("limit"):
        limit = descriptor.limit
        period = _UNITS.get(limit.unit)
        if period is None:
            # envoyproxy/ratelimit panics on such a unit; an error answer is kinder to Envoy.
            raise InvalidRateLimitRequest(f"descriptor limit override has no valid unit ({limit.unit})")
        # An override has no name: envoyproxy/ratelimit answers with an empty one.
        override = RateLimit(limit.requests_per_unit, period)
    hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else None
    return Descriptor(entries, override, hits)


def status_to_envoy(status: DescriptorStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    answer = _Response.DescriptorStatus(
        code=_OVER_LIMIT if status.over_limit else _OK, limit_remaining=status.remaining
    )
    if status.limit is not None:
        answer.current_limit.CopyFrom(
            _Response.RateLimit(
                name=status.limit.name,
                requests_per_unit=status.limit.capacity,
                unit=_Response.RateLimit.Unit.Value(status.limit.period.upper()),
            )
        )
        answer.duration_until_reset.CopyFrom(_duration(status.reset_seconds))
    return answer


def _duration(seconds: float) -> duration_pb2.Duration:
    # Whole seconds, as envoyproxy/ratelimit sends them (rounded up: never an early retry).
    return duration_pb2.Duration(seconds=math.ceil(seconds))
