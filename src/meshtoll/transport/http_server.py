"""A lean asyncio HTTP/1.1 server: httptools parsing, a synchronous handler, keep-alive.

The HTTP ext_authz fast path exists because meshtoll's authz costs a fifth to a tenth of the
CPU per request here that it costs over grpcio (README, Benchmark: rows (c) and (d)), so
nothing here allocates more than a request needs: the handler gets the method, the raw
target and a dict of lower-case headers, and returns the complete response bytes, which it
is free to have built once in advance. Bodies are counted against their cap and dropped,
unless the port is served for a BodyHandler (serve_http_reading_bodies), whose connections
keep each body for it.

What a slow or greedy client may hold is bounded by HttpLimits, enforced by the listener
(transport/http_listener.py); a connection here only records which state it is in and since when, on
the coarse clock the listener ticks, so that the bounds cost a request two stores.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import httptools

from meshtoll.transport.http_listener import Connection, HttpLimits, HttpListener

log = logging.getLogger("meshtoll.http")

Handler = Callable[[str, str, dict[str, str], str], bytes | Awaitable[bytes]]
"""(method, target, headers, peer address) -> complete HTTP/1.1 response bytes, or an
awaitable of them when the answer needs I/O (answers still go out in request order)."""

BodyHandler = Callable[[str, str, dict[str, str], str, bytes], bytes | Awaitable[bytes]]
"""A Handler that is given the request's body too (at most MAX_BODY_BYTES, de-chunked)."""

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# Requests in flight on one connection before it stops reading more (Envoy does not
# pipeline, but a client talking to the port directly may).
MAX_PENDING = 64


def response(status: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes = b"") -> bytes:
    return response_head(status, reason, headers) + b"content-length: %d\r\n\r\n" % len(body) + body


def response_head(status: int, reason: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    """The status line and `headers`: a response without its last headers, for a handler
    that builds it once and appends the headers that change (`header_lines`) and the end
    of the head (`EMPTY_BODY`) per request."""
    return f"HTTP/1.1 {status} {reason}\r\n{header_lines(headers)}".encode("latin-1")


def header_lines(headers: tuple[tuple[str, str], ...]) -> str:
    return "".join([f"{name}: {value}\r\n" for name, value in headers])


EMPTY_BODY = b"content-length: 0\r\n\r\n"  # what ends the head of a response without a body


def error_response(status: int, reason: str, error: str, message: str) -> bytes:
    """A JSON error with a stable `error` code, after which the connection closes."""
    body = f'{{"error":"{error}","message":"{message}"}}'.encode()
    return response(status, reason, (("content-type", "application/json"), ("connection", "close")), body)


HEADERS_TOO_LARGE = error_response(
    431, "Request Header Fields Too Large", "headers_too_large", "request headers exceed 65536 bytes"
)
BODY_TOO_LARGE = error_response(
    413, "Content Too Large", "body_too_large", "request body exceeds 1048576 bytes"
)
BAD_REQUEST = error_response(400, "Bad Request", "bad_request", "malformed HTTP/1.1 request")
# Upgrade (websocket, h2c) and CONNECT hand the connection to another protocol, which this
# server does not speak; 501 says "not implemented here", not "your request is malformed".
UPGRADE_NOT_SUPPORTED = error_response(
    501,
    "Not Implemented",
    "upgrade_not_supported",
    "this port speaks HTTP/1.1 only: no Upgrade, no CONNECT",
)
REQUEST_TIMEOUT = error_response(
    408, "Request Timeout", "request_timeout", "the request did not arrive in time"
)
# Over the listener's max_connections: Envoy passes a 503 on to its client, who may retry.
TOO_MANY_CONNECTIONS = error_response(
    503, "Service Unavailable", "too_many_connections", "this port has as many connections as it allows"
)
INTERNAL_ERROR = error_response(
    500, "Internal Server Error", "internal_error", "the request could not be handled"
)
NOT_READY = error_response(
    503, "Service Unavailable", "not_ready", "this meshtoll process is starting: the policy is not loaded yet"
)


class StartingHandler:
    """A port's handler while the process starts: 503 `not_ready` until `ready(handler)`.

    The ports are bound before the policy loads, so the kernel accepts connections from
    then on. Left queued, a request would be decided only after Envoy's ext_authz timeout
    had already answered its client 503, and its admission billed for a request nobody
    served; answered at once, it is refused and admits nothing."""

    __slots__ = ("_handler", "_meanwhile")

    def __init__(self, meanwhile: Handler | None = None) -> None:
        """`meanwhile` answers until then (the admin port's liveness probe), if given."""
        self._handler: Handler | None = None
        self._meanwhile = meanwhile

    def ready(self, handler: Handler) -> None:
        self._handler = handler

    def __call__(
        self, method: str, target: str, headers: dict[str, str], peer: str
    ) -> bytes | Awaitable[bytes]:
        handler = self._handler or self._meanwhile
        if handler is None:
            return NOT_READY
        return handler(method, target, headers, peer)


class HttpProtocol(Connection):
    __slots__ = (
        "_body_bytes",
        "_handler",
        "_header_bytes",
        "_headers",
        "_in_message",
        "_owner",
        "_parser",
        "_peer",
        "_pending",
        "_since",
        "_transport",
        "_url",
        "_write_paused",
    )

    def __init__(self, handler: Handler, owner: HttpListener) -> None:
        self._handler = handler
        self._owner = owner
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body_bytes = 0
        self._pending: deque[tuple[asyncio.Future[bytes], bool]] = deque()
        # A new connection is there to send a request: the header timeout runs from accept.
        self._in_message = True
        self._since = owner.now
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's implement asyncio.Transport
        # without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
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
        self._owner.forget(self)
        # The parser calls back into this protocol: a cycle, which only the garbage collector
        # would free, and never for a connection open when the instance froze what it keeps
        # (server/long_lived.py). Nothing is fed to it after the connection is lost.
        del self._parser

    def pause_writing(self) -> None:
        # The client is not reading its answers: read no more requests until it does, so
        # that the answers waiting for it stay bounded.
        self._write_paused = True
        self._since = self._owner.now
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._since = self._owner.now
        self._resume_reading()

    def expire(self, now: float, limits: HttpLimits) -> None:
        """A request that has not fully arrived within the header timeout gets 408; a
        connection with nothing in flight, or whose client stopped reading, closes after the
        idle timeout."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        waited = now - self._since
        if self._write_paused:
            if waited > limits.idle_timeout_seconds:
                transport.abort()  # its unread answers would never drain
        elif self._pending:
            return  # the handler is at work; its own I/O has its own timeouts
        elif self._in_message:
            if waited > limits.header_timeout_seconds:
                self._close_with(REQUEST_TIMEOUT)
        elif waited > limits.idle_timeout_seconds:
            # Between requests nothing is lost by closing: an HTTP/1.1 client (Envoy's pool
            # among them) sees the FIN and opens a new connection for its next request.
            transport.close()

    def close_when_idle(self) -> None:
        if self._transport is None:
            return
        self._transport.pause_reading()
        if not self._pending:
            self._transport.close()
            return
        future, _ = self._pending.pop()
        self._pending.append((future, False))  # the last answer closes the connection

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, reply: bytes) -> None:
        """Answer a request that cannot be served, after the answers still being worked on
        for the requests before it, and close."""
        if not self._pending:
            self._close_with(reply)
            return
        self._pending.append((_done(reply), False))
        if self._transport is not None:
            self._transport.pause_reading()

    def _close_with(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._since = self._owner.now
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # _count_header_bytes written out: this runs for every header of every request
        # (on_url, once a request, calls it).
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(HEADERS_TOO_LARGE)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _Refused(BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            # Refused before the handler runs: httptools would raise HttpParserUpgrade once
            # this callback returns, and the bytes after the head are not HTTP/1.1.
            raise _Refused(UPGRADE_NOT_SUPPORTED)
        self._in_message = False
        self._since = self._owner.now
        method = self._parser.get_method().decode("latin-1")
        reply = self._handler(method, self._url.decode("latin-1"), self._headers, self._peer)
        keep_alive = self._parser.should_keep_alive()
        if isinstance(reply, bytes) and not self._pending:
            # _send written out: the answer of nearly every request leaves here.
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(reply)
                if not keep_alive:
                    transport.close()
            return
        if isinstance(reply, bytes):
            future = _done(reply)
        elif isinstance(reply, asyncio.Future):
            # Taken as it is (a fused decision waiting for a grant answers with a future):
            # asyncio.ensure_future would make the same choice in two Python calls.
            future = reply
        else:
            future = asyncio.ensure_future(reply)
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
                self._close_with(INTERNAL_ERROR)
                return
            self._send(future.result(), keep_alive)
        self._since = self._owner.now  # idle, if nothing else is pending, from now
        self._resume_reading()

    def _resume_reading(self) -> None:
        transport = self._transport
        if (
            transport is not None
            and not transport.is_closing()
            and len(self._pending) < MAX_PENDING
            and not self._write_paused
            and not (self._pending and not self._pending[-1][1])  # the last answer will close
        ):
            transport.resume_reading()

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


class BodyHttpProtocol(HttpProtocol):
    """A connection that keeps each request's body for a BodyHandler. A subclass, so that
    the ext_authz fast path's connections neither copy nor test for bodies."""

    __slots__ = ("_body", "_body_handler")

    def __init__(self, handler: BodyHandler, owner: HttpListener) -> None:
        super().__init__(self._with_body, owner)
        self._body_handler = handler
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._body = []

    def on_body(self, body: bytes) -> None:
        super().on_body(body)  # the cap
        self._body.append(body)

    def _with_body(
        self, method: str, target: str, headers: dict[str, str], peer: str
    ) -> bytes | Awaitable[bytes]:
        return self._body_handler(method, target, headers, peer, b"".join(self._body))


@dataclass(slots=True)
class _Refused(Exception):
    response: bytes


async def serve_http(
    handler: Handler,
    sock: socket.socket,
    tls: ssl.SSLContext | None = None,
    limits: HttpLimits | None = None,
) -> HttpListener:
    """Serve on the listening `sock`; over TLS when `tls` is given (the handshake happens
    before the handler sees anything, so a client refused by mutual TLS never reaches it)."""
    return _listen(partial(HttpProtocol, handler), sock, tls, limits)


async def serve_http_reading_bodies(
    handler: BodyHandler,
    sock: socket.socket,
    tls: ssl.SSLContext | None = None,
    limits: HttpLimits | None = None,
) -> HttpListener:
    """serve_http for a handler that reads request bodies."""
    return _listen(partial(BodyHttpProtocol, handler), sock, tls, limits)


def _listen(
    protocol: Callable[[HttpListener], Connection],
    sock: socket.socket,
    tls: ssl.SSLContext | None,
    limits: HttpLimits | None,
) -> HttpListener:
    listener = HttpListener(sock, protocol, limits or HttpLimits(), tls, TOO_MANY_CONNECTIONS)
    listener.start()
    return listener
