"""Usage records as each billing target takes them, one event per record, each carrying the
record's request id as the id the target deduplicates on: the CloudEvents `id` (OpenMeter,
with the `source`), Lago's `transaction_id`, Stripe's `identifier`. What `meshtoll usage
export` writes and what the sinks send are these same functions.

- OpenMeter: a CloudEvents 1.0 event in structured JSON: `type` the meter, `subject` the
  tenant's subject, `time` RFC 3339 in UTC with milliseconds, `data` the record's
  properties (`units` among them: the value a meter sums).
- Lago: an `EventInputObject`: `code` the billable metric, `external_subscription_id`,
  `timestamp` Unix seconds as a string with milliseconds ("1796024981.846"; an integer
  would put every request of one second at the same instant), `properties`.
- Stripe: a meter event: `event_name`, `identifier`, `payload` (`stripe_customer_id` and
  `value`, both strings), `timestamp`: RFC 3339 for the v2 stream, Unix seconds for the
  v1 form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meshtoll.sinks.names import BillingNames
from meshtoll.usage.records import UsageRecord

DEFAULT_CLOUDEVENTS_SOURCE = "meshtoll"


def properties(record: UsageRecord) -> dict[str, Any]:
    """What a record tells beyond who and when, as every target's event carries it."""
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


def rfc3339(seconds: float) -> str:
    """UTC with milliseconds and a Z: 2026-11-18T11:06:40.250Z."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloudevent(record: UsageRecord, names: BillingNames, source: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": record.request_id,
        "source": source,
        "type": names.meter(record.plan, record.route, "openmeter"),
        "subject": names.account(record.tenant, "openmeter"),
        "time": rfc3339(record.time),
        "datacontenttype": "application/json",
        "data": properties(record),
    }


def lago_event(record: UsageRecord, names: BillingNames) -> dict[str, Any]:
    return {
        "transaction_id": record.request_id,
        "external_subscription_id": names.account(record.tenant, "lago"),
        "code": names.meter(record.plan, record.route, "lago"),
        "timestamp": f"{record.time:.3f}",
        "properties": properties(record),
    }


def stripe_payload(record: UsageRecord, names: BillingNames) -> dict[str, str]:
    # The meter's default payload keys: its customer mapping and its value settings.
    return {"stripe_customer_id": names.account(record.tenant, "stripe"), "value": str(record.units)}


def stripe_stream_event(record: UsageRecord, names: BillingNames) -> dict[str, Any]:
    """One event of the v2 meter event stream's `events` list."""
    return {
        "event_name": names.meter(record.plan, record.route, "stripe"),
        "identifier": record.request_id,
        "payload": stripe_payload(record, names),
        "timestamp": rfc3339(record.time),
    }


def stripe_form_event(record: UsageRecord, names: BillingNames) -> list[tuple[str, str]]:
    """The form fields of one v1 `/v1/billing/meter_events` call."""
    payload = stripe_payload(record, names)
    return [
        ("event_name", names.meter(record.plan, record.route, "stripe")),
        ("identifier", record.request_id),
        ("payload[stripe_customer_id]", payload["stripe_customer_id"]),
        ("payload[value]", payload["value"]),
        ("timestamp", str(int(record.time))),
    ]
