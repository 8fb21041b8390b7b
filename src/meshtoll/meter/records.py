"""Usage records: one per request, whatever told meshtoll about it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import orjson

Source = Literal["access_log", "admission"]


@dataclass(frozen=True, slots=True)
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
        return f"{self.status // 100}xx" if self.status else "unknown"

    def periods(self) -> tuple[str, str, str]:
        """The month, day and hour (UTC) this record counts in."""
        return _periods_of_hour(int(self.time // 3600))

    def to_json(self) -> bytes:
        """The record as the usage store and the ledger keep it (status_class included).
        Written out field by field: dataclasses.asdict deep-copies and costs several times
        more; orjson encodes in a fifth of the json module's time, and the meter runs this
        for every request."""
        return orjson.dumps(
            {
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
        )


@functools.lru_cache(maxsize=256)
def _periods_of_hour(hour: int) -> tuple[str, str, str]:
    # Formatting dates costs microseconds, and a batch's records nearly all share an hour.
    moment = datetime.fromtimestamp(hour * 3600, UTC)
    return moment.strftime("%Y-%m"), moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H")


@dataclass(frozen=True, slots=True)
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
    units: int

    def as_record(self) -> UsageRecord:
        # Status, bytes and duration are what the access log would have told: unknown here.
        return UsageRecord(
            self.request_id, self.time, self.tenant, self.consumer, self.plan, self.route, self.method,
            status=0, request_bytes=0, response_bytes=0, duration_ms=0.0,
            units=self.units, source="admission",
        )  # fmt: skip
