"""Billing periods as people write them: YYYY-MM for a calendar month, YYYY for a calendar
year, both UTC. The one place that knows these forms; the command line and the admin API
read periods through it. Usage is counted per month, so a year is read as its twelve months.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from meshtoll.errors import BadPeriod
from meshtoll.policy.model import BillingPeriod


@dataclass(frozen=True, slots=True)
class _Form:
    pattern: re.Pattern[str]
    written: str  # how the form is named in messages
    example: str
    strftime: str


# [0-9], not \d: \d matches other scripts' digits too, and no usage counter is keyed by them.
# Year 0000 does not exist, and month 13 never will.
_FORMS: dict[BillingPeriod, _Form] = {
    "month": _Form(re.compile(r"(?!0000)[0-9]{4}-(0[1-9]|1[0-2])"), "YYYY-MM", "2026-11", "%Y-%m"),
    "year": _Form(re.compile(r"(?!0000)[0-9]{4}"), "YYYY", "2026", "%Y"),
}


def read_period(text: str | None, unit: BillingPeriod = "month", now: float | None = None) -> str:
    """The calendar `unit` that `text` names (BadPeriod if it names none); None: the current one."""
    form = _FORMS[unit]
    if text is None:
        return time.strftime(form.strftime, time.gmtime(time.time() if now is None else now))
    if not form.pattern.fullmatch(text):
        raise BadPeriod(f"{text!r} is not a calendar {unit}: expected {form.written}, e.g. {form.example}")
    return text


def unit_of(text: str) -> BillingPeriod:
    """Whether `text` names a month or a year; BadPeriod if neither."""
    for unit, form in _FORMS.items():
        if form.pattern.fullmatch(text):
            return unit
    expected = " or ".join(f"{form.written} (a calendar {unit})" for unit, form in _FORMS.items())
    raise BadPeriod(f"{text!r} is not a billing period: expected {expected}")


def months_of(period: str) -> tuple[str, ...]:
    """The months whose usage counters make up a valid period: a month's own, or a year's twelve."""
    if unit_of(period) == "month":
        return (period,)
    return tuple(f"{period}-{month:02d}" for month in range(1, 13))
