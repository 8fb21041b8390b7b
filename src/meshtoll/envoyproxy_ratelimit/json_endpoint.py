"""envoyproxy/ratelimit's HTTP `/json` endpoint, for clients that cannot speak gRPC: a
RateLimitRequest POSTed as proto3 JSON (Envoy's field names, `hitsAddend` or
`hits_addend`), its RateLimitResponse answered as proto3 JSON (`overallCode`,
`currentLimit`, `durationUntilReset` as "40s", fields at their defaults left out).

Statuses as envoyproxy/ratelimit's: 200 OK, 429 OVER_LIMIT, 400 for a body that is not such a request
and for a request the service refuses (an empty domain, no descriptors). One on purpose:
503 while Redis cannot answer (envoyproxy/ratelimit answers 400), since that is not the client's fault
and a client may retry; the gRPC port answers UNAVAILABLE for the same reason.
"""

from __future__ import annotations

import json

from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import json_format

from meshtoll.errors import InvalidRateLimitRequest, StorageError
from meshtoll.ratelimit.rls import should_rate_limit
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.transport.http_server import response

# envoyproxy/ratelimit's answers to what it cannot serve are Go's http.Error: plain text, the reason.
_TEXT = (("content-type", "text/plain; charset=utf-8"),)
BAD_REQUEST = response(400, "Bad Request", _TEXT, b"Bad Request\n")
UNAVAILABLE = response(503, "Service Unavailable", _TEXT, b"Service Unavailable\n")
_JSON = (("content-type", "application/json"),)


class JsonEndpoint:
    def __init__(self, service: RateLimitService) -> None:
        self._service = service

    async def answer(self, body: bytes) -> bytes:
        request = rls_pb2.RateLimitRequest()
        try:
            json_format.Parse(body, request)
        except (json_format.ParseError, ValueError):  # ValueError: not UTF-8
            return BAD_REQUEST
        try:
            answer = await should_rate_limit(self._service, request)
        except InvalidRateLimitRequest:
            return BAD_REQUEST
        except StorageError:
            return UNAVAILABLE
        document = json.dumps(json_format.MessageToDict(answer), separators=(",", ":")).encode()
        if answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
            return response(429, "Too Many Requests", _JSON, document)
        return response(200, "OK", _JSON, document)
