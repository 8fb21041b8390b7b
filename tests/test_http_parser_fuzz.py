"""A seeded, bounded fuzz of the lean HTTP server over real loopback connections.

Thousands of mutated requests (random bytes, truncated heads, huge headers, bad chunked
bodies, conflicting lengths, pipelined garbage, Upgrade and CONNECT, absolute-form targets,
NUL bytes, flipped bytes), each on its own connection, sent in one or a few writes, half of
them followed by a half-close. Every connection must end within a bound with nothing or a
sequence of well-formed HTTP/1.1 responses (an error one last), nothing may be logged with
a traceback, and the server must answer a good request afterwards. A failure names the
seed and the case, so it can be replayed alone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
from collections.abc import Callable

import pytest

from meshtoll.transport.http_listener import HttpLimits, listening_socket
from meshtoll.transport.http_server import response, serve_http
from tests.waiting import eventually_async

SEED = 20261201
CASES = 3000
CONCURRENCY = 100
# The server's timeouts are short so that a truncated head or a keep-alive connection ends
# quickly; every connection must be over within BOUND_SECONDS: a bound on a hang, never a
# measurement, over 10x the ~0.6 s (a timeout and two sweeps) a connection takes at most on
# an idle machine, so a loaded one stays inside it.
LIMITS = HttpLimits(header_timeout_seconds=0.4, idle_timeout_seconds=0.4, max_connections=10_000)
BOUND_SECONDS = 10.0
ANSWERS = {200, 400, 408, 413, 431, 501}

GOOD = (
    b"GET /v1/things?x=1 HTTP/1.1\r\nhost: api.example\r\nx-api-key: mk_live_abc\r\nuser-agent: fuzz\r\n\r\n"
)
POST = b"POST /v1/things HTTP/1.1\r\nhost: api.example\r\ncontent-length: 5\r\n\r\nhello"
OK = response(200, "OK", (("content-type", "text/plain"),), b"ok")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [!-~ ]+")


def answer_ok(method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
    return OK


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 2000))


def truncated_head(rng: random.Random) -> bytes:
    return GOOD[: rng.randrange(1, len(GOOD) - 1)]


def huge_header(rng: random.Random) -> bytes:
    return b"GET / HTTP/1.1\r\nx-big: " + b"a" * rng.randrange(60_000, 80_000) + b"\r\n\r\n"


def many_headers(rng: random.Random) -> bytes:
    headers = b"".join(b"x-h%d: %d\r\n" % (i, i) for i in range(rng.randrange(100, 5000)))
    return b"GET / HTTP/1.1\r\n" + headers + b"\r\n"


def bad_chunked(rng: random.Random) -> bytes:
    body = rng.choice(
        [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5;ext=\x01\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhel",
            b"0\r\nx-trailer: \x00\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",  # a valid one now and then
        ]
    )
    return b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + body


def conflicting_lengths(rng: random.Random) -> bytes:
    headers = rng.choice(
        [
            b"content-length: 5\r\ncontent-length: 6\r\n",
            b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
            b"content-length: -1\r\n",
            b"content-length: 99999999999999999999999\r\n",
            b"content-length: 5x\r\n",
            b"transfer-encoding: gzip, chunked\r\ntransfer-encoding: identity\r\n",
            b"content-length: 2000000\r\n",
        ]
    )
    return b"POST / HTTP/1.1\r\n" + headers + b"\r\nhello"


def pipelined_garbage(rng: random.Random) -> bytes:
    return GOOD * rng.randrange(1, 4) + rng.randbytes(rng.randrange(1, 200)) + GOOD


def upgrade_or_connect(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n" + rng.randbytes(20),
            b"GET / HTTP/1.1\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n" + rng.randbytes(20),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n" + GOOD,  # no connection: upgrade
        ]
    )


def odd_targets(rng: random.Random) -> bytes:
    target = rng.choice(
        [b"http://evil.example/x", b"*", b"//x", b"/%00", b"/" + b"a" * 70_000, b"", b"/\xff\xfe"]
    )
    method = rng.choice([b"GET", b"OPTIONS", b"DELETE", b"FOO", b"get", b""])
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b""])
    return method + b" " + target + b" " + version + b"\r\nhost: x\r\n\r\n"


def nul_bytes(rng: random.Random) -> bytes:
    data = bytearray(rng.choice([GOOD, POST]))
    for _ in range(rng.randrange(1, 4)):
        data.insert(rng.randrange(len(data)), 0)
    return bytes(data)


def flipped_bytes(rng: random.Random) -> bytes:
    data = bytearray(rng.choice([GOOD, POST, GOOD + POST]))
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def obsolete_forms(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"GET /\r\n\r\n",  # HTTP/0.9
            b"GET / HTTP/1.1\r\nx-folded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\nhost: x\n\n",  # bare LF
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"\r\n\r\n" + GOOD,
        ]
    )


MUTATIONS: list[Callable[[random.Random], bytes]] = [
    random_bytes,
    truncated_head,
    huge_header,
    many_headers,
    bad_chunked,
    conflicting_lengths,
    pipelined_garbage,
    upgrade_or_connect,
    odd_targets,
    nul_bytes,
    flipped_bytes,
    obsolete_forms,
]


def well_formed_statuses(received: bytes) -> list[int]:
    """The statuses of the complete HTTP/1.1 responses `received` consists of; fails on
    anything else (a torn response, stray bytes)."""
    statuses = []
    while received:
        head, separator, rest = received.partition(b"\r\n\r\n")
        assert separator, f"an incomplete response head: {received[:200]!r}"
        status_line, *header_lines = head.split(b"\r\n")
        matched = _STATUS_LINE.fullmatch(status_line)
        assert matched, f"not a status line: {status_line!r}"
        headers = dict(line.lower().split(b": ", 1) for line in header_lines)
        length = int(headers[b"content-length"])
        assert len(rest) >= length, f"a torn body: {received[:200]!r}"
        received = rest[length:]
        statuses.append(int(matched[1]))
    return statuses


async def send_case(port: int, data: bytes, rng: random.Random) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        async with asyncio.timeout(BOUND_SECONDS):
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 3))))
            for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
                writer.write(data[start:end])
                await writer.drain()
            if rng.random() < 0.5:
                writer.write_eof()
            while chunk := await reader.read(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server closed while the client was still sending: a close, as allowed
    except OSError as error:
        # The same close seen by write_eof: shutting down a socket the server already reset.
        if error.errno != errno.ENOTCONN:
            raise
    finally:
        writer.close()
    return received


async def test_mutated_requests_get_well_formed_answers_or_a_close_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    cases = [(index, rng.choice(MUTATIONS)) for index in range(CASES)]
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with await serve_http(answer_ok, sock, limits=LIMITS) as listener:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def run_case(index: int, mutation: Callable[[random.Random], bytes]) -> None:
            case_rng = random.Random(f"{SEED}-{index}")
            data = mutation(case_rng)
            async with gate:
                try:
                    received = await send_case(port, data, case_rng)
                except TimeoutError:
                    pytest.fail(f"case {index} ({mutation.__name__}): not over in {BOUND_SECONDS}s")
            try:
                statuses = well_formed_statuses(received)
            except AssertionError as exc:
                pytest.fail(f"case {index} ({mutation.__name__}) {data[:120]!r}: {exc}")
            assert set(statuses) <= ANSWERS, (index, mutation.__name__, statuses)
            assert all(status == 200 for status in statuses[:-1]), (index, statuses)

        await asyncio.gather(*(run_case(index, mutation) for index, mutation in cases))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GOOD)
        assert await asyncio.wait_for(reader.readexactly(len(OK)), BOUND_SECONDS) == OK
        writer.close()
        await eventually_async(
            lambda: listener.connections,
            lambda count: count == 0,
            timeout=BOUND_SECONDS,
            message="a connection was never closed",
        )
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
