"""`envoy.service.auth.v3.Authorization/Check` on grpc.aio: Envoy's protobufs in and out,
the shared decision in between."""

from __future__ import annotations

from time import perf_counter

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Headers, decision_attributes
from meshtoll.ratelimit.verdict import rate_limit_pairs
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span, trace_carrier

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_RESPONSE_CACHE_LIMIT = 50_000
# The gRPC status tells Envoy why, for its stats and logs; the HTTP status in the denied
# response is what the client gets.
_GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
}


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self, authorizer: Authorizer, *, latency: Histogram | None = None, tracing: Tracing | None = None
    ) -> None:
        """`latency`: each call's time in the servicer; `tracing`: a span per decision, the
        child of the trace context Envoy sent (None: off)."""
        self._authorizer = authorizer
        self._latency = latency or Histogram()
        self._tracing = tracing
        # An allow response depends only on headers and metadata: build each one once.
        self._allow_responses: dict[tuple[object, ...], external_auth_pb2.CheckResponse] = {}

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = perf_counter()
        check = check_request_from_envoy(request.attributes)
        span = None
        if self._tracing is not None:
            # Envoy's own span, when it traces, travels in the call's metadata; else the
            # client's traceparent among the request headers Envoy lets through.
            span = self._tracing.start("authz check", trace_carrier(context, check.headers))
        verdict = self._authorizer.check(check)
        if not isinstance(verdict, Allow | Deny):
            verdict = await verdict
        answer = self._answer(verdict, check.request_id)
        self._latency.observe(perf_counter() - started)
        if span is not None:
            end_span(span, decision_attributes(verdict, check.request_id))
        return answer

    def _answer(self, verdict: Allow | Deny, request_id: str) -> external_auth_pb2.CheckResponse:
        if isinstance(verdict, Deny):
            return denied_response(verdict, request_id)
        if verdict.rate_limit is not None:
            # Per-request RateLimit-* values: copied onto the shared response, never into it.
            answer = external_auth_pb2.CheckResponse()
            answer.CopyFrom(self._allow(verdict))
            answer.ok_response.response_headers_to_add.extend(
                _header_options(rate_limit_pairs(verdict.rate_limit))
            )
            return answer
        return self._allow(verdict)

    def _allow(self, allow: Allow) -> external_auth_pb2.CheckResponse:
        key = (allow.headers, allow.remove_headers, allow.route, allow.remove_query_params)
        cached = self._allow_responses.get(key)
        if cached is None:
            cached = allowed_response(allow)
            if len(self._allow_responses) >= _RESPONSE_CACHE_LIMIT:
                self._allow_responses.clear()
            self._allow_responses[key] = cached
        return cached


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
