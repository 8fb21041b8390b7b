"""A lean asyncio HTTP/1.1 server: httptools parsing, a synchronous handler, keep-alive.

The HTTP ext_authz fast path exists because this costs about a tenth of the CPU of a gRPC
call per request (see DESIGN.md), so nothing here allocates more than a request needs:
the handler gets the method, the raw target and a dict of lower-case headers, and returns
the complete response bytes, which it is free to have built once in advance.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

log = logging.getLogger("meshtoll.http")

Handler = Callable[[str, str, dict[str, str], str], bytes | Awaitable[bytes]]
"""(method, target, headers, peer address) -> complete HTTP/1.1 response bytes, or an
awaitable of them when the answer needs I/O (answers still go out in request order)."""

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# Requests in flight on one connection before it stops reading more (Envoy does not
# pipeline, but a client talking to the port directly may).
MAX_PENDING = 64


def response(status: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"{head}content-length: {len(body)}\r\n\r\n".encode("latin-1") + body


HEADERS_TOO_LARGE = response(
    431,
    "Request Header Fields Too Large",
    (("content-type", "application/json"), ("connection", "close")),
    b'{"error":"headers_too_large","message":"request headers exceed 65536 bytes"}',
)
BODY_TOO_LARGE = response(
    413,
    "Content Too Large",
    (("content-type", "application/json"), ("connection", "close")),
    b'{"error":"body_too_large","message":"request body exceeds 1048576 bytes"}',
)
BAD_REQUEST = response(
    400,
    "Bad Request",
    (("content-type", "application/json"), ("connection", "close")),
    b'{"error":"bad_request","message":"malformed HTTP/1.1 request"}',
)

INTERNAL_ERROR = response(
    500,
    "Internal Server Error",
    (("content-type", "application/json"), ("connection", "close")),
    b'{"error":"internal_error","message":"the request could not be handled"}',
)


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_body_bytes",
        "_handler",
        "_header_bytes",
        "_headers",
        "_parser",
        "_peer",
        "_pending",
        "_transport",
        "_url",
    )

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body_bytes = 0
        self._pending: deque[tuple[asyncio.Future[bytes], bool]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else ""

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # httptools wraps what a callback raised; the original is the context.
            refused = exc.__context__
            if not isinstance(refused, _Refused):
                log.error("HTTP handler failed", exc_info=refused)
            self._fail(refused.response if isinstance(refused, _Refused) else INTERNAL_ERROR)
        except httptools.HttpParserError:
            self._fail(BAD_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()

    def _fail(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _Refused(BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        reply = self._handler(method, self._url.decode("latin-1"), self._headers, self._peer)
        keep_alive = self._parser.should_keep_alive()
        if isinstance(reply, bytes) and not self._pending:
            self._send(reply, keep_alive)
            return
        future = asyncio.ensure_future(reply) if not isinstance(reply, bytes) else _done(reply)
        self._pending.append((future, keep_alive))
        future.add_done_callback(self._flush)
        if len(self._pending) >= MAX_PENDING and self._transport is not None:
            self._transport.pause_reading()

    def _flush(self, _: object = None) -> None:
        """Send every answer that is ready, in request order."""
        while self._pending and self._pending[0][0].done():
            future, keep_alive = self._pending.popleft()
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                log.error("HTTP handler failed", exc_info=error)
                self._fail(INTERNAL_ERROR)
                return
            self._send(future.result(), keep_alive)
        if (
            len(self._pending) < MAX_PENDING
            and self._transport is not None
            and not self._transport.is_closing()
        ):
            self._transport.resume_reading()

    def _send(self, reply: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if not keep_alive:
            transport.close()

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(HEADERS_TOO_LARGE)


def _done(reply: bytes) -> asyncio.Future[bytes]:
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


@dataclass(slots=True)
class _Refused(Exception):
    response: bytes


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that several worker processes can share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_http(
    handler: Handler, sock: socket.socket, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Serve on `sock`; over TLS when `tls` is given (the handshake happens before the handler sees
    anything, so a client refused by mutual TLS never reaches it)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: HttpProtocol(handler), sock=sock, ssl=tls)
