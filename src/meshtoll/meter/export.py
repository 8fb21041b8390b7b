"""Usage records for billing systems, as JSON lines (or CSV), idempotent on their side too:
every event carries the request id as its unique id.

- CloudEvents 1.0 for OpenMeter: `specversion`, `id` (request id), `source`, `type`,
  `subject` (the tenant), `time` (RFC 3339), `data`.
- Lago events: `transaction_id` (request id), `external_subscription_id` (the tenant),
  `code` (the billable metric), `timestamp` (Unix seconds), `properties`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any

from meshtoll.usage.records import UsageRecord

EVENT_TYPE = "io.meshtoll.request"
EVENT_SOURCE = "meshtoll"
LAGO_METRIC_CODE = "api_requests"
FORMATS = ("cloudevents", "lago", "csv")


def _properties(record: UsageRecord) -> dict[str, Any]:
    return {
        "route": record.route,
        "method": record.method,
        "status": record.status,
        "units": record.units,
        "consumer": record.consumer,
        "plan": record.plan,
        "request_bytes": record.request_bytes,
        "response_bytes": record.response_bytes,
        "duration_ms": record.duration_ms,
        "source": record.source,
    }


def cloudevent(record: UsageRecord) -> dict[str, Any]:
    moment = (
        datetime.fromtimestamp(record.time, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return {
        "specversion": "1.0",
        "id": record.request_id,
        "source": EVENT_SOURCE,
        "type": EVENT_TYPE,
        "subject": record.tenant,
        "time": moment,
        "datacontenttype": "application/json",
        "data": _properties(record),
    }


def lago_event(record: UsageRecord) -> dict[str, Any]:
    return {
        "event": {
            "transaction_id": record.request_id,
            "external_subscription_id": record.tenant,
            "code": LAGO_METRIC_CODE,
            "timestamp": int(record.time),
            "properties": _properties(record),
        }
    }


def export(records: Iterable[UsageRecord], form: str) -> str:
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(UsageRecord)], lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(record) for record in records)
        return out.getvalue()
    encode = cloudevent if form == "cloudevents" else lago_event
    return "".join(json.dumps(encode(record), separators=(",", ":")) + "\n" for record in records)
