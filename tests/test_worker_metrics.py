"""The metrics of a process group, merged by whichever worker answers: counts add up, a
worker that died keeps its counts in the sum but not its gauges, what every worker sees
alike is not multiplied, and a sibling's unreadable file never breaks a scrape."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from meshtoll.telemetry.metrics import Metrics
from meshtoll.telemetry.workers import WorkerGroup
from tests.scraped import text_families, value


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class Worker:
    """One worker's metrics: decisions it counted, entries waiting in its memory, the
    policy version it serves, and its decision latencies."""

    def __init__(self, directory: Path, pid: int, version: int = 1) -> None:
        self.decisions: Counter[str] = Counter()
        self.waiting = 0
        self.metrics = Metrics()
        self.metrics.count_outcomes("meshtoll_authz_decisions", "decisions", self.decisions)
        self.metrics.gauge("meshtoll_meter_waiting_records", "waiting", lambda: self.waiting)
        self.metrics.gauge("meshtoll_policy_version", "version", lambda: version, combine="max")
        self.latency = self.metrics.histogram(
            "meshtoll_decision_duration_seconds", "latency", service="authz"
        )
        self.metrics.gauge("meshtoll_workers", "workers", lambda: self.metrics.workers(), combine="max")
        self.group = WorkerGroup(directory, self.metrics, pid=pid)
        self.group.attach()

    def publish(self) -> None:
        self.group.write(self.group.snapshot())

    def scrape(self) -> dict[str, float]:
        families = text_families(self.metrics.prometheus_text())
        return {
            "allow": value(
                families, "meshtoll_authz_decisions", "meshtoll_authz_decisions_total", outcome="allow"
            ),
            "waiting": value(families, "meshtoll_meter_waiting_records"),
            "version": value(families, "meshtoll_policy_version"),
            "latencies": value(
                families,
                "meshtoll_decision_duration_seconds",
                "meshtoll_decision_duration_seconds_count",
                service="authz",
            ),
            "workers": value(families, "meshtoll_workers"),
        }


def test_any_worker_answers_for_the_whole_group(tmp_path: Path) -> None:
    first, second = Worker(tmp_path, os.getpid()), Worker(tmp_path, os.getppid(), version=2)
    first.decisions["allow"] += 3
    second.decisions["allow"] += 4
    first.waiting, second.waiting = 1, 2
    first.latency.observe(0.001)
    second.latency.observe(0.002)
    second.publish()
    # The answering worker's own counts are live; its sibling's as last published.
    assert first.scrape() == {"allow": 7, "waiting": 3, "version": 2, "latencies": 2, "workers": 2}


def test_a_dead_workers_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    dead = Worker(tmp_path, a_dead_pid(), version=5)
    dead.decisions["allow"] += 10
    dead.waiting = 7
    dead.publish()
    # The worker started in its place counts from zero in a file of its own.
    replacement = Worker(tmp_path, os.getpid())
    replacement.decisions["allow"] += 1
    seen = replacement.scrape()
    assert (seen["allow"], seen["waiting"], seen["version"], seen["workers"]) == (11, 0, 1, 1)


def test_an_unreadable_sibling_file_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "12345-1.json").write_bytes(b'[{"name": "meshtoll_authz_decisions", "kind": "counter"')
    (tmp_path / "12346-1.json").write_text('{"not": "a collection"}')
    (tmp_path / "12347-1.json").write_text('[{"name": "x", "kind": "summary", "combine": "sum"}]')
    worker = Worker(tmp_path, os.getpid())
    worker.decisions["allow"] += 1
    assert worker.scrape()["allow"] == 1
    assert worker.scrape()["allow"] == 1
    warnings = [record.getMessage() for record in caplog.records if "not read" in record.getMessage()]
    assert len(warnings) == 3  # once per file, not once per scrape


def test_a_family_described_otherwise_by_a_sibling_keeps_the_first_description(tmp_path: Path) -> None:
    other = Metrics()
    other.gauge("meshtoll_authz_decisions", "a gauge in another version", lambda: 100)
    sibling = WorkerGroup(tmp_path, other, pid=os.getppid())
    sibling.write(sibling.snapshot())
    worker = Worker(tmp_path, os.getpid())
    worker.decisions["allow"] += 2
    assert worker.scrape()["allow"] == 2
