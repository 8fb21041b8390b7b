"""A tenant's invoice for a period, read from the usage store by its price's billing period:
a month's counters, or a year's twelve. On the in-memory usage store, which passes the same
contract suite as the Redis one (tests/test_usage_store_contract.py)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from meshtoll.errors import BadPeriod, NotBillable
from meshtoll.meter.billing import billable_tenants, tenant_invoice
from meshtoll.policy import CompiledPolicy, load_policy_text
from meshtoll.storage import MemoryUsageStore
from meshtoll.usage.records import Source, UsageRecord

TIERS = "included_units: 10, tiers: [{up_to: 100, unit_price: '0.10'}, {up_to: null, unit_price: '0.05'}]"
POLICY = f"""
plans:
  annual: {{price: {{currency: EUR, period: year, base_fee: '100.00', {TIERS}}}}}
  monthly: {{price: {{currency: EUR, base_fee: '10.00', {TIERS}}}}}
  free: {{}}
tenants: {{annual: {{plan: annual}}, monthly: {{plan: monthly}}, free: {{plan: free}}}}
"""


def policy() -> CompiledPolicy:
    return load_policy_text(POLICY, "policy.yaml")


def at(moment: str) -> float:
    return datetime.fromisoformat(f"{moment}+00:00").timestamp()


def record(tenant: str, moment: str, route: str, units: int, source: Source = "access_log") -> UsageRecord:
    return UsageRecord(
        request_id=f"{tenant}-{moment}", time=at(moment), tenant=tenant, consumer="ci", plan="",
        route=route, method="GET", status=200, request_bytes=0, response_bytes=0, duration_ms=1.0,
        units=units, source=source,
    )  # fmt: skip


async def store_with_a_year_of_usage() -> MemoryUsageStore:
    store = MemoryUsageStore()
    await store.record(
        [
            record("annual", "2025-12-31T23:59:59", "search", 5),  # the year before
            record("annual", "2026-01-01T00:00:00", "search", 6),
            record("annual", "2026-06-15T12:00:00", "export", 7, source="admission"),
            record("annual", "2026-12-31T23:59:59", "search", 8),
            record("annual", "2027-01-01T00:00:00", "search", 9),  # the year after
            record("monthly", "2026-11-02T08:00:00", "search", 12),
        ]
    )
    return store


async def test_a_yearly_price_bills_the_twelve_months_of_its_year_with_its_included_units_once() -> None:
    store = await store_with_a_year_of_usage()
    bill = await tenant_invoice(policy(), store, "annual", "2026")
    assert [(line.description, line.route, line.units, str(line.amount)) for line in bill.lines] == [
        ("base fee", "", 0, "100.00"),
        ("included units", "export", 7, "0"),
        ("included units", "search", 3, "0"),
        ("tier 1", "search", 11, "1.10"),
    ]
    assert (bill.period, bill.total, bill.unreconciled) == ("2026", Decimal("101.10"), 1)


async def test_without_a_period_each_price_bills_its_current_month_or_year() -> None:
    store = await store_with_a_year_of_usage()
    now = at("2026-11-25T14:00:00")
    assert (await tenant_invoice(policy(), store, "annual", None, now)).period == "2026"
    monthly = await tenant_invoice(policy(), store, "monthly", None, now)
    assert (monthly.period, monthly.total) == ("2026-11", Decimal("10.20"))


@pytest.mark.parametrize(
    ("tenant", "period", "message"),
    [
        (
            "annual",
            "2026-11",
            "'2026-11' is not a calendar year: expected YYYY, e.g. 2026 (tenant 'annual' is billed by the year)",
        ),
        (
            "monthly",
            "2026",
            "'2026' is not a calendar month: expected YYYY-MM, e.g. 2026-11 (tenant 'monthly' is billed by the month)",
        ),
    ],
)
async def test_a_period_of_the_other_kind_than_the_price_is_refused(
    tenant: str, period: str, message: str
) -> None:
    with pytest.raises(BadPeriod) as caught:
        await tenant_invoice(policy(), MemoryUsageStore(), tenant, period)
    assert str(caught.value) == message


def test_billing_every_tenant_for_a_month_or_a_year_bills_the_prices_of_that_period() -> None:
    assert billable_tenants(policy()) == ["annual", "monthly"]
    assert billable_tenants(policy(), "2026-11") == ["monthly"]
    assert billable_tenants(policy(), "2026") == ["annual"]
    with pytest.raises(BadPeriod):
        billable_tenants(policy(), "2026-13")


def on_plan(found: UsageRecord, plan: str) -> UsageRecord:
    found.plan = plan
    return found


async def test_a_tenant_that_left_the_policy_is_invoiced_at_the_plan_its_usage_was_admitted_on() -> None:
    store = MemoryUsageStore()
    await store.record([on_plan(record("departed", "2026-11-03T10:00:00", "search", 110), "monthly")])
    bill = await tenant_invoice(policy(), store, "departed", "2026-11")
    # The monthly plan: 10 units included, the next 100 at 0.10, and its base fee.
    assert (bill.tenant, bill.total) == ("departed", Decimal("10.00") + Decimal("10.00"))


async def test_a_departed_tenant_whose_plan_is_gone_too_is_refused_saying_why() -> None:
    store = MemoryUsageStore()
    await store.record([on_plan(record("departed", "2026-11-03T10:00:00", "search", 1), "retired")])
    with pytest.raises(NotBillable, match="plan 'retired' is gone from it too"):
        await tenant_invoice(policy(), store, "departed", "2026-11")
    with pytest.raises(NotBillable, match="no usage of it recorded in 2026-10"):
        await tenant_invoice(policy(), store, "departed", "2026-10")
