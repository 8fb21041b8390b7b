"""`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` on raw bytes: Envoy's
protobufs in and out, the rate-limit service's decision in between. Served by meshtoll's
own HTTP/2 server (`meshtoll serve` and `meshtoll ratelimit`, transport/h2_server.py,
`RLS_METHOD`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from time import perf_counter

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf.message import DecodeError

from meshtoll.counting.limits import RateLimit
from meshtoll.errors import InvalidRateLimitRequest, StorageError
from meshtoll.ratelimit.decision import Descriptor, RateLimitDecision
from meshtoll.ratelimit.rls_answer import AnswerEncoder, answer_message
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span, trace_carrier
from meshtoll.transport.h2_server import CallContext, StatusCode

_Request = rls_pb2.RateLimitRequest
# Envoy's RateLimitUnit numbers -> period names; UNKNOWN (0) and numbers beyond are not units.
_UNITS = {
    number: name.lower()
    for name, number in ratelimit_unit_pb2.RateLimitUnit.items()
    if number != ratelimit_unit_pb2.UNKNOWN
}


# Distinct requests whose parse is remembered (see RateLimitServicer._requests), and the
# largest remembered: Envoy's are a few hundred bytes, and a client may send megabytes.
_REQUEST_CACHE_LIMIT = 10_000
REMEMBERED_REQUEST_BYTES = 2048

RLS_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
RLS_METHOD = f"/{RLS_SERVICE}/ShouldRateLimit"  # its HTTP/2 :path


class RateLimitServicer:
    """ShouldRateLimit on raw bytes: the request parsed by upb
    (FromString, as the generated stub would) once per distinct request, the answer joined
    from pieces serialised once (rls_answer.py) rather than built as messages."""

    def __init__(
        self, service: RateLimitService, *, latency: Histogram | None = None, tracing: Tracing | None = None
    ) -> None:
        self._service = service
        self._answers = AnswerEncoder()
        self._latency = latency or Histogram()
        self._tracing = tracing
        # Request bytes -> what they say. Envoy sends the same bytes for the same
        # descriptors (a route's actions over a client's key, path, ...), so the recent ones
        # repeat; parsing them and converting their descriptors was a tenth of meshtoll's
        # work per call. Keyed by every byte, so nothing is taken from another request.
        self._requests: dict[bytes, _Parsed] = {}
        # ok, over_limit, unavailable (the "closed" failure policy), invalid (a request
        # envoyproxy/ratelimit refuses too), failed (cancelled by Envoy, or a bug). Not by domain:
        # whoever reaches the port names the domain, and labels must stay a bounded set.
        # Not a Counter: storing a Counter's item goes through a Python-level slot (it
        # defines __delitem__), and every call counts its outcome.
        self.outcomes: defaultdict[str, int] = defaultdict(int)

    async def should_rate_limit(self, request: bytes, context: CallContext) -> bytes:
        # One coroutine from the request to its answer: every layer of coroutines between
        # the server and the Redis reply is resumed again when the reply comes.
        started = perf_counter()
        span = None if self._tracing is None else self._tracing.start("ratelimit", trace_carrier(context, {}))
        outcome, domain = "failed", ""  # as far as the call got
        try:
            try:
                parsed = self._requests.get(request) or self._parse(request)
                domain = parsed.domain
                decision = await self._service.decide(domain, parsed.descriptors, parsed.hits_addend)
            except DecodeError:
                outcome = "invalid"
                # What grpcio answers when its own deserialiser fails (grpc-go too, for the peer).
                await context.abort(StatusCode.INTERNAL, "the request is not a RateLimitRequest")
                raise  # abort raises; this line only tells the type checker
            except StorageError:
                outcome = "unavailable"
                # The "closed" failure policy: UNAVAILABLE lets Envoy's failure_mode_deny refuse.
                await context.abort(StatusCode.UNAVAILABLE, "rate-limit store unavailable")
                raise
            except InvalidRateLimitRequest as exc:
                outcome = "invalid"
                # envoyproxy/ratelimit returns a plain Go error, which grpc-go sends as UNKNOWN.
                await context.abort(StatusCode.UNKNOWN, str(exc))
                raise
            outcome = "over_limit" if decision.over_limit else "ok"
            return self._answers.encode(decision)
        finally:
            self.outcomes[outcome] += 1
            self._latency.observe(perf_counter() - started)
            if span is not None:
                end_span(span, {"meshtoll.outcome": outcome, "meshtoll.domain": domain})

    def _parse(self, request: bytes) -> _Parsed:
        """Raises DecodeError and InvalidRateLimitRequest (neither is remembered)."""
        message = _Request.FromString(request)
        parsed = _Parsed(
            message.domain,
            tuple(descriptor_from_envoy(descriptor) for descriptor in message.descriptors),
            message.hits_addend,
        )
        if len(request) > REMEMBERED_REQUEST_BYTES:
            return parsed
        if len(self._requests) >= _REQUEST_CACHE_LIMIT:
            self._requests.clear()  # a flood of distinct requests costs what no cache would
        self._requests[request] = parsed
        return parsed

    @property
    def remembered_requests(self) -> int:
        return len(self._requests)


@dataclass(frozen=True, slots=True)
class _Parsed:
    domain: str
    descriptors: tuple[Descriptor, ...]
    hits_addend: int


async def should_rate_limit(
    service: RateLimitService, request: rls_pb2.RateLimitRequest
) -> rls_pb2.RateLimitResponse:
    """The answer to one RLS request as Envoy's message (the HTTP `/json` endpoint's).
    Raises StorageUnavailable and InvalidRateLimitRequest."""
    return answer_message(await decide(service, request))


async def decide(service: RateLimitService, request: rls_pb2.RateLimitRequest) -> RateLimitDecision:
    """The service's decision on one RLS request, whichever transport brought it."""
    descriptors = [descriptor_from_envoy(descriptor) for descriptor in request.descriptors]
    return await service.decide(request.domain, descriptors, request.hits_addend)


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
