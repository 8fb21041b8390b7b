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
