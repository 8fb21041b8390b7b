"""The ledger in append order, where billing sinks read it.

Each batch of a tenant's new records is one ledger entry, and an entry's position (its
Redis stream id, `<ms>-<seq>`) grows with every append, whatever the records' own times:
reconciliation bills an admission whose access-log record never came half a minute or an
outage later, with the admission's time, after records of later requests were already
written. A reader that resumes by record time would skip such records; one that resumes
after a position cannot (sinks/ and meter/follower.py). Each entry also carries `last`, how
many records the tenant's ledger had after it, so that a record's place is a number and
how far a reader is behind is a subtraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshtoll.usage.records import UsageRecord

# Positions are `<ms since the epoch>-<sequence>`, as Redis stream ids; the memory store
# makes its own the same way.
LedgerPosition = str
LEDGER_START: LedgerPosition = "0-0"
_MAX_SEQUENCE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    position: LedgerPosition
    # Records appended to the tenant's ledger up to this entry included; None for entries
    # written before meshtoll counted them.
    last: int | None
    records: tuple[UsageRecord, ...]

    @property
    def appended(self) -> float:
        """When the entry was appended, Unix seconds (the store's clock)."""
        return position_time(self.position)

    def number_of(self, index: int) -> int | None:
        """The place in the tenant's ledger (1 = its first record ever) of records[index]."""
        return None if self.last is None else self.last - len(self.records) + index + 1


def position_time(position: LedgerPosition) -> float:
    return int(position.partition("-")[0]) / 1000


def position_key(position: LedgerPosition) -> tuple[int, int]:
    """A position as something that sorts in append order."""
    ms, _, sequence = position.partition("-")
    return int(ms), int(sequence or 0)


def position_preceding(position: LedgerPosition) -> LedgerPosition:
    """The position just before `position`: reading after it reads `position` again."""
    ms, sequence = position_key(position)
    if sequence > 0:
        return f"{ms}-{sequence - 1}"
    return LEDGER_START if ms == 0 else f"{ms - 1}-{_MAX_SEQUENCE}"


def position_before(moment: float) -> LedgerPosition:
    """The position just before every entry appended at `moment` or later (and, within the
    millisecond of `moment`, perhaps a little earlier: never later)."""
    # A float of today's Unix time in ms is exact to about 0.0002 ms: 1.0 s may be 999.9998 ms.
    ms = math.floor(moment * 1000 + 0.001)
    return LEDGER_START if ms <= 0 else f"{ms - 1}-{_MAX_SEQUENCE}"
