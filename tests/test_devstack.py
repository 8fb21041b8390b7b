"""Process orchestration of the local stack: start-up failures explain themselves, and
stopping leaves nothing running."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshtoll.errors import ProcessStartError
from meshtoll.local.processes import Child, free_ports, tcp_accepts


def python(code: str, tmp_path: Path) -> Child:
    return Child("toy", [sys.executable, "-c", code], tmp_path / "toy.log")


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    # An outgoing connection takes its port from the ephemeral range: a listener chosen
    # there could lose its port to one before it binds (it did, once, to a Redis client).
    ports = free_ports(20)
    assert len(set(ports)) == 20
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(1024 <= port < low for port in ports)


def test_a_child_that_exits_before_ready_fails_with_its_last_output(tmp_path: Path) -> None:
    child = python("import sys; print('policy rejected: bad key', flush=True); sys.exit(3)", tmp_path)
    with pytest.raises(ProcessStartError, match=r"(?s)exited with status 3.*policy rejected: bad key"):
        child.wait_ready(tcp_accepts(free_ports(1)[0]), timeout=10)
    child.stop()


def test_a_child_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    child = python("import time; time.sleep(30)", tmp_path)
    try:
        with pytest.raises(ProcessStartError, match=r"not ready after 0\.3s"):
            child.wait_ready(lambda: False, timeout=0.3)
    finally:
        child.stop()


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(30)"
    child = python(code, tmp_path)
    child.wait_ready(lambda: "up" in child.log_tail(), timeout=10)
    child.stop(grace=0.2)
    assert child.returncode is not None
