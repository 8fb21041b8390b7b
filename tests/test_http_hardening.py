"""What a slow, idle, greedy or foreign-protocol client can do to the lean HTTP server: the
header and idle timeouts close its connections, the connection cap refuses the excess with
a 503, running out of descriptors is logged once, and Upgrade / CONNECT get a 501. Every
test talks to a real listener on a loopback port."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from meshtoll.errors import ConfigError
from meshtoll.server.listeners import port_limits
from meshtoll.settings import settings_from
from meshtoll.transport.http_listener import HttpLimits, HttpListener, connection_cap, listening_socket
from meshtoll.transport.http_server import response, serve_http
from tests.waiting import eventually_async

OK = response(200, "OK", (("content-type", "text/plain"),), b"ok")
GOOD_REQUEST = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
FAST = HttpLimits(header_timeout_seconds=0.5, idle_timeout_seconds=0.5, max_connections=10_000)
# A bound on a hang, never a measurement: each wait it bounds takes at most ~1 s on an idle
# machine (a timeout of 0.5 s plus two sweeps), so a loaded one stays well inside it.
HANG_SECONDS = 15.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def answer_ok(method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
    return OK


@asynccontextmanager
async def listening(
    limits: HttpLimits, handler: Callable[..., bytes] = answer_ok
) -> AsyncIterator[tuple[HttpListener, int]]:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with await serve_http(handler, sock, limits=limits) as listener:
        yield listener, port


async def connect(port: int) -> Streams:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends before it closes; fails if it has not closed in time. A
    reset also counts as closed (it comes when the client writes after the server closed)."""
    received = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def ask(streams: Streams, request: bytes = GOOD_REQUEST, within: float = 2) -> bytes:
    reader, writer = streams
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    length = int(
        next(line for line in head.split(b"\r\n") if line.startswith(b"content-length")).split(b":")[1]
    )
    return head + await reader.readexactly(length)


async def ask_fresh(port: int, within: float = 2) -> bytes:
    streams = await connect(port)
    try:
        return await ask(streams, within=within)
    finally:
        streams[1].close()


async def closed_within(connections: list[Streams], within: float) -> list[bytes]:
    received = await asyncio.gather(*(read_until_closed(reader, within) for reader, _ in connections))
    for _, writer in connections:
        writer.close()
    return received


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []


async def test_slowloris_heads_get_408_within_the_header_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async with listening(FAST) as (listener, port):
        clients = [await connect(port) for _ in range(300)]

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # One more header byte every 0.1 s until the server closes: each keeps the
            # connection busy, none ends the head. It stops only when the server has closed
            # (its FIN, or the reset a write after it brings), so the close came while the
            # client was still sending, however slow the machine; the 408 says it was the
            # header timeout. At most one write follows the close (asyncio warns from the fifth).
            writer.write(b"GET / HTTP/1.1\r\nx-slow: ")
            while True:
                await asyncio.sleep(0.1)
                if writer.is_closing() or reader.at_eof():
                    return
                writer.write(b"a")

        trickling = [asyncio.create_task(trickle(reader, writer)) for reader, writer in clients]
        received = await closed_within(clients, within=HANG_SECONDS)
        for task in trickling:
            task.cancel()
        assert [reply for reply in received if not reply.startswith(b"HTTP/1.1 408 ")] == []
        assert b'"error":"request_timeout"' in received[0]
        assert await ask_fresh(port) == OK
        assert listener.connections <= 1
    no_tracebacks(caplog)


async def test_a_connection_that_sends_nothing_closes_after_the_header_timeout() -> None:
    limits = HttpLimits(header_timeout_seconds=0.3, idle_timeout_seconds=60, max_connections=100)
    async with listening(limits) as (_, port):
        started = time.monotonic()
        received = await closed_within([await connect(port) for _ in range(50)], within=HANG_SECONDS)
        # Never before the timeout (a loaded machine only makes it later); how much later is
        # not asserted: the 408 says the header timeout closed them.
        assert time.monotonic() - started >= 0.3
        assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in received)


async def test_idle_keep_alive_connections_close_quietly_and_busy_ones_stay() -> None:
    # An idle timeout of 2 s: the busy connection asks every few ms, so only a stall of the
    # whole process for 2 s could make it look idle.
    limits = HttpLimits(header_timeout_seconds=2, idle_timeout_seconds=2, max_connections=10_000)
    async with listening(limits) as (listener, port):
        idle = []
        for _ in range(300):
            # Asked at once: a connection left waiting for its first request while the others
            # connect would meet the header timeout on a busy machine.
            idle.append(streams := await connect(port))
            assert await ask(streams) == OK
        busy = await connect(port)
        quiet = asyncio.create_task(closed_within(idle, within=HANG_SECONDS))
        # The busy connection is served all the while the idle ones close, and after.
        asked = 0
        while not quiet.done():
            assert await ask(busy) == OK
            asked += 1
            await asyncio.sleep(0.01)
        assert asked > 1
        assert await quiet == [b""] * 300  # closed with no response: none was asked for
        assert await ask(busy) == OK
        assert listener.connections == 1
        busy[1].close()


async def test_connections_over_the_cap_get_503_and_the_port_recovers() -> None:
    limits = HttpLimits(header_timeout_seconds=5, idle_timeout_seconds=5, max_connections=20)
    async with listening(limits) as (listener, port):
        held = [await connect(port) for _ in range(20)]
        for streams in held:
            assert await ask(streams) == OK
        refused = await closed_within([await connect(port) for _ in range(5)], within=HANG_SECONDS)
        assert all(reply.startswith(b"HTTP/1.1 503 ") for reply in refused)
        body = json.loads(refused[0].partition(b"\r\n\r\n")[2])
        assert body["error"] == "too_many_connections"
        assert listener.refused == 5
        held[0][1].close()
        await eventually_async(
            lambda: listener.connections,
            lambda count: count < 20,
            timeout=HANG_SECONDS,
            message="the closed connection still counted",
        )
        assert await ask_fresh(port) == OK
        for _, writer in held:
            writer.close()


async def test_each_listener_has_its_own_cap_so_admin_answers_while_authz_is_full() -> None:
    authz_limits = HttpLimits(header_timeout_seconds=5, idle_timeout_seconds=5, max_connections=50)
    admin_limits = HttpLimits(header_timeout_seconds=5, idle_timeout_seconds=5, max_connections=5)
    async with listening(authz_limits) as (_, authz), listening(admin_limits) as (_, admin):
        flood = [await connect(authz) for _ in range(200)]
        assert await ask_fresh(admin) == OK
        for _, writer in flood:
            writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n"
        b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        b"POST /x HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\ncontent-length: 3\r\n\r\nabc",
    ],
    ids=["websocket", "h2c", "connect", "upgrade-with-body"],
)
async def test_upgrade_and_connect_get_501_without_a_traceback(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def record(method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
        seen.append(target)
        return OK

    async with listening(FAST, record) as (_, port):
        reader, writer = await connect(port)
        writer.write(request_bytes)
        received = await read_until_closed(reader, within=HANG_SECONDS)
        writer.close()
    assert received.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"] == "upgrade_not_supported"
    assert seen == []  # the handler never saw it: no decision was made or counted
    no_tracebacks(caplog)


async def test_a_client_that_never_reads_its_answers_is_cut_off_after_the_idle_timeout() -> None:
    async with listening(FAST) as (listener, port):
        _, writer = await connect(port)
        # Far more answers than the socket buffers hold: the server stops reading, then gives up.
        for _ in range(200):
            writer.write(GOOD_REQUEST * 500)
            await asyncio.sleep(0)
        await eventually_async(
            lambda: listener.connections,
            lambda count: count == 0,
            timeout=HANG_SECONDS,
            interval=0.05,
            message="the client that never reads was not cut off",
        )
        writer.close()


async def test_shutting_down_closes_idle_connections_and_finishes_answers_in_flight() -> None:
    asked, release = asyncio.Event(), asyncio.Event()

    async def slow() -> bytes:
        asked.set()
        await release.wait()
        return OK

    def handler(method: str, target: str, headers: dict[str, str], peer: str) -> bytes | Awaitable[bytes]:
        return slow() if target == "/slow" else OK

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listener = await serve_http(handler, sock, limits=FAST)
    idle = await connect(port)
    assert await ask(idle) == OK
    waiting = await connect(port)
    waiting[1].write(b"GET /slow HTTP/1.1\r\n\r\n")
    await eventually_async(
        asked.is_set, timeout=HANG_SECONDS, message="the slow request never reached the handler"
    )
    listener.close()
    assert await read_until_closed(idle[0], within=HANG_SECONDS) == b""
    release.set()
    assert (await read_until_closed(waiting[0], within=HANG_SECONDS)).endswith(b"\r\n\r\nok")
    await listener.wait_closed()
    assert listener.connections == 0
    for _, writer in (idle, waiting):
        writer.close()


# A server in its own process with 64 descriptors, so that it runs out of them; it prints
# "paused" each time it stops accepting for lack of them, for the test to wait on.
_STARVED_SERVER = """
import asyncio, logging, resource, sys
from meshtoll.transport.http_listener import HttpLimits, HttpListener, listening_socket
from meshtoll.transport.http_server import response, serve_http

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
OK = response(200, "OK", ())
pause = HttpListener._pause_accepting

def counted(self, error):
    print("paused", flush=True)
    pause(self, error)

HttpListener._pause_accepting = counted

async def main() -> None:
    sock = listening_socket("127.0.0.1", 0)
    await serve_http(lambda *request: OK, sock, limits=HttpLimits(5, 5, max_connections=1000))
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()  # until the test terminates it, however slow the machine

asyncio.run(main())
"""


async def test_running_out_of_descriptors_is_logged_once_and_the_server_recovers() -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STARVED_SERVER, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        # Deadlines on states, generous: a loaded machine starts a Python process slowly.
        port = int(await asyncio.wait_for(server.stdout.readline(), 30))
        flood = [await connect(port) for _ in range(150)]
        # Out of descriptors, and still out at the retry a second later: two pauses.
        for _ in range(2):
            assert await asyncio.wait_for(server.stdout.readline(), 30) == b"paused\n"
        for _, writer in flood:
            writer.close()
        # A new client waits in the backlog behind the flood's closed connections, which the
        # server accepts and drops a descriptor-limit's worth per retry: a few seconds.
        assert (await ask_fresh(port, within=30)).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        server.terminate()
        _, stderr = await asyncio.wait_for(server.communicate(), 5)
    logged = stderr.decode().splitlines()
    assert [line for line in logged if "cannot accept" in line] == [
        f"meshtoll.http ERROR cannot accept connections on 127.0.0.1:{port} ([Errno 24] Too many "
        "open files); retrying every second (1 times since the last report)"
    ]
    assert logged == [line for line in logged if "cannot accept" in line]  # and nothing else


def test_idle_timeout_default_stays_below_envoys_one_hour() -> None:
    assert HttpLimits().header_timeout_seconds == 10
    assert 30 <= HttpLimits().idle_timeout_seconds < 3600


def test_the_connection_cap_defaults_to_half_the_descriptors_at_most_ten_thousand() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert HttpLimits().max_connections == min(10_000, (soft - 256) // 2)


def test_each_port_gets_its_limits_from_flags_or_the_environment() -> None:
    environ = {"MESHTOLL_HTTP_IDLE_TIMEOUT_SECONDS": "120", "MESHTOLL_ADMIN_MAX_CONNECTIONS": "32"}
    authz, admin = port_limits(settings_from({"http_max_connections": 500}, environ))
    assert authz == HttpLimits(header_timeout_seconds=10, idle_timeout_seconds=120, max_connections=500)
    assert admin == HttpLimits(header_timeout_seconds=10, idle_timeout_seconds=120, max_connections=32)
    assert port_limits(settings_from({}, {}))[0].max_connections == connection_cap()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"http_header_timeout_seconds": 0.0}, "http_header_timeout_seconds: 0.0 must be positive"),
        ({"http_idle_timeout_seconds": -1.0}, "http_idle_timeout_seconds: -1.0 must be positive"),
        ({"http_max_connections": -1}, "http_max_connections: -1 must be 0 \\(automatic\\) or more"),
        ({"admin_max_connections": 0}, "admin_max_connections: 0 must be at least 1"),
    ],
)
def test_impossible_http_limits_are_config_errors(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(flags, {})


@pytest.fixture(autouse=True)
def _capture_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
