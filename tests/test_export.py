"""Usage records as billing systems take them: every field of one record, in each format,
and every body valid against the target's published schema (tests/schemas). Pure;
tests/test_metering_through_envoy.py checks a real export against the ledger."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from meshtoll.meter.export import export
from meshtoll.policy import load_policy_text
from meshtoll.usage.records import UsageRecord
from tests.billing_schemas import LAGO_BATCH, check_cloudevent

RECORD = UsageRecord(
    request_id="4b1f0c3e-req", time=1_795_000_000.25, tenant="acme", consumer="ci", plan="pro",
    route="search", method="GET", status=200, request_bytes=12, response_bytes=340,
    duration_ms=3.5, units=5,
)  # fmt: skip
DATA = {
    "route": "search",
    "method": "GET",
    "status": 200,
    "units": 5,
    "consumer": "ci",
    "plan": "pro",
    "request_bytes": 12,
    "response_bytes": 340,
    "duration_ms": 3.5,
    "source": "access_log",
}


def test_a_cloudevent_is_a_structured_mode_cloudevents_1_0_json_event() -> None:
    event = json.loads(export([RECORD], "cloudevents"))
    assert event == {
        "specversion": "1.0",
        "id": "4b1f0c3e-req",
        "source": "meshtoll",
        "type": "io.meshtoll.request",
        "subject": "acme",
        "time": "2026-11-18T11:06:40.250Z",  # RFC 3339, UTC, milliseconds
        "datacontenttype": "application/json",
        "data": DATA,
    }
    check_cloudevent(event)


def test_a_lago_event_is_the_body_of_lagos_create_event_call_with_milliseconds() -> None:
    document = json.loads(export([RECORD], "lago"))
    assert document == {
        "event": {
            "transaction_id": "4b1f0c3e-req",
            "external_subscription_id": "acme",
            "code": "api_requests",
            # Unix seconds with milliseconds, a string: an integer would put every request of
            # one second at one instant.
            "timestamp": "1795000000.250",
            "properties": DATA,
        }
    }
    LAGO_BATCH.validate({"events": [document["event"]]})


def test_json_lines_have_one_event_per_record_and_csv_a_header_and_a_row_per_record() -> None:
    second = replace(RECORD, request_id="second")
    assert [json.loads(line)["id"] for line in export([RECORD, second], "cloudevents").splitlines()] == [
        "4b1f0c3e-req",
        "second",
    ]
    assert export([RECORD, second], "csv").splitlines() == [
        "request_id,time,tenant,consumer,plan,route,method,status,request_bytes,response_bytes,duration_ms,units,source",
        "4b1f0c3e-req,2026-11-18T11:06:40.250Z,acme,ci,pro,search,GET,200,12,340,3.5,5,access_log",
        "second,2026-11-18T11:06:40.250Z,acme,ci,pro,search,GET,200,12,340,3.5,5,access_log",
    ]


def test_the_csv_time_column_has_one_fixed_format_whatever_the_fraction() -> None:
    times = [1_795_000_000.0, 1_795_000_000.1, 1_795_000_000.123456]
    rows = export([replace(RECORD, time=moment) for moment in times], "csv").splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == [
        "2026-11-18T11:06:40.000Z",
        "2026-11-18T11:06:40.100Z",
        "2026-11-18T11:06:40.123Z",
    ]


def test_a_cloudevents_batch_is_one_json_array_each_item_an_openmeter_event() -> None:
    records = [replace(RECORD, request_id=f"r{index}") for index in range(3)]
    text = export(records, "cloudevents-batch")
    assert text.count("\n") == 1  # one document: the body of one batch ingest call
    batch = json.loads(text)
    assert [event["id"] for event in batch] == ["r0", "r1", "r2"]
    for event in batch:
        check_cloudevent(event)


def test_a_lago_batch_holds_at_most_100_events_a_line() -> None:
    records = [replace(RECORD, request_id=f"r{index}") for index in range(250)]
    batches = [json.loads(line) for line in export(records, "lago-batch").splitlines()]
    assert [len(batch["events"]) for batch in batches] == [100, 100, 50]
    assert [event["transaction_id"] for batch in batches for event in batch["events"]] == [
        record.request_id for record in records
    ]
    for batch in batches:
        LAGO_BATCH.validate(batch)


def test_the_policy_names_the_subject_subscription_and_meter_and_the_source_is_given() -> None:
    policy = load_policy_text(
        "plans: {pro: {meter: pro_calls}}\ntenants: {acme: {plan: pro, billing: "
        "{openmeter_subject: acme-corp, lago_subscription: sub_acme}}}\n",
        "policy.yaml",
    )
    event = json.loads(export([RECORD], "cloudevents", policy.billing, source="gateway-eu"))
    assert (event["source"], event["subject"], event["type"]) == ("gateway-eu", "acme-corp", "pro_calls")
    lago = json.loads(export([RECORD], "lago", policy.billing))["event"]
    assert (lago["external_subscription_id"], lago["code"]) == ("sub_acme", "pro_calls")


HEADER = "request_id,time,tenant,consumer,plan,route,method,status,request_bytes,response_bytes,duration_ms,units,source\n"


@pytest.mark.parametrize(
    ("form", "empty"),
    [("cloudevents-batch", "[]\n"), ("lago-batch", ""), ("cloudevents", ""), ("lago", ""), ("csv", HEADER)],
)
def test_no_records_export_as_an_empty_batch_or_nothing(form: str, empty: str) -> None:
    assert export([], form) == empty
