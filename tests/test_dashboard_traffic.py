"""The overview's traffic figures: rates and percentiles over the last minute of readings."""

from __future__ import annotations

import pytest

from meshtoll.server.traffic import Reading, Traffic, quantile

BOUNDS = (0.001, 0.01, 0.1)


def test_a_quantile_is_interpolated_within_its_bucket_as_prometheus_does() -> None:
    assert quantile(BOUNDS, (0, 10, 0, 0), 0.5) == pytest.approx(0.0055)
    assert quantile(BOUNDS, (10, 0, 0, 0), 0.5) == pytest.approx(0.0005)
    assert quantile(BOUNDS, (99, 0, 0, 1), 0.99) == pytest.approx(0.001)
    assert quantile(BOUNDS, (0, 0, 0, 5), 0.5) == 0.1  # above every bound: the highest bound
    assert quantile(BOUNDS, (0, 0, 0, 0), 0.5) is None
    assert quantile((), (), 0.5) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second_and_latency_cover_the_last_minute_only() -> None:
    clock = Clock()
    readings = [Reading({}, BOUNDS, (0, 0, 0, 0))]
    traffic = Traffic(lambda: readings[-1], clock)
    assert traffic.figures()["requests_per_second"] is None  # no second has passed

    clock.now += 10
    readings.append(Reading({"allow": 90, "rate_limited": 10}, BOUNDS, (100, 0, 0, 0)))
    figures = traffic.figures()
    assert figures["requests_per_second"] == 10.0
    assert figures["denied_by_reason"] == {"rate_limited": 10}
    assert figures["latency_p99_seconds"] == pytest.approx(0.00099)

    # Two minutes later, slow decisions only: the fast ones have left the window.
    clock.now += 120
    readings.append(Reading({"allow": 90, "rate_limited": 10}, BOUNDS, (100, 0, 0, 0)))
    traffic.figures()
    clock.now += 30
    readings.append(Reading({"allow": 150, "rate_limited": 10}, BOUNDS, (100, 0, 60, 0)))
    figures = traffic.figures()
    assert figures["requests_per_second"] == 2.0
    assert figures["window_seconds"] == 30.0
    assert 0.01 < figures["latency_p50_seconds"] < 0.1
    assert (figures["allowed"], figures["denied"], figures["decisions"]) == (150, 10, 160)
