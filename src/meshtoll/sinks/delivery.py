"""What a sink promises: a batch of records in, a delivery result out, one per record.

An adapter per target (meshtoll.targets) speaks its HTTP API and sorts each record of the
batch into one of three: the target holds it now (new, or known before: a duplicate is a
success, delivered once in effect), the target refused it for good (with its answer: the
record is quarantined, never retried by itself, never blocking the stream), or neither yet
(a 5xx, a 429, a timeout: the rest is tried again later, after Retry-After if the target
gave one). The cursor, the retries and the quarantine around it are written once
(meter/follower.py), as storage is for Redis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshtoll.sinks.names import Target
from meshtoll.usage.records import UsageRecord

# Stable reasons a record is quarantined, besides the target's own refusal.
REFUSED = "refused"  # the target answered a 4xx for it (its answer is kept)
TOO_OLD = "too_old"  # older than the target accepts (Stripe: 35 days): never sent
# Sent once, its answer never seen, and the target has forgotten the id since: sending it
# again could count it twice, so a person decides (meshtoll usage quarantine).
UNCONFIRMED = "unconfirmed_past_dedup_window"


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # REFUSED, TOO_OLD, UNCONFIRMED
    answer: str  # the target's answer (its error, trimmed), or meshtoll's explanation
    status: int | None = None  # the HTTP status the target answered, if it did


@dataclass(frozen=True, slots=True)
class Retry:
    """The records neither delivered nor refused: try them again later."""

    reason: str  # "HTTP 503", "timeout", ...: for logs and nothing else
    after: float | None = None  # the target's Retry-After, in seconds


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt's result for a batch, by index into it. Every index is in `delivered` or
    `refused`, or else the whole rest awaits `retry`."""

    delivered: frozenset[int] = frozenset()
    refused: Mapping[int, Refusal] = field(default_factory=dict)
    retry: Retry | None = None

    def pending(self, size: int) -> list[int]:
        """The indexes of a batch of `size` this attempt left for another."""
        return [index for index in range(size) if index not in self.delivered and index not in self.refused]


class Sink(Protocol):
    """One billing target, spoken to over its API."""

    target: Target
    max_batch: int  # at most this many records per deliver()
    # How long the target recognises an id it has taken, in seconds; None: for good. Past
    # it, a record whose first delivery was never confirmed is not sent again.
    dedup_seconds: float | None

    def refusal_before_sending(self, record: UsageRecord, now: float) -> Refusal | None:
        """A record the target would refuse for good whatever happens (too old), without
        asking it; None for the others."""
        ...

    async def deliver(self, records: Sequence[UsageRecord]) -> Delivery: ...

    async def close(self) -> None: ...
