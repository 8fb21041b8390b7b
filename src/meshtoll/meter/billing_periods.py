"""Billing periods as people write them: YYYY-MM, a calendar month (UTC). The one place
that knows the form; the command line and the admin API both read periods through it."""

from __future__ import annotations

import re
import time

# [0-9], not \d: \d matches other scripts' digits too, and no usage counter is keyed by them.
# Year 0000 does not exist, and month 13 never will.
_MONTH = re.compile(r"(?!0000)[0-9]{4}-(0[1-9]|1[0-2])")


class BadPeriod(ValueError):
    """Text that is not a period in the expected form, or names a month that does not exist."""


def month(text: str | None, now: float | None = None) -> str:
    """The month `text` names, YYYY-MM (BadPeriod if it names none); None: the current one."""
    if text is None:
        return current_month(now)
    if not _MONTH.fullmatch(text):
        raise BadPeriod(f"{text!r} is not a calendar month: expected YYYY-MM, e.g. 2026-11")
    return text


def current_month(now: float | None = None) -> str:
    return time.strftime("%Y-%m", time.gmtime(time.time() if now is None else now))
