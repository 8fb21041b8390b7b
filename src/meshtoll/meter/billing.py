"""A tenant's invoice for a period, from the usage store and its plan's price, and the forms
it is printed in (table, JSON, CSV). Money leaves as decimal strings, never floats."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from meshtoll.errors import BadPeriod, NotBillable
from meshtoll.meter.billing_periods import months_of, read_period, unit_of
from meshtoll.meter.pricing import Invoice, InvoiceLine, invoice
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.model import Price
from meshtoll.usage.store import UsageStore


def plan_price(policy: CompiledPolicy, plan_name: str, tenant: str) -> Price:
    plan = policy.policy.plans[plan_name]
    if plan.price is None:
        raise NotBillable(f"tenant {tenant!r} is on plan {plan.name!r}, which has no price")
    return plan.price


def tenant_price(policy: CompiledPolicy, tenant: str) -> Price:
    compiled = policy.tenants.get(tenant)
    if compiled is None:
        raise NotBillable(f"no tenant {tenant!r} in the policy")
    return plan_price(policy, compiled.tenant.plan, tenant)


async def tenant_invoice(
    policy: CompiledPolicy, usage: UsageStore, tenant: str, period: str | None, now: float | None = None
) -> Invoice:
    """`period` as written, a month or a year as the tenant's price is billed by (BadPeriod
    otherwise); None: the current one. A year sums its twelve months' counters.
    A tenant that has left the policy is billed at the price of the plan its usage was
    admitted on, while the policy still has that plan."""
    if tenant not in policy.tenants:
        return await _departed_tenant_invoice(policy, usage, tenant, period, now)
    price = tenant_price(policy, tenant)
    try:
        period = read_period(period, price.period, now)
    except BadPeriod as exc:
        raise BadPeriod(f"{exc} (tenant {tenant!r} is billed by the {price.period})") from None
    return await _invoice(usage, tenant, period, price)


async def _invoice(usage: UsageStore, tenant: str, period: str, price: Price) -> Invoice:
    # One month at a time: at most twelve small reads, and a failure leaves none in flight.
    months = [await usage.usage(tenant, month) for month in months_of(period)]
    routes = [(route.route, route.units) for month in months for route in month.by_route]
    return invoice(tenant, period, price, routes, sum(month.unreconciled for month in months))


async def _departed_tenant_invoice(
    policy: CompiledPolicy, usage: UsageStore, tenant: str, period: str | None, now: float | None
) -> Invoice:
    period = read_period(period, "month", now) if period is None else read_period(period, unit_of(period))
    months = [await usage.usage(tenant, month) for month in months_of(period)]
    plans = sorted({plan for month in months for plan, requests in month.by_plan.items() if requests})
    if not plans:
        raise NotBillable(f"no tenant {tenant!r} in the policy, and no usage of it recorded in {period}")
    if len(plans) > 1:
        raise NotBillable(
            f"tenant {tenant!r} is no longer in the policy and its usage in {period} was on several "
            f"plans ({', '.join(plans)}): its price cannot be told"
        )
    if plans[0] not in policy.policy.plans:
        raise NotBillable(
            f"tenant {tenant!r} is no longer in the policy and its plan {plans[0]!r} is gone from it too: "
            "its price cannot be told"
        )
    price = plan_price(policy, plans[0], tenant)
    if unit_of(period) != price.period:
        raise BadPeriod(f"{period!r}: tenant {tenant!r}'s plan {plans[0]!r} is billed by the {price.period}")
    return await _invoice(usage, tenant, period, price)


def billable_tenants(policy: CompiledPolicy, period: str | None = None) -> list[str]:
    """The tenants whose plan has a price. Given a period, those billed by periods of its
    kind: a month (YYYY-MM) is invoiced to the monthly prices, a year (YYYY) to the yearly."""
    unit = None if period is None else unit_of(period)
    billed = {
        name
        for name, plan in policy.policy.plans.items()
        if plan.price is not None and unit in (None, plan.price.period)
    }
    return sorted(name for name, compiled in policy.tenants.items() if compiled.tenant.plan in billed)


def money(amount: Decimal) -> str:
    """An amount as a plain decimal string. str() would write small per-unit prices such as
    0.0000002 in exponent form ("2E-7"), which billing systems and spreadsheets misread."""
    return format(amount, "f")


def invoice_document(bill: Invoice) -> dict[str, Any]:
    return {
        "tenant": bill.tenant,
        "period": bill.period,
        "currency": bill.currency,
        "lines": [
            {
                "description": line.description,
                "route": line.route,
                "units": line.units,
                "tier": line.tier,
                "unit_price": money(line.unit_price),
                "amount": money(line.amount),
            }
            for line in bill.lines
        ],
        "total": money(bill.total),
        "unreconciled": bill.unreconciled,
    }


CSV_COLUMNS = (
    "tenant",
    "period",
    "currency",
    "description",
    "route",
    "units",
    "tier",
    "unit_price",
    "amount",
    "unreconciled",
)


def invoices_csv(bills: Sequence[Invoice]) -> str:
    """One row per invoice line, then the invoice's total row. The invoice-wide columns
    (tenant, period, currency, unreconciled) are on every row, so any row read alone says
    whose bill it is and whether part of it was billed from admissions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for bill in bills:
        rows = [_line_cells(line) for line in bill.lines]
        rows.append(("total", "", "", "", "", money(bill.total)))
        writer.writerows((bill.tenant, bill.period, bill.currency, *row, bill.unreconciled) for row in rows)
    return out.getvalue()


def invoice_table(bill: Invoice) -> str:
    rows = [_line_cells(line) for line in bill.lines]
    header = ("line", "route", "units", "tier", "unit price", "amount")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def render(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [f"invoice {bill.tenant} {bill.period} ({bill.currency})", render(header).rstrip()]
    lines += [render(row).rstrip() for row in rows]
    # Shown when 0 too: "0 unreconciled" says every request was settled by its access log.
    lines.append(f"total {bill.currency} {money(bill.total)}  ({bill.unreconciled} unreconciled)")
    return "\n".join(lines)


def _line_cells(line: InvoiceLine) -> tuple[str, str, str, str, str, str]:
    """description, route, units, tier, unit price, amount: as CSV_COLUMNS and the table
    have them."""
    tier = "" if line.tier is None else str(line.tier)
    return (line.description, line.route, str(line.units), tier, money(line.unit_price), money(line.amount))
