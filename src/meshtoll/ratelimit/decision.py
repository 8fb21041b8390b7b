"""The rate-limit service's request and answer as plain values: what the gRPC adapter
(rls.py) translates Envoy's protobufs to and from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshtoll.counting.limits import RateLimit


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[tuple[str, str], ...]
    override: RateLimit | None = None  # the limit Envoy sent with the descriptor, if any
    hits_addend: int | None = None  # None: the request's

    def hits(self, request_hits: int) -> int:
        return request_hits if self.hits_addend is None else self.hits_addend


@dataclass(frozen=True, slots=True)
class DescriptorStatus:
    over_limit: bool
    limit: RateLimit | None  # the most restrictive limit that applied; None: no limit
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    over_limit: bool
    statuses: tuple[DescriptorStatus, ...]
    headers: tuple[tuple[str, str], ...] = ()  # for Envoy to add to the client's response
    dynamic_metadata: dict[str, Any] | None = None  # for Envoy's filter metadata
