"""Usage records: one per request, whatever told meshtoll about it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

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
        moment = datetime.fromtimestamp(self.time, UTC)
        return moment.strftime("%Y-%m"), moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))
