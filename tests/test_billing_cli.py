"""`meshtoll billing invoice` and `meshtoll usage show` on a real Redis: usage recorded
straight into the usage store for a past month, then read and invoiced the way an operator
would, in each output form."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.records import Source, UsageRecord

pytestmark = pytest.mark.integration  # every test reads and writes the session's Redis

POLICY = """
plans:
  pro: {price: {currency: EUR, base_fee: "10.00", tiers: [{up_to: null, unit_price: "0.10"}]}}
  team: {price: {currency: USD, tiers: [{up_to: null, unit_price: "1.00"}]}}
  annual: {price: {currency: EUR, period: year, tiers: [{up_to: null, unit_price: "1.00"}]}}
  free: {}
tenants:
  billcli-pro: {plan: pro}
  billcli-team: {plan: team}
  billcli-annual: {plan: annual}
  billcli-free: {plan: free}
"""
MARCH_2025 = 1_741_000_000.0  # 2025-03-03, UTC
NOVEMBER_2025 = 1_762_000_000.0  # 2025-11-01, UTC
DECEMBER_2024 = 1_735_000_000.0  # 2024-12-24, UTC


def record(
    request_id: str, tenant: str, units: int, source: Source = "access_log", at: float = MARCH_2025
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, time=at, tenant=tenant, consumer="ci", plan="", route="search",
        method="GET", status=200, request_bytes=0, response_bytes=0, duration_ms=1.0, units=units,
        source=source,
    )  # fmt: skip


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Path:
    """The policy, with March 2025 usage recorded: billcli-pro 5 units (one request billed
    from its admission), billcli-free 7 units, billcli-team none; and billcli-annual 2 units
    in March 2025, 3 in November 2025, 4 in December 2024."""
    path = tmp_path_factory.mktemp("billing") / "policy.yaml"
    path.write_text(POLICY)
    records = [
        record("pro-1", "billcli-pro", 2),
        record("pro-2", "billcli-pro", 3, source="admission"),
        record("free-1", "billcli-free", 7),
        record("annual-1", "billcli-annual", 2),
        record("annual-2", "billcli-annual", 3, at=NOVEMBER_2025),
        record("annual-3", "billcli-annual", 4, at=DECEMBER_2024),
    ]

    async def write() -> None:
        store = RedisUsageStore(redis_url)
        try:
            assert await store.record(records) == len(records)
        finally:
            await store.close()

    asyncio.run(write())
    return path


def invoice(policy: Path, redis_url: str, *arguments: str) -> int:
    return main(["billing", "invoice", "--policy", str(policy), "--redis-url", redis_url, *arguments])


def test_billing_invoice_all_bills_every_tenant_whose_plan_has_a_price_for_its_current_period(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = time.gmtime()
    assert invoice(policy, redis_url, "--all", "--format", "json") == 0
    after = time.gmtime()
    documents = json.loads(capsys.readouterr().out)
    # The command reads the clock itself: a run across midnight UTC at a month's end may
    # take either side's periods, and nothing between them.
    assert [(d["tenant"], d["period"]) for d in documents] in [
        [
            ("billcli-annual", time.strftime("%Y", at)),
            ("billcli-pro", time.strftime("%Y-%m", at)),
            ("billcli-team", time.strftime("%Y-%m", at)),
        ]
        for at in (before, after)
    ]


def test_billing_invoice_all_for_a_month_bills_every_tenant_priced_by_the_month(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoice(policy, redis_url, "--all", "--period", "2025-03", "--format", "json") == 0
    documents = json.loads(capsys.readouterr().out)
    assert [(d["tenant"], d["period"], d["currency"], d["total"], d["unreconciled"]) for d in documents] == [
        ("billcli-pro", "2025-03", "EUR", "10.50", 1),
        ("billcli-team", "2025-03", "USD", "0.00", 0),  # no usage: still invoiced
    ]


def test_a_yearly_price_is_invoiced_for_a_year_from_its_twelve_months(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoice(policy, redis_url, "--all", "--period", "2025", "--format", "json") == 0
    documents = json.loads(capsys.readouterr().out)
    assert [(d["tenant"], d["period"], d["total"]) for d in documents] == [("billcli-annual", "2025", "5.00")]
    assert invoice(policy, redis_url, "--tenant", "billcli-annual", "--period", "2025") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "total EUR 5.00  (0 unreconciled)"
    assert invoice(policy, redis_url, "--tenant", "billcli-annual", "--period", "2025-03") == 1
    assert capsys.readouterr().err == (
        "meshtoll: --period '2025-03' is not a calendar year: expected YYYY, e.g. 2026 "
        "(tenant 'billcli-annual' is billed by the year)\n"
    )


def test_billing_invoice_all_as_csv_has_each_invoices_lines_and_total_with_its_unreconciled_count(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoice(policy, redis_url, "--all", "--period", "2025-03", "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [
        (r["tenant"], r["description"], r["units"], r["tier"], r["amount"], r["unreconciled"]) for r in rows
    ] == [
        ("billcli-pro", "base fee", "0", "", "10.00", "1"),
        ("billcli-pro", "tier 1", "5", "1", "0.50", "1"),
        ("billcli-pro", "total", "", "", "10.50", "1"),
        ("billcli-team", "total", "", "", "0.00", "0"),
    ]


def test_billing_invoice_all_as_tables_shows_each_lines_tier_and_every_unreconciled_count(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoice(policy, redis_url, "--all", "--period", "2025-03") == 0
    pro, team = capsys.readouterr().out.rstrip("\n").split("\n\n")
    assert [line.split() for line in pro.splitlines()] == [
        ["invoice", "billcli-pro", "2025-03", "(EUR)"],
        ["line", "route", "units", "tier", "unit", "price", "amount"],
        ["base", "fee", "0", "10.00", "10.00"],
        ["tier", "1", "search", "5", "1", "0.10", "0.50"],
        ["total", "EUR", "10.50", "(1", "unreconciled)"],
    ]
    assert team.splitlines()[-1] == "total USD 0.00  (0 unreconciled)"


def test_billing_invoice_refuses_a_tenant_whose_plan_has_no_price(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoice(policy, redis_url, "--tenant", "billcli-free", "--period", "2025-03") == 1
    assert "plan 'free', which has no price" in capsys.readouterr().err


def test_usage_show_reads_the_month_given(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["usage", "show", "--tenant", "billcli-pro", "--period", "2025-03", "--format", "json"]
    assert main([*arguments, "--redis-url", redis_url]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["period"], found["requests"], found["units"], found["unreconciled"]) == ("2025-03", 2, 5, 1)


@pytest.mark.parametrize("period", ["2026-13", "26-11", "2026-1"])
@pytest.mark.parametrize(
    ("command", "error"),
    [
        (
            ("usage", "show", "--tenant", "billcli-pro"),
            "{!r} is not a calendar month: expected YYYY-MM, e.g. 2026-11",
        ),
        (
            ("billing", "invoice", "--tenant", "billcli-pro"),
            "{!r} is not a calendar month: expected YYYY-MM, e.g. 2026-11 (tenant 'billcli-pro' is billed by the month)",
        ),
        (
            ("billing", "invoice", "--all"),
            "{!r} is not a billing period: expected YYYY-MM (a calendar month) or YYYY (a calendar year)",
        ),
    ],
    ids=["usage show", "billing invoice --tenant", "billing invoice --all"],
)
def test_a_malformed_or_impossible_period_is_refused_naming_the_flag_and_the_form(
    policy: Path,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    command: tuple[str, ...],
    error: str,
    period: str,
) -> None:
    arguments = [*command, "--period", period, "--redis-url", redis_url]
    if command[0] == "billing":
        arguments += ["--policy", str(policy)]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"meshtoll: --period {error.format(period)}\n"


def test_usage_export_needs_no_policy_and_finds_every_tenant_with_usage(
    policy: Path,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no policy.yaml here
    monkeypatch.delenv("MESHTOLL_POLICY", raising=False)
    arguments = [
        "usage",
        "export",
        "--since",
        "2025-03-01",
        "--until",
        "2025-04-01",
        "--redis-url",
        redis_url,
    ]
    assert main(arguments) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    found = {(event["subject"], event["id"]) for event in events}
    assert {("billcli-pro", "pro-1"), ("billcli-pro", "pro-2"), ("billcli-free", "free-1")} <= found
    assert ("billcli-annual", "annual-1") in found
