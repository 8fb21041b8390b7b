"""Accepting HTTP connections within bounds that no client can push the server past.

HttpLimits bounds what a slow or greedy client may hold: a request must arrive within the
header timeout of its first byte (of the connection, for the first request), a connection
with nothing in flight closes after the idle timeout, and no more than max_connections are
open at once; the next one gets the refusal (503 + close) at once.

One timer per listener enforces the timeouts: a sweep each second (less when a timeout is
shorter) asks every connection whether it has waited too long, on a coarse clock it ticks
itself, so a request pays nothing for them but storing the clock's value; a timeout fires
between its time and two sweeps later, never before.

The listener runs its own accept loop rather than loop.create_server because CPython's
(3.11) meets EMFILE by logging a traceback and scheduling a retry for each of up to 100
attempts per wake-up (600 tracebacks in 2 s with a limit of 200 descriptors, measured), and
could not refuse a connection over the cap without building a transport for it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

log = logging.getLogger("meshtoll.http")

MAX_CONNECTIONS = 10_000
# Descriptors a process needs besides its HTTP connections before halving the rest.
_RESERVED_DESCRIPTORS = 256
_ACCEPTS_PER_WAKEUP = 100
_ACCEPT_RETRY_SECONDS = 1.0
_REPORT_EVERY_SECONDS = 60.0
# How long shutting down waits for answers in flight before cutting their connections.
_DRAIN_SECONDS = 5.0


def connection_cap() -> int:
    """Half the descriptors this process may open, at most MAX_CONNECTIONS: the other half
    stays for the gRPC port's connections, Redis, the admin port and files, so that a flood
    of HTTP connections cannot starve those."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, (soft - _RESERVED_DESCRIPTORS) // 2))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout_seconds: float = 10.0
    # Longer than any pause between two requests on a busy pool, much shorter than Envoy's
    # own idle timeout (1 h by default), so connections a pool no longer needs are reclaimed.
    # Envoy's HTTP/1 pool reuses the most recently released connection first, so the ones
    # that sit idle this long are its spares; it sees their FIN and drops them from the pool.
    # A reset is possible only if Envoy sends a request in the instant the FIN is in flight.
    idle_timeout_seconds: float = 60.0
    max_connections: int = field(default_factory=connection_cap)


class Connection(asyncio.Protocol):
    """A connection as its listener bounds it (HttpProtocol is the one kind there is)."""

    __slots__ = ()

    def expire(self, now: float, limits: HttpLimits) -> None:
        """Close the connection if it has kept the server waiting longer than `limits` allow."""
        raise NotImplementedError

    def close_when_idle(self) -> None:
        """Shutting down: close now if nothing is in flight, else after the last answer."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class HttpListener:
    """Accepts connections on one listening socket and keeps them within HttpLimits."""

    def __init__(
        self,
        sock: socket.socket,
        connection_for: Callable[[HttpListener], Connection],
        limits: HttpLimits,
        tls: ssl.SSLContext | None,
        refusal: bytes,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._connection_for = connection_for
        self.limits = limits
        self._tls = tls
        self._refusal = b"" if tls is not None else refusal  # not in clear text to a TLS client
        self.now = self._loop.time()  # the coarse clock; connections read it
        self.refused = 0
        self._connections: set[Connection] = set()
        self._starting: set[asyncio.Task[object]] = set()
        self._sweep_seconds = min(1.0, limits.header_timeout_seconds / 4, limits.idle_timeout_seconds / 4)
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._closing = False
        self._all_closed = asyncio.Event()
        host, port = sock.getsockname()[:2]
        self._address = f"{host}:{port}"
        self._accept_failures = _Occasional(logging.ERROR)
        self._refusals = _Occasional(logging.WARNING)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._timer = self._loop.call_later(self._sweep_seconds, self._sweep)

    def forget(self, connection: Connection) -> None:
        self._connections.discard(connection)
        if self._closing and not self._connections:
            self._all_closed.set()

    def close(self) -> None:
        """Stop accepting; close idle connections now and the others after their answers."""
        if self._closing:
            return
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._starting:
            task.cancel()
        for connection in list(self._connections):
            connection.close_when_idle()
        if not self._connections:
            self._all_closed.set()

    async def wait_closed(self) -> None:
        try:
            await asyncio.wait_for(self._all_closed.wait(), _DRAIN_SECONDS)
        except TimeoutError:
            for connection in list(self._connections):
                connection.abort()
        if self._timer is not None:
            self._timer.cancel()

    async def __aenter__(self) -> HttpListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def _accept(self) -> None:
        self.now = self._loop.time()
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as exc:
                self._pause_accepting(exc)
                return
            if len(self._connections) >= self.limits.max_connections:
                self._refuse(conn)
            else:
                self._open(conn)

    def _pause_accepting(self, error: OSError) -> None:
        # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): an immediate retry
        # would fail the same way, so pause for a second while the kernel queues the clients.
        self._accept_failures.report(
            self.now, "cannot accept connections on %s (%s); retrying every second", self._address, error
        )
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(_ACCEPT_RETRY_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self._closing:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        self._refusals.report(
            self.now,
            "refusing connections on %s: %d are open, the most allowed",
            self._address,
            self.limits.max_connections,
        )
        conn.setblocking(False)
        # Read what the client has sent already: closing with unread data would reset the
        # connection, and the client might then never see the refusal.
        with contextlib.suppress(OSError):
            conn.recv(65536)
        with contextlib.suppress(OSError):
            conn.send(self._refusal)
        conn.close()

    def _open(self, conn: socket.socket) -> None:
        connection = self._connection_for(self)
        self._connections.add(connection)
        if self._tls is None:
            started = self._loop.connect_accepted_socket(lambda: connection, conn)
        else:
            # A handshake that never finishes is bounded like a request head that never does.
            started = self._loop.connect_accepted_socket(
                lambda: connection,
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=self.limits.header_timeout_seconds,
            )
        task: asyncio.Task[object] = self._loop.create_task(started)
        self._starting.add(task)
        task.add_done_callback(partial(self._started, connection))

    def _started(self, connection: Connection, task: asyncio.Task[object]) -> None:
        self._starting.discard(task)
        failure = None if task.cancelled() else task.exception()
        if task.cancelled() or failure is not None:
            # A TLS handshake that failed or timed out, or a client gone before it started:
            # it never became a connection, so it will not report its own end.
            log.debug("connection on %s not started: %r", self._address, failure)
            self.forget(connection)

    def _sweep(self) -> None:
        now = self._loop.time()
        # Connections stamp their states with this clock, which may be up to a sweep behind
        # the truth; judging them a sweep behind too means no timeout ever fires early.
        judged_at = now - self._sweep_seconds
        self.now = now
        limits = self.limits
        for connection in tuple(self._connections):
            connection.expire(judged_at, limits)
        self._timer = self._loop.call_later(self._sweep_seconds, self._sweep)


class _Occasional:
    """Logs the first of a run of like events, then at most one line a minute, with how many
    there were: a flood of refused or failed accepts must not become a flood of log lines."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._next = -math.inf
        self._unreported = 0

    def report(self, now: float, message: str, *args: object) -> None:
        self._unreported += 1
        if now < self._next:
            return
        log.log(self._level, message + " (%d times since the last report)", *args, self._unreported)
        self._unreported = 0
        self._next = now + _REPORT_EVERY_SECONDS


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket owned by one process (meshtoll's workers inherit it from their
    supervisor rather than bind their own), so without SO_REUSEPORT: anyone else who binds
    the port, a second `meshtoll serve` among them, fails with EADDRINUSE."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Lets a restart bind while the last run's closed connections linger in TIME_WAIT; it
    # does not let two listeners share the port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
