"""The rate-limit service's request and answer as plain values: what the gRPC adapter
(rls.py) translates Envoy's protobufs to and from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from meshtoll.counting.limits import RateLimit


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[tuple[str, str], ...]
    override: RateLimit | None = None  # the limit Envoy sent with the descriptor, if any
    hits_addend: int | None = None  # None: the request's

    def hits(self, request_hits: int) -> int:
        return request_hits if self.hits_addend is None else self.hits_addend


class DescriptorStatus(NamedTuple):
    """A named tuple, not a frozen dataclass, as RateLimitDecision: one or two are built per
    RLS call, and a frozen dataclass sets each field through object.__setattr__."""

    over_limit: bool
    limit: RateLimit | None  # the most restrictive limit that applied; None: no limit
    remaining: int
    reset_seconds: float


class RateLimitDecision(NamedTuple):
    over_limit: bool
    statuses: tuple[DescriptorStatus, ...]
    headers: tuple[tuple[str, str], ...] = ()  # for Envoy to add to the client's response
    dynamic_metadata: dict[str, Any] | None = None  # for Envoy's filter metadata
