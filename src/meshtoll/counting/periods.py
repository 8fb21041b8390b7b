"""Windows in time: fixed periods aligned to the Unix epoch, calendar months and years in UTC.

Fixed periods are aligned the way envoyproxy/ratelimit aligns them (`now - now % length`),
so counters keyed by window start are compatible with it.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Fixed-length periods in seconds; month and year are calendar periods (UTC) whose length
# depends on the date, so they have no entry here.
PERIOD_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
}
PERIODS: tuple[str, ...] = (*PERIOD_SECONDS, "month", "year")
# Limits over these periods are quotas: a refusal says "quota_exceeded", not "rate_limited".
QUOTA_PERIODS: frozenset[str] = frozenset({"month", "year"})


def window(period: str, now: float) -> tuple[int, int]:
    """(start, end) in whole Unix seconds of the window of `period` that holds `now`."""
    length = PERIOD_SECONDS.get(period)
    if length is not None:
        start = int(now) - int(now) % length
        return start, start + length
    moment = datetime.fromtimestamp(now, UTC)
    if period == "month":
        first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    elif period == "year":
        first = moment.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        following = first.replace(year=first.year + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return int(first.timestamp()), int(following.timestamp())


def previous_window(period: str, now: float) -> tuple[int, int]:
    """The window just before the one holding `now` (for sliding windows)."""
    start, _ = window(period, now)
    return window(period, start - 1)


def nominal_seconds(period: str) -> int:
    """The length of a period, calendar periods taken at their shortest (28 / 365 days) so
    that a rate derived from them is never looser than the limit."""
    return PERIOD_SECONDS.get(period) or {"month": 28 * 86400, "year": 365 * 86400}[period]
