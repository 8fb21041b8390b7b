"""Process orchestration of the local stack: start-up failures explain themselves, and
stopping leaves nothing running."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from meshtoll.errors import ProcessStartError
from meshtoll.local.processes import Child, Probe, free_ports, listens, retrying_lost_ports


def python(code: str, tmp_path: Path) -> Child:
    return Child("toy", [sys.executable, "-c", code], tmp_path / "toy.log")


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    # An outgoing connection takes its port from the ephemeral range: a listener chosen
    # there could lose its port to one before it binds (it did, once, to a Redis client).
    ports = free_ports(20)
    assert len(set(ports)) == 20
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(1024 <= port < low for port in ports)


def test_free_ports_never_hands_out_a_port_twice() -> None:
    # The port a child bound and released (a restart, a test that ended) is not given to
    # the next child: each call's ports are free now and new to this process.
    given = [port for _ in range(50) for port in free_ports(4)]
    assert len(set(given)) == len(given)


LISTENER = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)"


def test_a_child_that_lost_its_port_starts_again_on_another(tmp_path: Path) -> None:
    with socket.socket() as taken:  # another process's server, on the port chosen first
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        started: list[Child] = []

        def start() -> tuple[Child, Probe]:
            port = ports[-1] if not started else free_ports(1)[0]
            ports.append(port)
            argv = [sys.executable, "-c", LISTENER, str(port)]
            started.append(Child("listener", argv, tmp_path / f"listener-{len(started)}.log"))
            return started[-1], listens(started[-1], port)

        try:
            child = retrying_lost_ports(start, timeout=10)
            assert child is started[-1]
            assert len(started) == 2
            assert started[0].lost_a_port()
            assert listens(child, ports[-1])()
            # Something answers on the first port, but not the child: that is not readiness.
            assert not listens(child, ports[0])()
        finally:
            for each in started:
                each.stop()


def test_a_child_that_fails_for_another_reason_is_not_started_again(tmp_path: Path) -> None:
    started: list[Child] = []

    def start() -> tuple[Child, Probe]:
        started.append(python("import sys; sys.exit('no configuration')", tmp_path))
        return started[-1], lambda: False

    with pytest.raises(ProcessStartError, match="no configuration"):
        retrying_lost_ports(start, timeout=10)
    assert len(started) == 1


def test_a_child_that_exits_before_ready_fails_with_its_last_output(tmp_path: Path) -> None:
    child = python("import sys; print('policy rejected: bad key', flush=True); sys.exit(3)", tmp_path)
    with pytest.raises(ProcessStartError, match=r"(?s)exited with status 3.*policy rejected: bad key"):
        child.wait_ready(lambda: False, timeout=10)
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
