"""`envoy.service.ext_proc.v3.ExternalProcessor/Process`: one stream per hooked request.

Envoy's ext_proc filter only runs where authz marked the request (the `x-meshtoll-extproc`
header, for routes whose policy has hooks), and is configured to send the request headers
alone. The answer to those names everything else the route needs, through `mode_override`:
the response headers when they are changed or a body is to be read, and the response body
(buffered, up to Envoy's buffer limit) only when the route reads units from it. So a route
that only changes request headers costs one message, and no route pays for a body it does
not need.

Units read from a body go back to Envoy as dynamic metadata (`meshtoll.units`), where the
access log (and so the meter) and the rate-limit filter's `apply_on_stream_done` charge
find them; for limits enforced in the authz call, this service charges them itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from time import perf_counter

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from meshtoll.errors import StorageError
from meshtoll.extproc.hooks import (
    HeaderChanges,
    RequestContext,
    UsageFallback,
    header_changes,
    units_from_capped_body,
    wants_body,
    wants_response_headers,
)
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.model import Hooks
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span, trace_carrier
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.records import ReportedUnits
from meshtoll.wire import (
    CHARGE_KEY,
    CHARGE_UNITS,
    CONSUMER_HEADER,
    EXTPROC_HEADER,
    METADATA_NAMESPACE,
    PLAN_HEADER,
    REQUEST_ID_HEADER,
    ROUTE_HEADER,
    TENANT_HEADER,
    UNITS_KEY,
)

log = logging.getLogger("meshtoll.extproc")

_Mode = processing_mode_pb2.ProcessingMode
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
# Built once: the modes a hooked request can need after its request headers.
_NOTHING_MORE = _Mode(response_header_mode=_Mode.SKIP, response_body_mode=_Mode.NONE)
_RESPONSE_HEADERS = _Mode(response_header_mode=_Mode.SEND, response_body_mode=_Mode.NONE)
_RESPONSE_BODY = _Mode(response_header_mode=_Mode.SEND, response_body_mode=_Mode.BUFFERED_PARTIAL)
_NO_BODY = _Mode(response_body_mode=_Mode.NONE)


@dataclass(slots=True)
class _Stream:
    """What one request's stream has learned so far."""

    context: RequestContext
    hooks: Hooks
    route_cost: int
    request_id: str


class ExternalProcessorServicer:
    def __init__(
        self,
        policy: Callable[[], CompiledPolicy],
        limiter: Limiter | None = None,
        recorder: AdmissionRecorder | None = None,
        *,
        latency: Histogram | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`latency`: the time to answer each message of a stream; `tracing`: a span per
        stream, the child of the trace context Envoy sent (None: off)."""
        self._policy = policy
        self._limiter = limiter
        self._recorder = recorder
        self._latency = latency or Histogram()
        self._tracing = tracing
        # Outcomes by name: "units_from_body", "fallback_<reason>", "charge_failed", ...
        # Not a Counter: storing a Counter's item goes through a Python-level slot (it
        # defines __delitem__), and every hooked stream counts itself.
        self.outcomes: defaultdict[str, int] = defaultdict(int)
        self.body_bytes = 0  # response body bytes read for units

    async def process_stream(
        self, requests: AsyncIterator[bytes], context: CallContext
    ) -> AsyncIterator[bytes]:
        """Process on meshtoll's own h2c server (transport/h2_server.py): each
        ProcessingRequest's bytes in, its answer's bytes out, in order. The parse and the
        serialization happen in the stream's one generator: one more generator on each side
        cost 27,000 instructions a stream, 7% (bench/README.md, round 9)."""
        stream: _Stream | None = None
        span = None
        try:
            async for received in requests:
                message = _parse_processing_request(received)
                started = perf_counter()
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    headers = _header_dict(message.request_headers)
                    stream = self._stream(headers)
                    if self._tracing is not None:
                        span = self._tracing.start("extproc stream", trace_carrier(context, headers))
                    answer = _request_headers_response(stream)
                else:
                    answer = await self._answer(kind, stream, message)
                self._latency.observe(perf_counter() - started)
                if answer is not None:
                    yield answer.SerializeToString()
        finally:
            if span is not None:
                end_span(span, _stream_attributes(stream))

    async def _answer(
        self, kind: str | None, stream: _Stream | None, message: ext_proc_pb2.ProcessingRequest
    ) -> ext_proc_pb2.ProcessingResponse | None:
        if kind == "response_headers":
            return await self._response_headers(stream, message.response_headers)
        if kind == "response_body":
            return await self._response_body(stream, message.response_body)
        if kind == "request_body":
            return ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse())
        if kind == "request_trailers":
            return ext_proc_pb2.ProcessingResponse(request_trailers=ext_proc_pb2.TrailersResponse())
        if kind == "response_trailers":
            return ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())
        return None  # a kind this version of the protocol does not know: nothing to say

    def _stream(self, headers: dict[str, str]) -> _Stream | None:
        route_name = headers.get(ROUTE_HEADER, "")
        policy = self._policy()
        route = policy.hooked_routes.get(route_name)
        if route is None or TENANT_HEADER not in headers:
            # Marked by an older policy version (or not by authz at all): nothing to do.
            self.outcomes["unhooked"] += 1
            return None
        context = RequestContext(
            headers[TENANT_HEADER], headers.get(PLAN_HEADER, ""), headers.get(CONSUMER_HEADER, ""), route_name
        )
        self.outcomes["streams"] += 1
        assert route.hooks is not None
        return _Stream(context, route.hooks, route.cost, headers.get(REQUEST_ID_HEADER, ""))

    async def _response_headers(
        self, stream: _Stream | None, response_headers: ext_proc_pb2.HttpHeaders
    ) -> ext_proc_pb2.ProcessingResponse:
        if stream is None:
            return ext_proc_pb2.ProcessingResponse(response_headers=ext_proc_pb2.HeadersResponse())
        hooks = stream.hooks
        headers = _header_dict(response_headers)
        mutation = _mutation(header_changes(hooks.response_headers, stream.context))
        answer = ext_proc_pb2.ProcessingResponse(
            response_headers=ext_proc_pb2.HeadersResponse(
                response=ext_proc_pb2.CommonResponse(header_mutation=mutation)
            )
        )
        if hooks.usage_from_body is None:
            return answer
        status = _integer(headers.get(":status")) or 0
        body = wants_body(
            hooks, status, None if response_headers.end_of_stream else _integer(headers.get("content-length"))
        )
        if response_headers.end_of_stream and body is True:
            body = "field_missing"  # a success without a body says nothing about its units
        if body is not True:
            answer.mode_override.CopyFrom(_NO_BODY)
            if body is not False:
                await self._settle(stream, body, answer)
        return answer

    async def _response_body(
        self, stream: _Stream | None, body: ext_proc_pb2.HttpBody
    ) -> ext_proc_pb2.ProcessingResponse:
        answer = ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse())
        if stream is None or stream.hooks.usage_from_body is None:
            return answer
        self.body_bytes += len(body.body)
        # BUFFERED_PARTIAL: end_of_stream is False when Envoy's buffer filled first.
        units = units_from_capped_body(body.body, stream.hooks, complete=body.end_of_stream)
        await self._settle(stream, units, answer)
        return answer

    async def _settle(
        self, stream: _Stream, units: int | UsageFallback, answer: ext_proc_pb2.ProcessingResponse
    ) -> None:
        """Put the request's units into Envoy's dynamic metadata and charge them to the unit
        limits enforced in authz. Without a usable body, the route's cost stands in."""
        if isinstance(units, str):
            self.outcomes[f"fallback_{units}"] += 1
            log.debug("route %s: units from the route's cost (%s)", stream.context.route, units)
            units = stream.route_cost
        else:
            self.outcomes["units_from_body"] += 1
        self._report(stream, units)
        answer.dynamic_metadata.CopyFrom(_units_metadata(units))
        await self._charge(stream, units)

    def _report(self, stream: _Stream, units: int) -> None:
        """Tell the meter the request's units: authz admitted it at the route's cost, and its
        access-log record (or, should that be lost, its admission) bills these instead. The
        route's cost is reported too when the body said nothing, so that the record need
        not wait for a report that never comes."""
        if self._recorder is not None and stream.request_id:
            self._recorder.report_units(ReportedUnits(stream.context.tenant, stream.request_id, units))

    async def _charge(self, stream: _Stream, units: int) -> None:
        context = stream.context
        if self._limiter is None:
            return
        charges = self._policy().limits.charges(context.tenant, context.route, units, where="authz")
        if not charges:
            return
        try:
            await self._limiter.results(charges)
        except StorageError as exc:
            # The response is served either way; the meter still bills the units.
            self.outcomes["charge_failed"] += 1
            log.warning(
                "units of tenant %s not charged to its limits: %s",
                context.tenant,
                exc,
                extra={"request_id": stream.request_id},
            )


def _parse_processing_request(raw: bytes) -> ext_proc_pb2.ProcessingRequest:
    try:
        return ext_proc_pb2.ProcessingRequest.FromString(raw)
    except DecodeError:
        raise CallAborted(StatusCode.INVALID_ARGUMENT, "not a ProcessingRequest") from None


def _stream_attributes(stream: _Stream | None) -> dict[str, str]:
    if stream is None:
        return {"meshtoll.outcome": "unhooked"}
    context = stream.context
    return {
        "meshtoll.outcome": "hooked",
        "meshtoll.tenant": context.tenant,
        "meshtoll.plan": context.plan,
        "meshtoll.route": context.route,
        "meshtoll.request_id": stream.request_id,
    }


def _request_headers_response(stream: _Stream | None) -> ext_proc_pb2.ProcessingResponse:
    # The marker has done its job; the upstream does not need to see it.
    changes = HeaderChanges(remove=(EXTPROC_HEADER,))
    mode = _NOTHING_MORE
    if stream is not None:
        changes = header_changes(stream.hooks.request_headers, stream.context)
        changes = HeaderChanges(changes.set, changes.append, (*changes.remove, EXTPROC_HEADER))
        if stream.hooks.usage_from_body is not None:
            mode = _RESPONSE_BODY
        elif wants_response_headers(stream.hooks):
            mode = _RESPONSE_HEADERS
    return ext_proc_pb2.ProcessingResponse(
        request_headers=ext_proc_pb2.HeadersResponse(
            response=ext_proc_pb2.CommonResponse(header_mutation=_mutation(changes))
        ),
        mode_override=mode,
    )


def _mutation(changes: HeaderChanges) -> ext_proc_pb2.HeaderMutation:
    options = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=action
        )
        for pairs, action in ((changes.set, _OVERWRITE), (changes.append, _APPEND))
        for name, value in pairs
    ]
    return ext_proc_pb2.HeaderMutation(set_headers=options, remove_headers=changes.remove)


def _units_metadata(units: int) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    namespace = metadata.get_or_create_struct(METADATA_NAMESPACE)
    namespace[UNITS_KEY] = units
    # Read by the rate-limit filter's metadata action: the descriptor entry of a charge.
    namespace[CHARGE_KEY] = CHARGE_UNITS
    return metadata


def _header_dict(headers: ext_proc_pb2.HttpHeaders) -> dict[str, str]:
    # Envoy sends values in raw_value; `value` only from older versions.
    return {
        header.key: header.raw_value.decode("latin-1") if header.raw_value else header.value
        for header in headers.headers.headers
    }


def _integer(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    return int(text)
