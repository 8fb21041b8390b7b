"""Billing periods as written on the command line and in the admin API. Pure."""

from __future__ import annotations

import pytest

from meshtoll.errors import BadPeriod
from meshtoll.meter.billing_periods import months_of, read_period, unit_of

NOV_25_2026 = 1_795_615_200.0  # 2026-11-25T14:00Z


def test_a_month_is_written_yyyy_mm_and_a_year_yyyy() -> None:
    assert read_period("2026-11") == "2026-11"
    assert read_period("0001-01", "month") == "0001-01"
    assert read_period("2026", "year") == "2026"


def test_no_period_means_the_current_one_utc() -> None:
    assert read_period(None, "month", now=NOV_25_2026) == "2026-11"
    assert read_period(None, "year", now=NOV_25_2026) == "2026"


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
        "2026",
        "\uff12\uff10\uff12\uff16-11",  # fullwidth digits: \d would take them
        "",
        " 2026-11",
    ],
)
def test_malformed_or_impossible_months_are_refused_naming_the_form(text: str) -> None:
    with pytest.raises(BadPeriod) as caught:
        read_period(text, "month")
    assert str(caught.value) == f"{text!r} is not a calendar month: expected YYYY-MM, e.g. 2026-11"


@pytest.mark.parametrize("text", ["0000", "26", "20261", "2026-11", "2026-"])
def test_malformed_years_are_refused_naming_the_form(text: str) -> None:
    with pytest.raises(BadPeriod) as caught:
        read_period(text, "year")
    assert str(caught.value) == f"{text!r} is not a calendar year: expected YYYY, e.g. 2026"


def test_the_kind_of_a_period_is_told_by_its_form() -> None:
    assert (unit_of("2026-11"), unit_of("2026")) == ("month", "year")
    with pytest.raises(BadPeriod) as caught:
        unit_of("2026-13")
    assert str(caught.value) == (
        "'2026-13' is not a billing period: expected YYYY-MM (a calendar month) or YYYY (a calendar year)"
    )


def test_a_year_is_counted_as_its_twelve_months() -> None:
    assert months_of("2026-11") == ("2026-11",)
    assert months_of("2026") == tuple(f"2026-{month:02d}" for month in range(1, 13))
