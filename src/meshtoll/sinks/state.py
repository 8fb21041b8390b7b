"""Where a sink keeps what it must not forget, in the shared store: its cursor in each
tenant's ledger (with the batch in flight), a lease on them (one instance delivers at a
time), the records a target refused (the quarantine, replayable) and the windows `usage
push` delivered by hand. The stores are meshtoll.storage's (memory, Redis).

Why a cursor by append order and not by time: see usage/ledger.py. Why the batch in
flight is remembered with when it was first sent: a target forgets the ids it took after
a while (Stripe after 24 hours, OpenMeter's default after 24 hours), and a batch whose
answer was never seen must not be sent again once the target can no longer recognise it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshtoll.sinks.delivery import Refusal
from meshtoll.usage.ledger import LedgerPosition, position_key
from meshtoll.usage.records import UsageRecord

# How long a sink's lease lasts unless renewed; a call to a target must fit in a third of it
# (Settings bounds --usage-sink-timeout-seconds so), so that a batch in flight never
# outlives the lease it was sent under.
LEASE_SECONDS = 30.0
MAX_CALL_SECONDS = LEASE_SECONDS / 3
# A record's place in a tenant's ledger: its entry's position and its index in the entry.
Place = tuple[LedgerPosition, int]
# Past every record of an entry, whatever its length (at most 250 records).
WHOLE_ENTRY = 2**31


def place_key(place: Place) -> tuple[int, int, int]:
    return (*position_key(place[0]), place[1])


@dataclass(frozen=True, slots=True)
class Cursor:
    """A sink's place in one tenant's ledger: every record up to `last` is passed
    (delivered, quarantined, or covered by a push)."""

    last: Place
    number: int | None = None  # the place of `last` as a number (LedgerEntry.number_of)
    # The batch being delivered: up to which record, and when it was first sent.
    sending: Place | None = None
    sent_at: float | None = None

    def passed(self, place: Place) -> bool:
        return place_key(place) <= place_key(self.last)

    def as_document(self) -> dict[str, Any]:
        return {
            "last": list(self.last),
            "number": self.number,
            "sending": self.sending,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Cursor:
        sending = document.get("sending")
        return cls(
            (document["last"][0], document["last"][1]),
            document.get("number"),
            None if sending is None else (sending[0], sending[1]),
            document.get("sent_at"),
        )


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A record a target will not take (or that must not be sent again), kept with why."""

    record: UsageRecord
    refusal: Refusal
    at: float  # when it was quarantined

    @property
    def key(self) -> str:
        # Tenant names cannot hold ':' (policy names: letters, digits, '.', '_', '-').
        return f"{self.record.tenant}:{self.record.request_id}"

    def as_document(self) -> dict[str, Any]:
        return {
            "record": self.record.as_document(),
            "reason": self.refusal.reason,
            "answer": self.refusal.answer,
            "status": self.refusal.status,
            "at": self.at,
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Quarantined:
        refusal = Refusal(document["reason"], document["answer"], document.get("status"))
        return cls(UsageRecord.from_document(document["record"]), refusal, document["at"])


@dataclass(frozen=True, slots=True)
class PushedWindow:
    """What one `meshtoll usage push` delivered: the records with since <= time < until,
    in each tenant's ledger up to `through`."""

    since: float
    until: float
    through: dict[str, Place] = field(default_factory=dict)

    def covers(self, record: UsageRecord, place: Place) -> bool:
        last = self.through.get(record.tenant)
        return (
            last is not None
            and self.since <= record.time < self.until
            and place_key(place) <= place_key(last)
        )

    def as_document(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "through": {t: list(p) for t, p in self.through.items()},
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> PushedWindow:
        through = {tenant: (place[0], place[1]) for tenant, place in document["through"].items()}
        return cls(document["since"], document["until"], through)


class SinkStateStore(Protocol):
    """A sink's state, by sink name (its target). Every write that moves a sink forward is
    made only by the holder of the sink's lease, and says whether it still held it."""

    async def lease(self, sink: str, owner: str, seconds: float) -> bool:
        """Take the sink's lease for `seconds`, or extend it if `owner` holds it."""
        ...

    async def unlease(self, sink: str, owner: str) -> None:
        """Give the lease up, if `owner` holds it."""
        ...

    async def cursors(self, sink: str) -> dict[str, Cursor]: ...

    async def save(
        self,
        sink: str,
        owner: str,
        cursors: Mapping[str, Cursor],
        quarantine: Sequence[Quarantined] = (),
        settled: Sequence[str] = (),
    ) -> bool:
        """In one step: the tenants' new cursors, records into quarantine, and replayed
        records (by key) out of the replay queue. False, and nothing written, when `owner`
        no longer holds the lease."""
        ...

    async def quarantined(self, sink: str) -> list[Quarantined]: ...

    async def replay(self, sink: str, keys: Sequence[str] | None) -> int:
        """Move quarantined records (all of them for None) to the replay queue, which the
        sink delivers before anything else; how many moved."""
        ...

    async def replays(self, sink: str, limit: int) -> list[Quarantined]: ...

    async def pushed(self, sink: str) -> list[PushedWindow]: ...

    async def save_pushed(self, sink: str, owner: str, windows: Sequence[PushedWindow]) -> bool: ...

    async def close(self) -> None: ...
