"""Invoice arithmetic: exact decimals, tiers, included units, rounding only at the total."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meshtoll.errors import PolicyError
from meshtoll.meter.pricing import invoice
from meshtoll.policy import load_policy_text
from meshtoll.policy.model import Price


def price(text: str) -> Price:
    policy = load_policy_text(f"plans:\n  pro:\n    price: {text}\n", "policy.yaml")
    found = policy.policy.plans["pro"].price
    assert found is not None
    return found


GRADUATED = price(
    '{currency: EUR, base_fee: "49.00", included_units: 1000, mode: graduated, tiers: '
    '[{up_to: 100000, unit_price: "0.0010"}, {up_to: null, unit_price: "0.0005"}]}'
)


def amounts(found: object) -> list[tuple[str, str, int, str]]:
    return [(line.description, line.route, line.units, str(line.amount)) for line in found.lines]  # type: ignore[attr-defined]


def test_zero_usage_costs_the_base_fee() -> None:
    bill = invoice("acme", "2026-11", GRADUATED, [])
    assert amounts(bill) == [("base fee", "", 0, "49.00")]
    assert bill.total == Decimal("49.00")


def test_included_units_come_off_first_then_the_first_tier() -> None:
    bill = invoice("acme", "2026-11", GRADUATED, [("search", 1500)])
    assert amounts(bill)[1:] == [("included units", "search", 1000, "0"), ("tier 1", "search", 500, "0.5000")]
    assert bill.total == Decimal("49.50")


def test_a_tier_boundary_splits_units_exactly() -> None:
    # 1000 included, then exactly 100000 in tier 1 and one unit in tier 2.
    bill = invoice("acme", "2026-11", GRADUATED, [("search", 101_001)])
    assert amounts(bill)[2:] == [("tier 1", "search", 100_000, "100.0000"), ("tier 2", "search", 1, "0.0005")]
    assert bill.total == Decimal("149.00")  # 149.0005 rounded half up to cents


def test_units_fill_tiers_in_route_order_whatever_order_usage_came_in() -> None:
    usage = [("search", 60_000), ("export", 50_000), ("search", 1000)]
    bill = invoice("acme", "2026-11", GRADUATED, usage)
    assert amounts(bill)[1:] == [
        ("included units", "export", 1000, "0"),
        ("tier 1", "export", 49_000, "49.0000"),
        ("tier 1", "search", 51_000, "51.0000"),
        ("tier 2", "search", 10_000, "5.0000"),
    ]
    assert bill.total == Decimal("154.00")
    assert invoice("acme", "2026-11", GRADUATED, list(reversed(usage))) == bill


def test_volume_pricing_takes_the_tier_the_total_reaches_for_every_unit() -> None:
    volume = price(
        '{currency: USD, mode: volume, tiers: [{up_to: 10, unit_price: "1.00"}, {up_to: null, unit_price: "0.50"}]}'
    )
    assert invoice("acme", "2026-11", volume, [("a", 10)]).total == Decimal("10.00")
    assert invoice("acme", "2026-11", volume, [("a", 11)]).total == Decimal("5.50")


VOLUME = price(
    '{currency: USD, base_fee: "5.00", included_units: 10, mode: volume, tiers: '
    '[{up_to: 10, unit_price: "1.00"}, {up_to: null, unit_price: "0.50"}]}'
)


def test_volume_pricing_takes_the_included_units_off_before_choosing_the_tier() -> None:
    # 25 units: 10 included, and the 15 billable ones reach tier 2, so all 15 cost 0.50.
    bill = invoice("acme", "2026-11", VOLUME, [("a", 25)])
    assert amounts(bill) == [
        ("base fee", "", 0, "5.00"),
        ("included units", "a", 10, "0"),
        ("tier 2", "a", 15, "7.50"),
    ]
    assert bill.total == Decimal("12.50")


def test_volume_pricing_chooses_one_tier_from_the_total_of_every_route() -> None:
    # No route alone passes tier 1's 10 billable units; together (15) they reach tier 2.
    bill = invoice("acme", "2026-11", VOLUME, [("b", 12), ("a", 8), ("c", 5)])
    assert amounts(bill)[1:] == [
        ("included units", "a", 8, "0"),
        ("included units", "b", 2, "0"),
        ("tier 2", "b", 10, "5.00"),
        ("tier 2", "c", 5, "2.50"),
    ]
    assert [line.tier for line in bill.lines] == [None, None, None, 2, 2]
    assert bill.total == Decimal("12.50")


def test_a_volume_total_exactly_at_a_tier_bound_stays_in_that_tier() -> None:
    # 20 units: 10 included, 10 billable, which is tier 1's up_to: still tier 1.
    at_bound = invoice("acme", "2026-11", VOLUME, [("a", 20)])
    assert amounts(at_bound)[-1] == ("tier 1", "a", 10, "10.00")
    assert at_bound.total == Decimal("15.00")
    # One more unit moves every billable unit to tier 2, and the invoice gets cheaper.
    past_bound = invoice("acme", "2026-11", VOLUME, [("a", 21)])
    assert amounts(past_bound)[-1] == ("tier 2", "a", 11, "5.50")
    assert past_bound.total == Decimal("10.50")


def test_a_graduated_usage_exactly_at_a_tier_bound_after_the_included_units_fills_that_tier_only() -> None:
    # 1000 included, then exactly tier 1's 100000: no tier 2 line at all.
    bill = invoice("acme", "2026-11", GRADUATED, [("search", 101_000)])
    assert amounts(bill)[1:] == [
        ("included units", "search", 1000, "0"),
        ("tier 1", "search", 100_000, "100.0000"),
    ]
    assert bill.total == Decimal("149.00")


def test_usage_all_within_the_included_units_costs_the_base_fee() -> None:
    bill = invoice("acme", "2026-11", VOLUME, [("a", 4), ("b", 6)])
    assert amounts(bill)[1:] == [("included units", "a", 4, "0"), ("included units", "b", 6, "0")]
    assert bill.total == Decimal("5.00")


@pytest.mark.parametrize("usage", [[], [("a", 0), ("b", 0)]], ids=["no routes", "routes with no units"])
def test_zero_usage_with_volume_pricing_costs_the_base_fee_alone(usage: list[tuple[str, int]]) -> None:
    bill = invoice("acme", "2026-11", VOLUME, usage)
    assert amounts(bill) == [("base fee", "", 0, "5.00")]
    assert bill.total == Decimal("5.00")


def test_zero_usage_without_a_base_fee_is_an_empty_invoice_of_zero() -> None:
    free = price('{currency: EUR, tiers: [{up_to: null, unit_price: "0.01"}]}')
    bill = invoice("acme", "2026-11", free, [])
    assert (bill.lines, bill.total) == ((), Decimal("0.00"))


def test_the_total_rounds_to_the_currencys_minor_unit_half_up() -> None:
    yen = price('{currency: JPY, tiers: [{up_to: null, unit_price: "0.5"}]}')
    assert invoice("acme", "2026-11", yen, [("a", 3)]).total == Decimal("2")
    euro = price('{currency: EUR, tiers: [{up_to: null, unit_price: "0.005"}]}')
    assert invoice("acme", "2026-11", euro, [("a", 1)]).total == Decimal("0.01")
    assert invoice("acme", "2026-11", euro, [("a", 0)]).total == Decimal("0.00")


def test_an_ongoing_period_is_billed_on_its_usage_so_far() -> None:
    # No proration of the base fee: a period is billed whole, on the units it has.
    early = invoice("acme", "2026-11", GRADUATED, [("search", 10)])
    assert early.total == Decimal("49.00")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{currency: EUR, base_fee: 49.0, tiers: [{up_to: null, unit_price: '1'}]}",
            'price.base_fee: money is written as a string, e.g. "49.00", got 49.0',
        ),
        (
            "{currency: euro, tiers: [{up_to: null, unit_price: '1'}]}",
            "price.currency: 'euro' is not an ISO 4217 code",
        ),
        (
            "{currency: EUR, tiers: [{up_to: 10, unit_price: '1'}]}",
            "price.tiers[0].up_to: the last tier needs up_to: null",
        ),
        (
            "{currency: EUR, tiers: [{up_to: 10, unit_price: '1'}, {up_to: 5, unit_price: '1'}, {up_to: null, unit_price: '1'}]}",
            "price.tiers[1].up_to: tiers must rise",
        ),
        (
            "{currency: EUR, tiers: [{up_to: null, unit_price: 'cheap'}]}",
            "price.tiers[0].unit_price: 'cheap' is not a non-negative decimal amount",
        ),
        ("{currency: EUR, tiers: []}", "price.tiers: at least one tier is required"),
        (
            "{currency: EUR, period: week, tiers: [{up_to: null, unit_price: '1'}]}",
            "price.period: expected one of month, year, got 'week'",
        ),
    ],
)
def test_bad_prices_are_named_by_field(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        price(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("policy.yaml:3 plans.pro.")


def test_a_price_is_billed_by_the_calendar_month_unless_it_says_year() -> None:
    tiers = "tiers: [{up_to: null, unit_price: '1'}]"
    assert price(f"{{currency: EUR, {tiers}}}").period == "month"
    assert price(f"{{currency: EUR, period: month, {tiers}}}").period == "month"
    assert price(f"{{currency: EUR, period: year, {tiers}}}").period == "year"
