"""The lean HTTP/1.1 server under the HTTP ext_authz fast path, over real sockets."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable

import pytest

from meshtoll.authz.http_transport import uri_sans_from_xfcc
from meshtoll.transport.http_listener import listening_socket
from meshtoll.transport.http_server import HttpProtocol, response, serve_http, serve_http_reading_bodies
from tests.waiting import eventually_async

SEEN: list[tuple[str, str, dict[str, str]]] = []


def echo_path(method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
    SEEN.append((method, target, headers))
    return response(200, "OK", (("x-target", target),))


@pytest.fixture
async def port() -> AsyncIterator[int]:
    SEEN.clear()
    sock = listening_socket("127.0.0.1", 0)
    server = await serve_http(echo_path, sock)
    yield sock.getsockname()[1]
    server.close()
    await server.wait_closed()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return received


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(port: int) -> None:
    requests = b"".join(f"GET /r{i} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for i in range(3))
    received = await exchange(port, requests)
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert [line for line in received.split(b"\r\n") if line.startswith(b"x-target")] == [
        b"x-target: /r0",
        b"x-target: /r1",
        b"x-target: /r2",
    ]


async def test_header_names_are_lower_case_and_repeated_headers_are_joined(port: int) -> None:
    await exchange(port, b"GET / HTTP/1.1\r\nX-Api-Key: a\r\nVia: one\r\nvia: two\r\n\r\n")
    assert SEEN[0][2] == {"x-api-key": "a", "via": "one,two"}


async def test_oversized_headers_get_431_and_the_connection_closes(port: int) -> None:
    big = b"x-big: " + b"a" * 70_000 + b"\r\n"
    received = await exchange(port, b"GET / HTTP/1.1\r\n" + big + b"\r\n")
    assert received.startswith(b"HTTP/1.1 431 ")
    assert b'"error":"headers_too_large"' in received
    assert SEEN == []


async def test_malformed_requests_get_400(port: int) -> None:
    received = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ")


def test_xfcc_uri_sans_come_from_envoys_own_element_only() -> None:
    value = 'By=spiffe://gw;URI=spiffe://evil.test/x,By=spiffe://gw;Hash=ab;Subject="CN=a,O=b";URI=spiffe://acme.test/bot'
    assert uri_sans_from_xfcc(value) == ("spiffe://acme.test/bot",)
    assert uri_sans_from_xfcc('By=spiffe://gw;URI=spiffe://acme.test/bot;Subject="CN=a,O=b"') == (
        "spiffe://acme.test/bot",
    )
    assert uri_sans_from_xfcc("") == ()


async def test_an_error_is_answered_after_the_answers_still_being_worked_on() -> None:
    async def slowly(target: str) -> bytes:
        await asyncio.sleep(0.1)
        return response(200, "OK", (("x-target", target),))

    def handler(method: str, target: str, headers: dict[str, str], peer: str) -> Awaitable[bytes]:
        return slowly(target)

    sock = listening_socket("127.0.0.1", 0)
    async with await serve_http(handler, sock):
        requests = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nNOT HTTP\r\n\r\n"
        received = await exchange(sock.getsockname()[1], requests)
    statuses = [line for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.1")]
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert received.index(b"x-target: /a") < received.index(b"x-target: /b")


async def test_a_body_handler_gets_each_pipelined_body_whole_and_de_chunked() -> None:
    def reversing(method: str, target: str, headers: dict[str, str], peer: str, body: bytes) -> bytes:
        return response(200, "OK", (), body[::-1])

    sock = listening_socket("127.0.0.1", 0)
    async with await serve_http_reading_bodies(reversing, sock):
        requests = (
            b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
            b"POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            b"GET /c HTTP/1.1\r\n\r\n"
        )
        received = await exchange(sock.getsockname()[1], requests)
    bodies = [answer.split(b"\r\n\r\n", 1)[1] for answer in received.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"olleh", b"edcba", b""]


async def test_a_body_handler_is_still_refused_bodies_over_the_cap() -> None:
    seen: list[bytes] = []

    def keeping(method: str, target: str, headers: dict[str, str], peer: str, body: bytes) -> bytes:
        seen.append(body)
        return response(200, "OK", ())

    sock = listening_socket("127.0.0.1", 0)
    async with await serve_http_reading_bodies(keeping, sock):
        size = 1024 * 1024 + 1
        received = await exchange(
            sock.getsockname()[1], f"POST / HTTP/1.1\r\ncontent-length: {size}\r\n\r\n".encode() + b"x" * size
        )
    assert received.startswith(b"HTTP/1.1 413 ")
    assert seen == []


async def test_a_closed_connection_is_freed_without_the_garbage_collector() -> None:
    """What is alive when an instance freezes what it keeps (server/long_lived.py, at start
    and at each reload) is never collected again: a connection open then, as Envoy's pooled
    ones always are, must go by reference counting once it closes, so it may hold no cycle."""
    sock = listening_socket("127.0.0.1", 0)
    gc.collect()
    gc.disable()
    try:
        async with await serve_http(echo_path, sock) as server:
            for _ in range(5):
                received = await exchange(sock.getsockname()[1], b"GET /a HTTP/1.1\r\n\r\n")
                assert received.startswith(b"HTTP/1.1 200 OK")
            await eventually_async(lambda: server.connections, lambda n: n == 0, timeout=5, message="closed")
            left = [found for found in gc.get_objects() if type(found) is HttpProtocol]
    finally:
        gc.enable()
    assert left == []
