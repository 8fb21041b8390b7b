"""The forms an invoice is printed in (JSON document, CSV, table): what each one carries.
Pure: invoices are built from prices and usage in memory."""

from __future__ import annotations

import csv
import io

from meshtoll.meter.billing import invoice_document, invoice_table, invoices_csv
from meshtoll.meter.pricing import invoice
from meshtoll.policy import load_policy_text
from meshtoll.policy.model import Price


def price(text: str) -> Price:
    policy = load_policy_text(f"plans:\n  pro:\n    price: {text}\n", "policy.yaml")
    found = policy.policy.plans["pro"].price
    assert found is not None
    return found


PER_TOKEN = price('{currency: EUR, tiers: [{up_to: null, unit_price: "0.0000002"}]}')


def test_tiny_unit_prices_are_plain_decimal_strings_in_every_form() -> None:
    bill = invoice("acme", "2026-11", PER_TOKEN, [("chat", 5)])
    line = invoice_document(bill)["lines"][0]
    assert (line["unit_price"], line["amount"]) == ("0.0000002", "0.0000010")
    rows = list(csv.DictReader(io.StringIO(invoices_csv([bill]))))
    assert (rows[0]["unit_price"], rows[0]["amount"]) == ("0.0000002", "0.0000010")
    assert "0.0000002" in invoice_table(bill)
    assert "E-" not in invoice_table(bill)


GRADUATED = price(
    '{currency: EUR, base_fee: "10.00", included_units: 10, tiers: '
    '[{up_to: 20, unit_price: "0.10"}, {up_to: null, unit_price: "0.05"}]}'
)


def test_the_csv_carries_each_invoices_unreconciled_count_on_its_rows() -> None:
    bills = [
        invoice("acme", "2026-11", GRADUATED, [("search", 12)], unreconciled=3),
        invoice("zeta", "2026-11", GRADUATED, [], unreconciled=0),
    ]
    rows = list(csv.DictReader(io.StringIO(invoices_csv(bills))))
    assert [(row["tenant"], row["description"], row["unreconciled"]) for row in rows] == [
        ("acme", "base fee", "3"),
        ("acme", "included units", "3"),
        ("acme", "tier 1", "3"),
        ("acme", "total", "3"),
        ("zeta", "base fee", "0"),
        ("zeta", "total", "0"),
    ]


def test_the_table_shows_each_lines_tier_and_the_unreconciled_count_even_when_0() -> None:
    bill = invoice("acme", "2026-11", GRADUATED, [("search", 35), ("v1", 3)])
    assert invoice_table(bill).splitlines() == [
        "invoice acme 2026-11 (EUR)",
        "line            route   units  tier  unit price  amount",
        "base fee                    0             10.00   10.00",
        "included units  search     10                 0       0",
        "tier 1          search     20     1        0.10    2.00",
        "tier 2          search      5     2        0.05    0.25",
        "tier 2          v1          3     2        0.05    0.15",
        "total EUR 12.40  (0 unreconciled)",
    ]
    unsettled = invoice("acme", "2026-11", GRADUATED, [("search", 35)], unreconciled=4)
    assert invoice_table(unsettled).splitlines()[-1] == "total EUR 12.25  (4 unreconciled)"
