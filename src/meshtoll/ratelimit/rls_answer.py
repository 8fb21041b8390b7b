"""RateLimitResponse bytes without a message per call: the pieces that depend only on a
limit (a status's code and current_limit) or on a few small numbers (overall codes, reset
durations) are serialised once by the protobuf classes themselves and joined per answer,
with the counts between them encoded as protobuf varints. The bytes are those
SerializeToString gives for the same answer (fields in number order), which
tests/test_rls_answer.py checks; answers with headers or dynamic metadata, rare and larger,
are built as messages.

Measured in-process (issue 21): building and serialising the message cost about a quarter of
the service's own CPU per call; joining cached pieces a few percent.
"""

from __future__ import annotations

import math
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from meshtoll.counting.limits import RateLimit
from meshtoll.ratelimit.decision import DescriptorStatus, RateLimitDecision

_Response = rls_pb2.RateLimitResponse
_Status = _Response.DescriptorStatus
_OK = _Response.OK
_OVER_LIMIT = _Response.OVER_LIMIT
_LENGTH_DELIMITED = 2
_VARINT = 0
_CACHE_LIMIT = 10_000
_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


def answer_message(decision: RateLimitDecision) -> rls_pb2.RateLimitResponse:
    """The decision as Envoy's message (the JSON endpoint's answer, and the reference for
    AnswerEncoder)."""
    answer = _Response(
        overall_code=_OVER_LIMIT if decision.over_limit else _OK,
        statuses=[status_message(status) for status in decision.statuses],
    )
    if decision.headers:
        answer.response_headers_to_add.extend(
            base_pb2.HeaderValue(key=name, value=value) for name, value in decision.headers
        )
    if decision.dynamic_metadata is not None:
        answer.dynamic_metadata.update(decision.dynamic_metadata)
    return answer


def status_message(status: DescriptorStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    answer = _Status(code=_OVER_LIMIT if status.over_limit else _OK, limit_remaining=status.remaining)
    if status.limit is not None:
        answer.current_limit.CopyFrom(_limit_message(status.limit))
        answer.duration_until_reset.CopyFrom(_duration(status.reset_seconds))
    return answer


class AnswerEncoder:
    """Serialised answers from pieces built once (per limit, per reset in seconds)."""

    def __init__(self) -> None:
        self._overall = {
            over: _Response(overall_code=_OVER_LIMIT if over else _OK).SerializeToString()
            for over in (False, True)
        }
        self._statuses_tag = _tag(_Response, "statuses", _LENGTH_DELIMITED)
        self._remaining_tag = _tag(_Status, "limit_remaining", _VARINT)
        self._reset_tag = _tag(_Status, "duration_until_reset", _LENGTH_DELIMITED)
        # (over, id of the limit) -> the limit and its head: keyed by identity, not by the
        # limit's value (a dataclass hash, a Python call per answer); the entry holds the
        # limit, so its id cannot be another's while it is remembered.
        self._heads: dict[tuple[bool, int], tuple[RateLimit | None, bytes]] = {}
        self._resets: dict[int, bytes] = {}

    def encode(self, decision: RateLimitDecision) -> bytes:
        if decision.headers or decision.dynamic_metadata is not None:
            encoded: bytes = answer_message(decision).SerializeToString()
            return encoded
        statuses_tag = self._statuses_tag
        parts = [self._overall[decision.over_limit]]
        for status in decision.statuses:
            body = self._status(status)
            parts += (statuses_tag, _varint(len(body)), body)
        return b"".join(parts)

    def _status(self, status: DescriptorStatus) -> bytes:
        limit = status.limit
        found = self._heads.get((status.over_limit, id(limit)))
        head = (
            self._remember_head(status.over_limit, limit)
            if found is None or found[0] is not limit
            else found[1]
        )
        remaining = self._remaining_tag + _varint(status.remaining) if status.remaining else b""
        if limit is None:
            return head + remaining
        return head + remaining + self._reset(math.ceil(status.reset_seconds))

    def _remember_head(self, over: bool, limit: RateLimit | None) -> bytes:
        head = _Status(code=_OVER_LIMIT if over else _OK)
        if limit is not None:
            head.current_limit.CopyFrom(_limit_message(limit))
        if len(self._heads) >= _CACHE_LIMIT:
            self._heads.clear()  # limits come from configuration and Envoy's overrides: few
        encoded: bytes = head.SerializeToString()
        self._heads[(over, id(limit))] = (limit, encoded)
        return encoded

    def _reset(self, seconds: int) -> bytes:
        found = self._resets.get(seconds)
        if found is None:
            duration = duration_pb2.Duration(seconds=seconds).SerializeToString()
            found = self._reset_tag + _varint(len(duration)) + duration
            if len(self._resets) >= _CACHE_LIMIT:
                self._resets.clear()
            self._resets[seconds] = found
        return found


def _limit_message(limit: RateLimit) -> rls_pb2.RateLimitResponse.RateLimit:
    return _Response.RateLimit(
        name=limit.name,
        requests_per_unit=limit.capacity,
        unit=_Response.RateLimit.Unit.Value(limit.period.upper()),
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    # Whole seconds, as envoyproxy/ratelimit sends them (rounded up: never an early retry).
    return duration_pb2.Duration(seconds=math.ceil(seconds))


def _tag(message: Any, field: str, wire_type: int) -> bytes:
    """A field's key on the wire: its number (from the message's descriptor) and wire type."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    # The common sizes in one expression each, not a loop per byte: a status's length and
    # small counts fit one byte; remaining counts of large limits, up to five.
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21))
    if value < 0x800000000:  # every uint32 (limit_remaining is one)
        return bytes(
            (
                value & 0x7F | 0x80,
                value >> 7 & 0x7F | 0x80,
                value >> 14 & 0x7F | 0x80,
                value >> 21 & 0x7F | 0x80,
                value >> 28,
            )
        )
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
