"""Child processes of the local stack: start, wait until ready, stop; free loopback ports.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the parent,
which stops the children in order, and stopping a child also stops whatever it forked
(meshtoll's worker processes). Output goes to a log file, never a pipe, so a chatty child
cannot block on a full pipe; the log's tail explains a child that failed to start.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

from meshtoll.errors import ProcessStartError

Probe = Callable[[], bool]
STOP_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.05


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago, below the kernel's range
    of ephemeral ports: a port bind(0) picks there can be taken by any outgoing connection
    (meshtoll's to Redis, say) before the process meant to listen on it binds it."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12_000), low))
    random.shuffle(candidates)
    found: list[int] = []
    with ExitStack() as held:
        # Holding every socket open until all are bound keeps the ports distinct.
        for port in candidates:
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            found.append(port)
            if len(found) == count:
                return found
    raise ProcessStartError(f"no {count} free loopback ports below {low}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def tcp_accepts(port: int) -> Probe:
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def http_ok(url: str) -> Probe:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    return probe


class Child:
    """One started process, its log file, and how to stop it."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        """`env`: variables added to this process's environment for the child. Secrets go
        there, never in `argv`: every local user can read a process's arguments
        (/proc/<pid>/cmdline, ps), only its owner its environment."""
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def wait_ready(self, probe: Probe, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            code = self._process.poll()
            if code is not None:
                raise ProcessStartError(self._failure(f"exited with status {code} before it was ready"))
            if time.monotonic() > deadline:
                raise ProcessStartError(self._failure(f"was not ready after {timeout:g}s"))
            time.sleep(_POLL_SECONDS)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the child's process group, SIGKILL if it is still running after `grace`."""
        if self._process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._process.wait()
        # Workers outliving their supervisor share its process group; sweep them up too.
        self._signal(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, signum: signal.Signals) -> None:
        # ProcessLookupError: the whole group has already exited, which is what we want.
        with suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def _failure(self, what: str) -> str:
        tail = self.log_tail() or "(no output)"
        # The tail, not the log's path: a temporary work directory is gone once start-up fails.
        return f"{self.name} {what}\n  command: {' '.join(self.argv)}\n  last output:\n{tail}"
