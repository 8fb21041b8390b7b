"""Metering through a real Envoy: its batched gRPC access log reaches meshtoll's meter, and
every request of a tenant becomes exactly one usage record, within seconds."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
import time
from dataclasses import asdict, fields
from datetime import datetime
from decimal import Decimal

import pytest

from meshtoll.cli import main
from meshtoll.local.devstack import LocalStack
from meshtoll.storage import usage_store as opened_usage_store
from meshtoll.usage.records import UsageRecord
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually, wait_out_a_window_end

pytestmark = pytest.mark.integration

KEY = "k-metered"


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    # Usage and invoices default to the current UTC month, and the module reads them across
    # tests: a run that would start in a month's last two minutes waits for the next.
    wait_out_a_window_end("month", margin=120)
    path = tmp_path_factory.mktemp("metering") / "policy.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(
        "plans: {pro: {price: {currency: EUR, base_fee: '10.00', included_units: 10, tiers: "
        "[{up_to: 20, unit_price: '0.10'}, {up_to: null, unit_price: '0.05'}]}}, free: {}, "
        "yearly: {price: {currency: EUR, period: year, tiers: [{up_to: null, unit_price: '1.00'}]}}}\n"
        f"tenants: {{metered: {{plan: pro, api_keys: [{{id: ci, sha256: {digest}}}], allow: {{routes: [{{prefix: /v1/}}]}}}}, "
        "unpriced: {plan: free}, annual: {plan: yearly}}\n"
        "routes: [{prefix: /v1/search, name: search, cost: 5}, {prefix: /v1/, name: v1}]\n"
    )
    return start_stack(path)


def usage(stack: LocalStack, until_requests: int) -> dict[str, object]:
    """The metered tenant's usage once its `until_requests` are all billed."""
    found: dict[str, object] = eventually(
        lambda: fetch(f"{stack.meshtoll_admin_url}/api/tenants/metered/usage").json(),
        lambda document: document["requests"] == until_requests,
        timeout=5,
        message=f"the metered tenant's {until_requests} requests were not all billed",
    )
    return found


def test_n_requests_through_envoy_make_n_records_with_the_right_fields(
    stack: LocalStack, redis_url: str
) -> None:
    headers = {"x-api-key": KEY}
    for _ in range(7):
        assert fetch(stack.url("listen_full_port", "/v1/search?q=x"), headers=headers).status == 200
    for _ in range(3):
        assert (
            fetch(
                stack.url("listen_full_port", "/v1/items"), method="POST", headers=headers, body=b"{}"
            ).status
            == 200
        )
    assert fetch(stack.url("listen_full_port", "/admin"), headers=headers).status == 403  # not metered
    found = usage(stack, 10)
    assert found["requests"] == 10
    assert found["units"] == 7 * 5 + 3
    assert found["by_route"] == [
        {"route": "search", "requests": 7, "units": 35},
        {"route": "v1", "requests": 3, "units": 3},
    ]
    assert found["by_status"] == {"2xx": 10}
    assert found["unreconciled"] == 0
    assert set(found) == {"tenant", "period", "requests", "units", "by_route", "by_status", "unreconciled"}
    assert (found["tenant"], found["period"]) == ("metered", time.strftime("%Y-%m", time.gmtime()))
    assert all(set(item) == {"route", "requests", "units"} for item in found["by_route"])
    records = [asdict(r) for r in asyncio.run(ledger_of(redis_url, "metered"))]
    ids = [record["request_id"] for record in records]
    assert len(ids) == len(set(ids)) == 10  # one record per request, none twice
    post = next(record for record in records if record["method"] == "POST")
    assert (post["consumer"], post["plan"], post["route"], post["status"], post["units"]) == (
        "ci",
        "pro",
        "v1",
        200,
        1,
    )
    assert post["request_bytes"] > 0
    assert post["response_bytes"] > 0
    assert post["duration_ms"] >= 0
    assert abs(post["time"] - time.time()) < 30


def test_the_usage_api_names_unknown_tenants_and_bad_periods(stack: LocalStack) -> None:
    missing = fetch(f"{stack.meshtoll_admin_url}/api/tenants/nobody/usage")
    assert (missing.status, missing.json()["error"]) == (404, "unknown_tenant")
    bad = fetch(f"{stack.meshtoll_admin_url}/api/tenants/metered/usage?period=2026-13")
    assert (bad.status, bad.json()["error"]) == (400, "bad_period")


@pytest.mark.parametrize(
    ("path", "status", "error", "message"),
    [
        ("/nobody/invoice", 404, "unknown_tenant", "no tenant 'nobody' in the policy or in the usage store"),
        (
            "/metered/invoice?period=2026-13",
            400,
            "bad_period",
            "period '2026-13' is not a calendar month: expected YYYY-MM, e.g. 2026-11 "
            "(tenant 'metered' is billed by the month)",
        ),
        ("/metered/invoice?period=26-11", 400, "bad_period", None),
        ("/metered/invoice?period=2026-1", 400, "bad_period", None),
        ("/metered/invoice?period=2026", 400, "bad_period", None),
        (
            "/annual/invoice?period=2026-11",
            400,
            "bad_period",
            "period '2026-11' is not a calendar year: expected YYYY, e.g. 2026 (tenant 'annual' is billed by the year)",
        ),
        (
            "/unpriced/invoice",
            404,
            "not_billable",
            "tenant 'unpriced' is on plan 'free', which has no price",
        ),
    ],
    ids=[
        "unknown tenant",
        "month 13",
        "two-digit year",
        "one-digit month",
        "a year for a monthly price",
        "a month for a yearly price",
        "plan without a price",
    ],
)
def test_the_invoice_api_answers_errors_as_json_with_a_stable_code(
    stack: LocalStack, path: str, status: int, error: str, message: str | None
) -> None:
    found = fetch(f"{stack.meshtoll_admin_url}/api/tenants{path}")
    assert (found.status, found.headers["content-type"]) == (status, "application/json")
    document = found.json()
    assert set(document) == {"error", "message"}
    assert document["error"] == error
    if message is not None:
        assert document["message"] == message


def test_the_invoice_api_bills_a_yearly_price_for_the_current_year_by_default(stack: LocalStack) -> None:
    found = fetch(f"{stack.meshtoll_admin_url}/api/tenants/annual/invoice")
    assert found.status == 200
    assert (found.json()["period"], found.json()["total"]) == (time.strftime("%Y", time.gmtime()), "0.00")


def test_the_invoice_prices_metered_units_by_tier(
    stack: LocalStack, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage(stack, 10)["requests"] == 10  # after the test above
    bill = fetch(f"{stack.meshtoll_admin_url}/api/tenants/metered/invoice").json()
    assert [
        (line["description"], line["route"], line["units"], line["amount"]) for line in bill["lines"]
    ] == [
        ("base fee", "", 0, "10.00"),
        ("included units", "search", 10, "0"),
        ("tier 1", "search", 20, "2.00"),
        ("tier 2", "search", 5, "0.25"),
        ("tier 2", "v1", 3, "0.15"),
    ]
    assert (bill["currency"], bill["total"], bill["unreconciled"]) == ("EUR", "12.40", 0)
    assert set(bill) == {"tenant", "period", "currency", "lines", "total", "unreconciled"}
    assert (bill["tenant"], bill["period"]) == ("metered", time.strftime("%Y-%m", time.gmtime()))
    assert all(
        set(line) == {"description", "route", "units", "tier", "unit_price", "amount"}
        for line in bill["lines"]
    )
    assert [(line["tier"], line["unit_price"]) for line in bill["lines"]] == [
        (None, "10.00"),
        (None, "0"),
        (1, "0.10"),
        (2, "0.05"),
        (2, "0.05"),
    ]
    # Money is a decimal string, never a JSON number: a float would lose exact cents.
    money = [bill["total"], *(line[key] for line in bill["lines"] for key in ("unit_price", "amount"))]
    assert all(isinstance(amount, str) and Decimal(amount).is_finite() for amount in money)
    policy = str(stack.config.policy)
    arguments = ["billing", "invoice", "--tenant", "metered", "--policy", policy, "--redis-url", redis_url]
    assert main([*arguments, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == bill
    assert main([*arguments, "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "tenant,period,currency,description,route,units,tier,unit_price,amount,unreconciled"
    assert rows[-1].endswith(",total,,,,,12.40,0")
    assert main([*arguments]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "total EUR 12.40  (0 unreconciled)"


def exported(stack: LocalStack, redis_url: str, capsys: pytest.CaptureFixture[str], form: str) -> str:
    """The export of the metered tenant's last day, once its ten requests are counted: from
    yesterday (UTC) so that requests made just before midnight are in it whenever it runs."""
    assert usage(stack, 10)["requests"] == 10
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    arguments = ["usage", "export", "--since", yesterday, "--until", tomorrow, "--format", form]
    assert main([*arguments, "--tenant", "metered", "--redis-url", redis_url]) == 0
    return capsys.readouterr().out


def ledger_by_id(redis_url: str) -> dict[str, UsageRecord]:
    records = asyncio.run(ledger_of(redis_url, "metered"))
    assert len(records) == 10
    return {record.request_id: record for record in records}


# RFC 3339 date-time (section 5.6): full date, "T", full time with an offset or Z.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def test_usage_export_as_cloudevents_has_one_valid_event_per_ledger_record(
    stack: LocalStack, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [json.loads(line) for line in exported(stack, redis_url, capsys, "cloudevents").splitlines()]
    ledger = ledger_by_id(redis_url)
    ids = [event["id"] for event in events]
    assert sorted(ids) == sorted(ledger)  # one event per record, none twice
    for event in events:
        record = ledger[event["id"]]
        # CloudEvents 1.0 required attributes: specversion, id, source (a non-empty
        # URI-reference), type; optional ones meshtoll sets: subject (OpenMeter's customer),
        # time, datacontenttype, data. Source and type are spelled out: OpenMeter meters
        # select events by type, so changing either breaks users' meter definitions.
        assert event["specversion"] == "1.0"
        assert (event["source"], event["type"]) == ("meshtoll", "io.meshtoll.request")
        assert event["subject"] == "metered"
        assert RFC3339.fullmatch(event["time"]), event["time"]
        assert abs(datetime.fromisoformat(event["time"]).timestamp() - record.time) < 0.001
        assert event["datacontenttype"] == "application/json"
        assert (event["data"]["units"], event["data"]["route"]) == (record.units, record.route)
    assert sum(event["data"]["units"] for event in events) == 38


def test_usage_export_as_lago_events_has_one_event_per_ledger_record(
    stack: LocalStack, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = exported(stack, redis_url, capsys, "lago").splitlines()
    events = [json.loads(line)["event"] for line in lines]  # each line a POST /api/v1/events body
    ledger = ledger_by_id(redis_url)
    assert sorted(event["transaction_id"] for event in events) == sorted(ledger)
    for event in events:
        record = ledger[event["transaction_id"]]
        assert event["external_subscription_id"] == "metered"
        assert event["code"] == "api_requests"  # the billable metric's code, set up in Lago
        assert event["timestamp"] == f"{record.time:.3f}"  # Unix seconds with milliseconds
        assert (event["properties"]["units"], event["properties"]["route"]) == (record.units, record.route)
    assert sum(event["properties"]["units"] for event in events) == 38


def test_usage_export_as_csv_has_a_header_and_one_row_per_ledger_record(
    stack: LocalStack, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = exported(stack, redis_url, capsys, "csv")
    assert out.splitlines()[0] == ",".join(field.name for field in fields(UsageRecord))
    rows = list(csv.DictReader(io.StringIO(out)))
    ledger = ledger_by_id(redis_url)
    assert sorted(row["request_id"] for row in rows) == sorted(ledger)
    for row in rows:
        record = ledger[row["request_id"]]
        assert abs(datetime.fromisoformat(row["time"]).timestamp() - record.time) < 0.001
        assert (row["tenant"], row["route"], row["units"], row["status"]) == (
            "metered",
            record.route,
            str(record.units),
            str(record.status),
        )


def test_usage_export_refuses_a_bad_time(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["usage", "export", "--since", "yesterday", "--until", "2026-12-01", "--tenant", "metered"]
    assert main([*arguments, "--redis-url", redis_url]) == 1
    assert "--since 'yesterday' is not an ISO date or time" in capsys.readouterr().err


async def ledger_of(redis_url: str, tenant: str) -> list[UsageRecord]:
    async with opened_usage_store(redis_url) as store:
        return await store.ledger(tenant, 0, time.time() + 60)
