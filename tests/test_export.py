"""Usage records as billing systems take them: every field of one record, in each format.
Pure; tests/test_metering_through_envoy.py checks a real export against the ledger."""

from __future__ import annotations

import json
from dataclasses import replace

from meshtoll.meter.export import export
from meshtoll.usage.records import UsageRecord

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
    assert json.loads(export([RECORD], "cloudevents")) == {
        "specversion": "1.0",
        "id": "4b1f0c3e-req",
        "source": "meshtoll",
        "type": "io.meshtoll.request",
        "subject": "acme",
        "time": "2026-11-18T11:06:40.250Z",  # RFC 3339, UTC, milliseconds
        "datacontenttype": "application/json",
        "data": DATA,
    }


def test_a_lago_event_is_the_body_of_lagos_create_event_call() -> None:
    assert json.loads(export([RECORD], "lago")) == {
        "event": {
            "transaction_id": "4b1f0c3e-req",
            "external_subscription_id": "acme",
            "code": "api_requests",
            "timestamp": 1_795_000_000,  # Unix seconds
            "properties": DATA,
        }
    }


def test_json_lines_have_one_event_per_record_and_csv_a_header_and_a_row_per_record() -> None:
    second = replace(RECORD, request_id="second")
    assert [json.loads(line)["id"] for line in export([RECORD, second], "cloudevents").splitlines()] == [
        "4b1f0c3e-req",
        "second",
    ]
    assert export([RECORD, second], "csv").splitlines() == [
        "request_id,time,tenant,consumer,plan,route,method,status,request_bytes,response_bytes,duration_ms,units,source",
        "4b1f0c3e-req,1795000000.25,acme,ci,pro,search,GET,200,12,340,3.5,5,access_log",
        "second,1795000000.25,acme,ci,pro,search,GET,200,12,340,3.5,5,access_log",
    ]
