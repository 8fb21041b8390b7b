"""The test harness's clock wait: a test counting in fixed windows starts in a window it
can finish in."""

from __future__ import annotations

import time

import pytest

from tests import waiting


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    naps: list[float] = []
    monkeypatch.setattr(time, "sleep", naps.append)
    return naps


def at(monkeypatch: pytest.MonkeyPatch, unix_seconds: float) -> None:
    monkeypatch.setattr(time, "time", lambda: unix_seconds)


def test_a_test_starting_close_to_an_hours_end_waits_for_the_next_hour(
    monkeypatch: pytest.MonkeyPatch, slept: list[float]
) -> None:
    at(monkeypatch, 1_796_000_400 - 10)  # ten seconds before an hour's end (UTC)
    waiting.wait_out_a_window_end("hour", margin=120)
    assert slept == [10.5]


def test_a_test_with_time_enough_before_the_end_does_not_wait(
    monkeypatch: pytest.MonkeyPatch, slept: list[float]
) -> None:
    at(monkeypatch, 1_796_000_400 - 121)
    waiting.wait_out_a_window_end("hour", margin=120)
    at(monkeypatch, 1_796_000_400 + 1)  # just after the hour turned: a whole hour ahead
    waiting.wait_out_a_window_end("hour", margin=120)
    assert slept == []


def test_a_months_end_is_the_calendar_months(monkeypatch: pytest.MonkeyPatch, slept: list[float]) -> None:
    at(monkeypatch, 1_798_761_600 - 30)  # 2026-12-31 23:59:30 UTC
    waiting.wait_out_a_window_end("month", margin=120)
    assert slept == [30.5]
