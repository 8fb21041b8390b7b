"""A tenant's invoice for a period, from the usage store and its plan's price, and the forms
it is printed in (table, JSON, CSV). Money leaves as decimal strings, never floats."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from meshtoll.meter.pricing import Invoice, invoice
from meshtoll.policy import CompiledPolicy
from meshtoll.storage.usage import UsageStore


class NotBillable(LookupError):
    """The tenant is unknown, or its plan has no price."""


async def tenant_invoice(policy: CompiledPolicy, usage: UsageStore, tenant: str, period: str) -> Invoice:
    compiled = policy.tenants.get(tenant)
    if compiled is None:
        raise NotBillable(f"no tenant {tenant!r} in the policy")
    plan = policy.policy.plans[compiled.tenant.plan]
    if plan.price is None:
        raise NotBillable(f"tenant {tenant!r} is on plan {plan.name!r}, which has no price")
    found = await usage.usage(tenant, period)
    return invoice(
        tenant, period, plan.price, [(r.route, r.units) for r in found.by_route], found.unreconciled
    )


def billable_tenants(policy: CompiledPolicy) -> list[str]:
    priced = {name for name, plan in policy.policy.plans.items() if plan.price is not None}
    return sorted(name for name, compiled in policy.tenants.items() if compiled.tenant.plan in priced)


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
)


def invoices_csv(bills: Sequence[Invoice]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for bill in bills:
        for line in bill.lines:
            writer.writerow(
                (bill.tenant, bill.period, bill.currency, line.description, line.route, line.units,
                 line.tier or "", money(line.unit_price), money(line.amount))
            )  # fmt: skip
        writer.writerow((bill.tenant, bill.period, bill.currency, "total", "", "", "", "", money(bill.total)))
    return out.getvalue()


def invoice_table(bill: Invoice) -> str:
    rows = [
        (line.description, line.route, str(line.units), money(line.unit_price), money(line.amount))
        for line in bill.lines
    ]
    header = ("line", "route", "units", "unit price", "amount")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def render(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [f"invoice {bill.tenant} {bill.period} ({bill.currency})", render(header).rstrip()]
    lines += [render(row).rstrip() for row in rows]
    lines.append(
        f"total {bill.currency} {money(bill.total)}"
        + (f"  ({bill.unreconciled} unreconciled)" if bill.unreconciled else "")
    )
    return "\n".join(lines)
