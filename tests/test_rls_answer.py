"""The RLS answer joined from cached pieces is, byte for byte, the message Envoy's protobuf
classes would serialise for the same decision."""

from __future__ import annotations

import itertools

import pytest
from envoy.service.ratelimit.v3 import rls_pb2

from meshtoll.counting.limits import RateLimit
from meshtoll.envoyproxy_ratelimit.config_files import UNLIMITED_REMAINING
from meshtoll.ratelimit.decision import DescriptorStatus, RateLimitDecision
from meshtoll.ratelimit.rls_answer import AnswerEncoder, answer_message

LIMITS = [
    None,
    RateLimit(10, "second"),
    RateLimit(1_000_000_000, "day", name="daily"),
    RateLimit(5, "minute", algorithm="token_bucket", burst=300, name="burst"),
]
# Each varint length of a uint32, at its edges (one to five bytes).
REMAINING = [
    0,
    1,
    127,
    128,
    16_383,
    16_384,
    2**21 - 1,
    2**21,
    2**28 - 1,
    2**28,
    999_999_999,
    UNLIMITED_REMAINING,
]
RESETS = [0.0, 0.2, 1.0, 59.5, 86_400.0]

STATUSES = [
    DescriptorStatus(over, limit, remaining, reset)
    for over, limit, remaining, reset in itertools.product((False, True), LIMITS, REMAINING, RESETS)
]


@pytest.mark.parametrize("status", STATUSES, ids=str)
def test_one_status_is_serialised_as_the_message_would_be(status: DescriptorStatus) -> None:
    decision = RateLimitDecision(status.over_limit, (status,))
    assert AnswerEncoder().encode(decision) == answer_message(decision).SerializeToString()


def test_answers_of_several_statuses_and_repeated_pieces_are_the_messages_bytes() -> None:
    encoder = AnswerEncoder()
    for first, second, third in zip(STATUSES, STATUSES[7::3], STATUSES[11::5], strict=False):
        decision = RateLimitDecision(first.over_limit or third.over_limit, (first, second, third))
        encoded = encoder.encode(decision)
        assert encoded == answer_message(decision).SerializeToString()
        assert rls_pb2.RateLimitResponse.FromString(encoded) == answer_message(decision)


def test_answers_with_headers_or_metadata_carry_them() -> None:
    status = DescriptorStatus(False, LIMITS[1], 3, 1.0)
    decision = RateLimitDecision(
        False, (status,), (("x-ratelimit-limit", "10"),), {"hits": {"tenant": "acme"}}
    )
    parsed = rls_pb2.RateLimitResponse.FromString(AnswerEncoder().encode(decision))
    assert [(header.key, header.value) for header in parsed.response_headers_to_add] == [
        ("x-ratelimit-limit", "10")
    ]
    assert parsed.dynamic_metadata["hits"]["tenant"] == "acme"
