"""Billing periods as written on the command line and in the admin API. Pure."""

from __future__ import annotations

import pytest

from meshtoll.meter.billing_periods import BadPeriod, month

NOV_25_2026 = 1_795_615_200.0  # 2026-11-25T14:00Z


def test_a_month_is_written_yyyy_mm() -> None:
    assert month("2026-11") == "2026-11"
    assert month("0001-01") == "0001-01"


def test_no_month_means_the_current_one_utc() -> None:
    assert month(None, now=NOV_25_2026) == "2026-11"


@pytest.mark.parametrize(
    "text",
    [
        "2026-13",
        "2026-00",
        "0000-05",
        "26-11",
        "2026-1",
        "2026-011",
        "2026-11-01",
        "2026/11",
        "\uff12\uff10\uff12\uff16-11",  # fullwidth digits: \d would take them
        "",
        " 2026-11",
    ],
)
def test_malformed_or_impossible_months_are_refused_naming_the_form(text: str) -> None:
    with pytest.raises(BadPeriod) as caught:
        month(text)
    assert str(caught.value) == f"{text!r} is not a calendar month: expected YYYY-MM, e.g. 2026-11"
