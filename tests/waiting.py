"""Waiting on state: poll until something holds, or fail the test saying what never came.

A test that waits for something to happen elsewhere (a reload, a billed record, a worker
that listens) polls for it with `eventually` instead of sleeping a guessed time: it goes on
as soon as the state is there, and when the state never comes it fails naming what was
awaited and the last value seen. `probe` returns that value; `until` says whether it is
the one awaited (by default, whether it is truthy), and the value is returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

import pytest

from meshtoll.counting.periods import window

Seen = TypeVar("Seen")


def eventually(
    probe: Callable[[], Seen],
    until: Callable[[Seen], object] = bool,
    *,
    timeout: float,
    interval: float = 0.1,
    message: str,
) -> Seen:
    """The first value of `probe()` that satisfies `until`, polled every `interval` s."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if until(seen):
            return seen
        if time.monotonic() >= deadline:
            _never(message, timeout, seen)
        time.sleep(interval)


async def eventually_async(
    probe: Callable[[], Seen],
    until: Callable[[Seen], object] = bool,
    *,
    timeout: float,
    interval: float = 0.02,
    message: str,
) -> Seen:
    """`eventually` inside a running event loop: the loop runs between polls."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if until(seen):
            return seen
        if time.monotonic() >= deadline:
            _never(message, timeout, seen)
        await asyncio.sleep(interval)


def wait_out_a_window_end(period: str, margin: float) -> None:
    """A test that counts in windows of `period` (meshtoll's own windows, counting/periods.py:
    a minute's, an hour's, a calendar month's) and that would start within `margin` seconds
    of the window's end waits for the next window: a window that turns mid-test starts its
    count again, and the test would see more admitted than the limit, or a month's usage
    split. A wait for the clock, not for a state another process reaches."""
    now = time.time()
    left = window(period, now)[1] - now
    if left < margin:
        time.sleep(left + 0.5)


def _never(message: str, timeout: float, seen: object) -> NoReturn:
    # A False from a yes/no probe says nothing more than the message does.
    last = "" if isinstance(seen, bool) else f"; last seen: {seen!r}"
    pytest.fail(f"{message} (waited {timeout:g} s{last})")
