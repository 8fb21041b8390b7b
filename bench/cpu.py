"""Where a benchmark row's CPU goes: process CPU time (utime + stime from /proc/<pid>/stat)
of each component before and after the measured wrk run, and the machine's busy and idle
time from /proc/stat over the same interval. Per request, these say whether a row is
CPU-bound (little idle left) or latency-bound (idle cores while wrk waits), and which
process the time goes to. "other" is the machine's busy time that none of the measured
processes account for: on a shared machine, mostly somebody else's work."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal (guest time is
# already inside user and nice, so the later columns are left out of the sum).
_IDLE_COLUMNS = (3, 4)
_SUMMED_COLUMNS = 8


def process_tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants (meshtoll's workers, nginx's
    worker)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        pending += [int(child) for child in children]
    return total


def reaped_children_cpu_seconds() -> float:
    """CPU time of this process's children that have exited and been waited for: wrk, which
    is gone before its /proc entry could be read."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, summed over its cores."""
    columns = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = sum(columns[index] for index in _IDLE_COLUMNS)
    return (sum(columns[:_SUMMED_COLUMNS]) - idle) / CLOCK_TICKS, idle / CLOCK_TICKS


@dataclass(frozen=True)
class CpuSample:
    processes: dict[str, float]  # component -> CPU seconds so far
    wrk: float
    busy: float
    idle: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSample:
        busy, idle = machine_seconds()
        processes = {name: process_tree_cpu_seconds(pid) for name, pid in pids.items()}
        return cls(processes, reaped_children_cpu_seconds(), busy, idle)


@dataclass(frozen=True)
class CpuShare:
    """µs of CPU per request for each component, "wrk" and "other", and the share of the
    machine that stayed idle."""

    us_per_request: dict[str, float]
    idle_percent: float


def cpu_share(before: CpuSample, after: CpuSample, requests: int) -> CpuShare:
    per_request = 1e6 / max(requests, 1)
    spent = {name: after.processes[name] - seconds for name, seconds in before.processes.items()}
    spent["wrk"] = after.wrk - before.wrk
    busy, idle = after.busy - before.busy, after.idle - before.idle
    spent["other"] = max(0.0, busy - sum(spent.values()))
    return CpuShare(
        {name: seconds * per_request for name, seconds in spent.items()},
        100 * idle / max(busy + idle, 1e-9),
    )
