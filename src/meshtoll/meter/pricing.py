"""Invoices from usage: exact decimal arithmetic, line by line. Pure.

Billable units are taken in route order (by route name, so an invoice never depends on
the order usage arrived in): the plan's included units first, then the tiers.
`graduated` prices each unit at the tier it falls in; `volume` prices every billable unit
at the tier the period's total reaches. Line amounts are exact; only the total is rounded
to the currency's minor unit (half up), so lines never carry rounding error into the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext

from meshtoll.policy.model import MONEY_FRACTION_DIGITS, MONEY_INTEGER_DIGITS, Price

# ISO 4217 minor units of the currencies that are not 2-decimal.
MINOR_UNITS = {
    "JPY": 0,
    "KRW": 0,
    "CLP": 0,
    "ISK": 0,
    "VND": 0,
    "BHD": 3,
    "KWD": 3,
    "OMR": 3,
    "TND": 3,
    "JOD": 3,
}
ZERO = Decimal(0)
# Exact arithmetic for every invoice a valid policy allows: a price has at most 30 digits
# (policy/fields.py refuses more), units fit in 64 bits (20 digits), and a sum of lines adds
# a few more. Decimal's default of 28 digits would round a line silently and make the
# total's quantize() raise.
_EXACT = Context(prec=MONEY_INTEGER_DIGITS + MONEY_FRACTION_DIGITS + 20 + 10)


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    description: str
    route: str
    units: int
    tier: int | None  # 1-based tier number; None for the base fee and included units
    unit_price: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Invoice:
    tenant: str
    period: str  # YYYY-MM, or YYYY for a price billed by the year
    currency: str
    lines: tuple[InvoiceLine, ...]
    total: Decimal
    unreconciled: int  # requests billed from authz admissions, their access log never seen


def invoice(
    tenant: str, period: str, price: Price, usage: Sequence[tuple[str, int]], unreconciled: int = 0
) -> Invoice:
    """`usage`: (route, billable units) pairs for the period."""
    with localcontext(_EXACT):
        lines = (
            [InvoiceLine("base fee", "", 0, None, price.base_fee, price.base_fee)] if price.base_fee else []
        )
        lines += price_units(price, usage)
        exponent = Decimal(1).scaleb(-MINOR_UNITS.get(price.currency, 2))
        total = sum((line.amount for line in lines), ZERO).quantize(exponent, rounding=ROUND_HALF_UP)
    return Invoice(tenant, period, price.currency, tuple(lines), total, unreconciled)


def price_units(price: Price, usage: Sequence[tuple[str, int]]) -> list[InvoiceLine]:
    totals: dict[str, int] = {}
    for route, units in usage:
        totals[route] = totals.get(route, 0) + units
    routes = sorted((route, units) for route, units in totals.items() if units > 0)
    billable_total = max(0, sum(units for _, units in routes) - price.included_units)
    volume_tier = _volume_tier(price, billable_total)
    lines: list[InvoiceLine] = []
    included_left = price.included_units
    position = 0  # billable units already placed in tiers
    for route, units in routes:
        included = min(units, included_left)
        included_left -= included
        if included:
            lines.append(InvoiceLine("included units", route, included, None, ZERO, ZERO))
        remaining = units - included
        while remaining > 0:
            tier = volume_tier if price.mode == "volume" else _tier_at(price, position)
            bound = price.tiers[tier].up_to
            room = remaining if price.mode == "volume" or bound is None else min(remaining, bound - position)
            unit_price = price.tiers[tier].unit_price
            lines.append(
                InvoiceLine(f"tier {tier + 1}", route, room, tier + 1, unit_price, unit_price * room)
            )
            position += room
            remaining -= room
    return lines


def _tier_at(price: Price, position: int) -> int:
    """The tier holding the billable unit after the first `position` ones."""
    for index, tier in enumerate(price.tiers):
        if tier.up_to is None or position < tier.up_to:
            return index
    raise AssertionError("validated prices end with an unbounded tier")


def _volume_tier(price: Price, total: int) -> int:
    for index, tier in enumerate(price.tiers):
        if tier.up_to is None or total <= tier.up_to:
            return index
    raise AssertionError("validated prices end with an unbounded tier")
