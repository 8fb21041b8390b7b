"""Usage records: one per request, whatever told meshtoll about it."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from meshtoll.wire import is_billable_status

Source = Literal["access_log", "admission"]
STREAMING_GRACE_SECONDS = 3600.0
# By status // 100: a lookup, where formatting the class costs half a microsecond per record.
_STATUS_CLASSES = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")


# Not frozen: a frozen dataclass sets each field through object.__setattr__, ten times the
# cost of a plain slot (3.7 µs against 0.4 for this one), and the meter builds one per
# request. Nothing changes a record once built.
@dataclass(slots=True)
class UsageRecord:
    request_id: str
    time: float  # Unix seconds, when Envoy received the request
    tenant: str
    consumer: str
    plan: str
    route: str  # the policy route's name, "" when none matched
    method: str
    status: int  # the response status; 0 when only the admission is known
    request_bytes: int
    response_bytes: int
    duration_ms: float
    units: int  # billable units: the route's cost, or what a hook derived from the body
    source: Source = "access_log"

    @property
    def status_class(self) -> str:
        return status_class(self.status)

    def periods(self) -> tuple[str, str, str]:
        """The month, day and hour (UTC) this record counts in."""
        return periods_of_hour(int(self.time // 3600))

    def as_document(self) -> dict[str, object]:
        """The record as the ledger keeps it, status_class included. Written out field by
        field: dataclasses.asdict deep-copies and costs several times more, and the meter
        runs this for every request."""
        return {
            "request_id": self.request_id,
            "time": self.time,
            "tenant": self.tenant,
            "consumer": self.consumer,
            "plan": self.plan,
            "route": self.route,
            "method": self.method,
            "status": self.status,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "duration_ms": self.duration_ms,
            "units": self.units,
            "source": self.source,
            "status_class": self.status_class,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> UsageRecord:
        fields = dict(document)
        fields.pop("status_class", None)
        return cls(**fields)


def status_class(status: int) -> str:
    """The counter a status counts in: "2xx" for 200 to 299, "unknown" outside 100 to 599."""
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "unknown"


@functools.lru_cache(maxsize=256)
def periods_of_hour(hour: int) -> tuple[str, str, str]:
    """The month, day and hour (UTC) of an hour counted from the epoch."""
    # Formatting dates costs microseconds, and a batch's records nearly all share an hour.
    moment = datetime.fromtimestamp(hour * 3600, UTC)
    return moment.strftime("%Y-%m"), moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H")


# What an access-log entry says about a request: (request id, tenant, status, request bytes,
# response bytes, duration in ms). Anything that can reach the meter's port can send one, so
# it decides nothing: it settles the admission of the same tenant and request id, or is
# dropped. The tenant is where to look for the admission, no more; "" when the entry names
# none (then its request id alone finds it, meter/settle.py). A plain tuple, read by
# unpacking: the meter makes one per request, and a slotted dataclass cost four times as
# much to build (0.99 µs against 0.24 on this host). The entry's own start time is not
# kept: a record is billed at its admission's time.
Observation = tuple[str, str, int, int, int, float]


_new_record = UsageRecord.__new__


@dataclass(slots=True)  # not frozen, as UsageRecord: authz builds one per admitted request
class Admission:
    """What authz knows of a request it let through: enough to bill it if its access-log
    record never arrives."""

    request_id: str
    time: float
    tenant: str
    consumer: str
    plan: str
    route: str
    method: str
    units: int  # the route's cost: what the request bills unless a body hook reports units
    # The route reads its units from the response body: its access-log record waits for
    # the units ext_proc reports before it is billed.
    awaits_report: bool = False

    def as_record(self) -> UsageRecord:
        """The record reconciliation bills when no access-log entry came: status, bytes and
        duration are what the entry would have told, unknown here. Built as `settled_by`
        builds its record (without the class's `__init__`, which was most of this method's
        cost): reconciliation runs it for every admitted request of an unmetered listener."""
        record = _new_record(UsageRecord)
        record.request_id = self.request_id
        record.time = self.time
        record.tenant = self.tenant
        record.consumer = self.consumer
        record.plan = self.plan
        record.route = self.route
        record.method = self.method
        record.status = 0
        record.request_bytes = 0
        record.response_bytes = 0
        record.duration_ms = 0.0
        record.units = self.units
        record.source = "admission"
        return record

    def settled_by(self, seen: Observation, reported: int | None) -> UsageRecord:
        """The record of this admitted request, now that its access-log entry told how it
        went: who, which route and how many units are authz's and ext_proc's word, never
        the log's."""
        _, _, status, request_bytes, response_bytes, duration_ms = seen
        # Every field set here, without UsageRecord's __init__: calling the class and its
        # generated __init__ with thirteen arguments was half of this method's cost, and the
        # meter runs it for every metered request. tests/test_meter_service.py holds it to
        # what __init__ builds, field for field, so a field added to UsageRecord must be set
        # here too.
        record = _new_record(UsageRecord)
        record.request_id = self.request_id
        record.time = self.time  # billed in the period authz admitted it, not the entry's
        record.tenant = self.tenant
        record.consumer = self.consumer
        record.plan = self.plan
        record.route = self.route
        record.method = self.method
        record.status = status
        record.request_bytes = request_bytes
        record.response_bytes = response_bytes
        record.duration_ms = duration_ms
        record.units = (self.units if reported is None else reported) if is_billable_status(status) else 0
        record.source = "access_log"
        return record

    def due(self) -> float:
        """When reconciliation may bill this admission without its access-log entry. A
        body-metered response can stream for minutes (an LLM's tokens), and its units are
        reported only at its end: its admission waits an hour more."""
        return self.time + (STREAMING_GRACE_SECONDS if self.awaits_report else 0.0)


@dataclass(slots=True)
class ReportedUnits:
    """The units a body hook read from an admitted request's response: what its admission
    bills, should the access-log record never come (the admission only knew the route's
    cost)."""

    tenant: str
    request_id: str
    units: int


def with_reported_units(admission: Admission, reported: int | None) -> Admission:
    return admission if reported is None else dataclasses.replace(admission, units=reported)
