"""Money in a policy is a plain decimal string within bounds, and every amount a valid
policy holds invoices exactly."""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest

from meshtoll.errors import PolicyError
from meshtoll.meter.pricing import invoice
from meshtoll.policy import load_policy_text
from meshtoll.policy.model import Price


def priced(unit_price: str, base_fee: str = "0") -> Price:
    text = (
        "plans:\n  pro:\n    price:\n      currency: EUR\n"
        f'      base_fee: "{base_fee}"\n'
        f'      tiers: [{{up_to: null, unit_price: "{unit_price}"}}]\n'
    )
    found = load_policy_text(text, "policy.yaml").policy.plans["pro"].price
    assert found is not None
    return found


@pytest.mark.parametrize(
    "amount",
    [
        "1e30",
        "1E+999999999",
        "Infinity",
        "NaN",
        "-1",
        "1_000",
        " 1",
        "\u0661\u0662",  # Arabic-Indic digits: Decimal() reads them as 12
        "1.",
        ".5",
        "1" * 19,
        "0." + "1" * 13,
    ],
)
def test_money_that_is_not_a_plain_bounded_decimal_is_refused_with_its_field(amount: str) -> None:
    with pytest.raises(PolicyError) as caught:
        priced(amount)
    [problem] = caught.value.problems
    assert (problem.line, problem.path) == (6, "plans.pro.price.tiers[0].unit_price")
    assert "is not a non-negative decimal amount" in problem.message


def test_the_largest_amounts_a_policy_accepts_invoice_exactly() -> None:
    largest = "9" * 18 + "." + "9" * 12
    price = priced(largest, base_fee=largest)
    units = 2**63 - 1  # what a 64-bit counter holds at most
    bill = invoice("acme", "2026-11", price, [("search", units)])
    with localcontext(prec=100):
        line = Decimal(largest) * units
        total = (line + Decimal(largest)).quantize(Decimal("0.01"))
    assert bill.lines[1].amount == line  # not rounded to Decimal's default 28 digits
    assert bill.total == total
