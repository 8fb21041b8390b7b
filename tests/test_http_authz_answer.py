"""The HTTP ext_authz answer to an allow that carries RateLimit headers: its head, built once
per set of headers, is the format the three values are written into, so whatever the head's
own headers say (a `%` included) reaches Envoy as it is, and each decision's values are its own."""

from __future__ import annotations

from typing import cast

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.verdict import Allow, CheckRequest, Verdict
from meshtoll.ratelimit.verdict import RateLimitState
from meshtoll.transport.http_server import response_head


class Deciding:
    """An authorizer that answers each request with the next of `verdicts`."""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self._verdicts = iter(verdicts)

    def check(self, request: CheckRequest) -> Verdict:
        return next(self._verdicts)


def allow(consumer: str, rate_limit: RateLimitState) -> Allow:
    headers = (("x-meshtoll-tenant", "acme"), ("x-meshtoll-consumer", consumer))
    return Allow("acme", "metered", consumer, "v1", headers, ("x-api-key",), {}, rate_limit)


def answer(handler: HttpAuthzHandler) -> bytes:
    reply = handler("GET", "/v1/items", {"x-request-id": "r1"}, "10.0.0.1")
    assert isinstance(reply, bytes)
    return reply


def test_an_allow_with_ratelimit_headers_carries_its_own_headers_as_they_are_and_its_own_values() -> None:
    verdicts: list[Verdict] = [allow("100%d off", (1000, 999, 60)), allow("100%d off", (1000, 998, 59))]
    handler = HttpAuthzHandler(cast(Authorizer, Deciding(verdicts)))
    head = response_head(
        200,
        "OK",
        (
            ("x-meshtoll-tenant", "acme"),
            ("x-meshtoll-consumer", "100%d off"),
            ("x-envoy-auth-headers-to-remove", "x-api-key"),
        ),
    )
    assert answer(handler) == (
        head
        + b"ratelimit-limit: 1000\r\nratelimit-remaining: 999\r\nratelimit-reset: 60\r\ncontent-length: 0\r\n\r\n"
    )
    # The second decision's head comes from the one built for the first: its values are its own.
    assert answer(handler) == (
        head
        + b"ratelimit-limit: 1000\r\nratelimit-remaining: 998\r\nratelimit-reset: 59\r\ncontent-length: 0\r\n\r\n"
    )
