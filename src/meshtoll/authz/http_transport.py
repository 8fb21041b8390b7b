"""Envoy's HTTP ext_authz contract over meshtoll's lean HTTP server.

Envoy sends the client's method, path and headers; a 200 lets the request through and
Envoy copies the `x-meshtoll-*` response headers onto the upstream request and removes
those named in `x-envoy-auth-headers-to-remove`; any other status goes back to the client
with its headers and body.

That header is all an HTTP authorization service can remove: Envoy's HTTP client reads no
query parameter changes from it (only the gRPC CheckResponse has query_parameters_to_remove),
so an API key sent as a query parameter cannot be taken off here: the Envoy configurations
meshtoll ships remove it with a filter after ext_authz instead (local/envoy_config.py's
with_hidden_query_key), and a process logs once that it happened.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING

from meshtoll.authz.authorizer import Authorizer, PendingDecision
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Verdict, decision_attributes
from meshtoll.ratelimit.verdict import RATE_LIMIT_LINES
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.tracing import Tracing, end_span
from meshtoll.transport.http_server import EMPTY_BODY, response, response_head
from meshtoll.wire import PEER_ADDRESS_HEADER

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
_JSON = ("content-type", "application/json")
log = logging.getLogger("meshtoll.authz")
_ALLOW_CACHE_LIMIT = 50_000
# What follows an allow's head: its RateLimit lines and the end of the head.
_RATE_LIMIT_END = RATE_LIMIT_LINES + EMPTY_BODY
_DECIDED = (Allow, Deny)  # built once: `Allow | Deny` in a call makes a new union each time
_new_tuple = tuple.__new__

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class HttpAuthzHandler:
    def __init__(
        self, authorizer: Authorizer, *, latency: Histogram | None = None, tracing: Tracing | None = None
    ) -> None:
        """`latency`: each decision's time, from its request to its response; `tracing`: a
        span per decision, the child of the traceparent Envoy sent (None: off)."""
        self._authorizer = authorizer
        self._latency = latency or Histogram()
        self._tracing = tracing
        # An allow response depends only on its headers, so each distinct one is built once,
        # and for one that carries RateLimit headers, the format of its whole head.
        self._allow_responses: dict[tuple[object, ...], bytes] = {}
        self._allow_formats: dict[tuple[object, ...], bytes] = {}
        self._warned_query_key = False

    def __call__(
        self, method: str, target: str, headers: dict[str, str], peer: str
    ) -> bytes | Awaitable[bytes]:
        started = perf_counter()
        span = None if self._tracing is None else self._tracing.start("authz check", headers)
        xfcc = headers.get("x-forwarded-client-cert")
        # Built by tuple.__new__: the named tuple's constructor is a Python function around it.
        request = _new_tuple(
            CheckRequest,
            (
                method,
                target,
                headers,
                headers.get(PEER_ADDRESS_HEADER, peer),
                uri_sans_from_xfcc(xfcc) if xfcc else (),
            ),
        )
        verdict = self._authorizer.check(request)
        if not isinstance(verdict, _DECIDED):
            if type(verdict) is PendingDecision:
                # Waiting for a grant in flight: answered from the lease book's call, the
                # future handed to the server as it is (no Task).
                return verdict.answered(partial(self._finished, request, started, span))
            return self._respond_later(verdict, request, started, span)
        # The common path, answered at once: observed here rather than through one more call.
        answer = self._response(verdict, request)
        self._latency.observe(perf_counter() - started)
        if span is not None:
            end_span(span, decision_attributes(verdict, request.request_id))
        return answer

    async def _respond_later(
        self, pending: Awaitable[Allow | Deny], request: CheckRequest, started: float, span: Span | None
    ) -> bytes:
        return self._finished(request, started, span, await pending)

    def _finished(self, request: CheckRequest, started: float, span: Span | None, verdict: Verdict) -> bytes:
        """The answer to a decision that was not made at once, observed."""
        answer = self._response(verdict, request)
        self._latency.observe(perf_counter() - started)
        if span is not None:
            end_span(span, decision_attributes(verdict, request.request_id))
        return answer

    def _response(self, verdict: Allow | Deny, request: CheckRequest) -> bytes:
        if isinstance(verdict, Deny):
            return self._deny(verdict, request.request_id)  # an allow's answer has no request id
        if verdict.remove_query_params and not self._warned_query_key:
            self._warned_query_key = True
            log.warning(
                "an API key came as the query parameter %r on the HTTP authz transport, which cannot "
                "ask Envoy to remove it: the upstream sees it unless Envoy's header_mutation filter "
                "removes it after ext_authz, as meshtoll's own Envoy configurations do (README: "
                "Hidden credentials)",
                verdict.remove_query_params[0],
            )
        key = (verdict.headers, verdict.remove_headers)
        if verdict.rate_limit is not None:
            # Per-request RateLimit-* values: Envoy adds these to the client's response
            # (allowed_client_headers_on_success). The head built once is the format they
            # are written into: one step, no concatenation after it.
            head_format = self._allow_formats.get(key)
            if head_format is None:
                head_format = _cached(self._allow_formats, key, self._allow_format(verdict))
            return head_format % verdict.rate_limit
        cached = self._allow_responses.get(key)
        if cached is None:
            cached = _cached(self._allow_responses, key, response(200, "OK", self._allow_headers(verdict)))
        return cached

    def _allow_format(self, allow: Allow) -> bytes:
        """The head of an allow with RateLimit headers, as a format of their three values:
        a `%` the head's own headers carry is written as itself."""
        return response_head(200, "OK", self._allow_headers(allow)).replace(b"%", b"%%") + _RATE_LIMIT_END

    @staticmethod
    def _allow_headers(allow: Allow) -> tuple[tuple[str, str], ...]:
        if not allow.remove_headers:
            return allow.headers
        return (*allow.headers, ("x-envoy-auth-headers-to-remove", ",".join(allow.remove_headers)))

    @staticmethod
    def _deny(deny: Deny, request_id: str) -> bytes:
        reason = _REASONS.get(deny.status, "Denied")
        return response(deny.status, reason, (_JSON, *deny.headers), deny.body(request_id))


def _cached(cache: dict[tuple[object, ...], bytes], key: tuple[object, ...], built: bytes) -> bytes:
    if len(cache) >= _ALLOW_CACHE_LIMIT:
        cache.clear()
    cache[key] = built
    return built


def uri_sans_from_xfcc(value: str) -> tuple[str, ...]:
    """The URI SANs of the nearest client certificate in an X-Forwarded-Client-Cert header.

    Envoy is configured to sanitize the header and set it itself, so only its own element
    (the last one) speaks for the connection Envoy verified.
    """
    if not value:
        return ()
    element = _split_unquoted(value, ",")[-1]
    uris = []
    for pair in _split_unquoted(element, ";"):
        name, _, text = pair.partition("=")
        if name.strip().lower() == "uri":
            uris.append(text.strip().strip('"'))
    return tuple(uris)


def _split_unquoted(text: str, separator: str) -> list[str]:
    # XFCC values such as Subject="CN=a,O=b" quote the separators they contain.
    parts, start, quoted = [], 0, False
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts
