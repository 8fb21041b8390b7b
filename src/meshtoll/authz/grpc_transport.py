"""`envoy.service.auth.v3.Authorization/Check`: Envoy's protobufs in and out, the shared
decision in between, served by meshtoll's own h2c server (transport/h2_server.py) on the
call's bytes (`check`)."""

from __future__ import annotations

from collections.abc import Awaitable
from time import perf_counter

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from opentelemetry.trace import Span

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Headers, decision_attributes
from meshtoll.ratelimit.verdict import rate_limit_pairs
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span, trace_carrier
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"  # its HTTP/2 :path
_RESPONSE_CACHE_LIMIT = 50_000
# The gRPC status tells Envoy why, for its stats and logs; the HTTP status in the denied
# response is what the client gets.
_GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
}


class AuthorizationServicer:
    def __init__(
        self, authorizer: Authorizer, *, latency: Histogram | None = None, tracing: Tracing | None = None
    ) -> None:
        """`latency`: each call's time in the servicer; `tracing`: a span per decision, the
        child of the trace context Envoy sent (None: off)."""
        self._authorizer = authorizer
        self._latency = latency or Histogram()
        self._tracing = tracing
        # An allow response depends only on headers and metadata: build each one once.
        self._allow_responses: dict[tuple[object, ...], AllowAnswer] = {}

    def check(self, request: bytes, context: CallContext) -> bytes | Awaitable[bytes]:
        """Check on the call's bytes: the answer's bytes, at once when the decision needs
        no wait (then the h2c server makes no Task for the call)."""
        started = perf_counter()
        try:
            message = external_auth_pb2.CheckRequest.FromString(request)
        except DecodeError:
            # What grpcio answers when its own deserialiser fails.
            raise CallAborted(StatusCode.INTERNAL, "the request is not a CheckRequest") from None
        check, span = self._begin(message, context)
        verdict = self._authorizer.check(check)
        if isinstance(verdict, Allow | Deny):
            return self._finish(verdict, check.request_id, started, span)
        return self._finish_later(verdict, check.request_id, started, span)

    async def _finish_later(
        self, verdict: Awaitable[Allow | Deny], request_id: str, started: float, span: Span | None
    ) -> bytes:
        return self._finish(await verdict, request_id, started, span)

    def _finish(self, verdict: Allow | Deny, request_id: str, started: float, span: Span | None) -> bytes:
        if isinstance(verdict, Deny):
            answer: bytes = denied_response(verdict, request_id).SerializeToString()
        else:
            answer = self._allow(verdict).encode(verdict)
        self._latency.observe(perf_counter() - started)
        if span is not None:
            end_span(span, decision_attributes(verdict, request_id))
        return answer

    def _begin(
        self, request: external_auth_pb2.CheckRequest, context: CallContext
    ) -> tuple[CheckRequest, Span | None]:
        check = check_request_from_envoy(request.attributes)
        span = None
        if self._tracing is not None:
            # Envoy's own span, when it traces, travels in the call's metadata; else the
            # client's traceparent among the request headers Envoy lets through.
            span = self._tracing.start("authz check", trace_carrier(context, check.headers))
        return check, span

    def _allow(self, allow: Allow) -> AllowAnswer:
        key = (allow.headers, allow.remove_headers, allow.route, allow.remove_query_params)
        cached = self._allow_responses.get(key)
        if cached is None:
            cached = AllowAnswer(allowed_response(allow))
            if len(self._allow_responses) >= _RESPONSE_CACHE_LIMIT:
                self._allow_responses.clear()
            self._allow_responses[key] = cached
        return cached


class AllowAnswer:
    """One allow response, as a message and as bytes serialised once. A verdict with
    RateLimit values gets bytes of its own: the cached parts around its headers, in the
    order protobuf's serialiser writes the fields (ok_response's response_headers_to_add,
    field 6, after its fields 2-5), so the answer parses to the message with those headers
    added (not always its bytes: the metadata Struct's map entries keep no order across
    serialisations)."""

    __slots__ = ("_head", "_ok", "_tail", "message", "whole")

    def __init__(self, message: external_auth_pb2.CheckResponse) -> None:
        self.message = message
        self.whole: bytes = message.SerializeToString()
        ok = message.ok_response
        # Past field 6 (query_parameters_to_set/remove): headers could not simply follow.
        self._ok: bytes | None = (
            None if ok.query_parameters_to_set or ok.query_parameters_to_remove else ok.SerializeToString()
        )
        self._head = external_auth_pb2.CheckResponse(status=message.status).SerializeToString()
        self._tail = external_auth_pb2.CheckResponse(
            dynamic_metadata=message.dynamic_metadata
        ).SerializeToString()

    def encode(self, allow: Allow) -> bytes:
        if allow.rate_limit is None:
            return self.whole
        options = _header_options(rate_limit_pairs(allow.rate_limit))
        if self._ok is None:
            answer = external_auth_pb2.CheckResponse()
            answer.CopyFrom(self.message)
            answer.ok_response.response_headers_to_add.extend(options)
            encoded: bytes = answer.SerializeToString()
            return encoded
        ok = self._ok + b"".join(
            _length_delimited(_RESPONSE_HEADERS_TO_ADD, o.SerializeToString()) for o in options
        )
        return b"".join((self._head, _length_delimited(_OK_RESPONSE, ok), self._tail))


# Wire tags (field number << 3 | 2, length-delimited) of the two fields AllowAnswer writes.
_OK_RESPONSE = bytes(((3 << 3) | 2,))
_RESPONSE_HEADERS_TO_ADD = bytes(((6 << 3) | 2,))


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    varint = bytearray()
    while size >= 0x80:
        varint.append((size & 0x7F) | 0x80)
        size >>= 7
    varint.append(size)
    return tag + varint + payload


def check_request_from_envoy(attributes: attribute_context_pb2.AttributeContext) -> CheckRequest:
    http = attributes.request.http
    headers = dict(http.headers)
    if not headers and http.header_map.headers:
        # Envoy sends `header_map` instead when `encode_raw_headers` is set.
        headers = {
            entry.key: entry.raw_value.decode("latin-1") or entry.value for entry in http.header_map.headers
        }
    source = attributes.source
    principal = source.principal
    return CheckRequest(
        method=http.method,
        path=http.path,
        headers=headers,
        source_address=source.address.socket_address.address,
        peer_uri_sans=(principal,) if principal.startswith("spiffe://") else (),
    )


def allowed_response(allow: Allow) -> external_auth_pb2.CheckResponse:
    metadata = struct_pb2.Struct()
    metadata.update(dict(allow.metadata))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=_header_options(allow.headers),
            headers_to_remove=list(allow.remove_headers),
            # An API key sent as a query parameter stops here too (Envoy 1.26+).
            query_parameters_to_remove=list(allow.remove_query_params),
        ),
        dynamic_metadata=metadata,
    )


def denied_response(deny: Deny, request_id: str) -> external_auth_pb2.CheckResponse:
    headers = (("content-type", "application/json"), *deny.headers)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODES.get(deny.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=deny.status),
            headers=_header_options(headers),
            body=deny.body(request_id).decode(),
        ),
    )


def _header_options(headers: Headers) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
        )
        for name, value in headers
    ]
