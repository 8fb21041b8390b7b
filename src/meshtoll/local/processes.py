"""Child processes of the local stack: start, wait until ready, stop; their ports.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the parent,
which stops the children in order, and stopping a child also stops whatever it forked
(meshtoll's worker processes). Output goes to a log file, never a pipe, so a chatty child
cannot block on a full pipe; the log's tail explains a child that failed to start.

Ports: a child that can bind port 0 does, and tells which port it got (meshtoll's
`--ports-file`, Envoy's admin: local/envoy_process.py), so nothing can take the port first.
A child that cannot (redis-server, nginx), or that must bind the same port again after a
restart, gets one from `free_ports`, which never hands out a port twice in this process,
and is started with `retrying_lost_ports`, which starts it again on a new port when another
process bound its port first: several test runs share this machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
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


class PortAllocator:
    """Loopback ports, each free when chosen, below the kernel's range of ephemeral ports (a
    port there can be taken by any outgoing connection, meshtoll's to Redis say, before the
    child meant to listen on it binds it), and never the same twice: two children of one
    process never get one port, however long after each other they bind."""

    def __init__(self) -> None:
        self._given: set[int] = set()
        self._lock = threading.Lock()  # the benchmark starts environments from threads

    def take(self, count: int) -> list[int]:
        low, _ = _ephemeral_range()
        candidates = [port for port in range(max(1024, low - 12_000), low) if port not in self._given]
        random.shuffle(candidates)
        found: list[int] = []
        with self._lock, ExitStack() as held:
            # Holding every socket open until all are bound keeps the ports distinct.
            for port in candidates:
                if port in self._given:
                    continue
                sock = held.enter_context(socket.socket())
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                found.append(port)
                if len(found) == count:
                    self._given.update(found)
                    return found
        raise ProcessStartError(f"no {count} free loopback ports below {low}")


# The one allocator of this process: what keeps every port it hands out distinct.
_PORTS = PortAllocator()
PORT_ATTEMPTS = 5


def free_ports(count: int) -> list[int]:
    """`count` loopback ports nobody held a moment ago and this process never gave out."""
    return _PORTS.take(count)


def retrying_lost_ports(start: Callable[[], tuple[Child, Probe]], timeout: float) -> Child:
    """`start()` spawns a child on ports it takes from `free_ports` (new ones each call) and
    says how to see that the child itself holds them; when the child could not bind one
    (another process took it between its choice and the bind), it is started again."""
    for _ in range(PORT_ATTEMPTS):
        child, probe = start()
        try:
            child.wait_ready(probe, timeout)
            return child
        except ProcessStartError as failure:
            child.stop()
            if not child.lost_a_port():
                raise
            last = failure
    raise ProcessStartError(f"another process took a port {PORT_ATTEMPTS} times in a row; last:\n{last}")


def listens(child: Child, port: int) -> Probe:
    """Ready once `child` itself holds a listening TCP socket on `port`: not just anything
    answering there, which could be another process's server that took the port first."""

    def probe() -> bool:
        sockets = {f"socket:[{inode}]" for inode in listening_inodes(port)}
        if not sockets:
            return False
        try:
            descriptors = list(Path(f"/proc/{child.pid}/fd").iterdir())
        except OSError:
            return False
        for descriptor in descriptors:
            with suppress(OSError):
                if os.readlink(descriptor) in sockets:
                    return True
        return False

    return probe


def listening_inodes(port: int) -> list[str]:
    """The inodes of every listening TCP socket on `port`, whoever holds it."""
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address "0100007F:1F90", state 0A: LISTEN, inode in the tenth field.
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.append(fields[9])
    return inodes


def announced_ports(path: Path) -> Probe:
    """Ready once a child wrote the ports it bound to `path` (server/lifecycle.announce_ports)."""
    return path.is_file


def read_ports(path: Path) -> dict[str, int]:
    ports: dict[str, int] = json.loads(path.read_text())
    return ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


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

    def lost_a_port(self) -> bool:
        """Whether the child stopped because a port it was to bind was taken: the words
        redis-server, nginx, Envoy and meshtoll all use for EADDRINUSE."""
        try:
            return "already in use" in self.log_path.read_text(errors="replace").lower()
        except OSError:
            return False

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
