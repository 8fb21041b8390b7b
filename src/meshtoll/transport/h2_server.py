"""A lean HTTP/2 server for gRPC calls (h2c with prior knowledge, or over TLS with
ALPN `h2`), on the event loop's own transports, as http_server.py is for HTTP/1.1.

grpc.aio's per-call machinery (its Cython layer, the poller thread handing completions to
the event loop, a call object and a Task per call) cost about 226,000 instructions a call
before the handler ran (bench/README.md, round 4). Here the frames are parsed from the
bytes received, a method's handler is called with the request message's bytes and
returns the answer's bytes, or an awaitable of them (then, and only then, it runs in a
Task), and the answer goes out as HEADERS + DATA + trailing HEADERS in one write, its
header blocks built once (static-table and literal-without-indexing encodings, which need
no encoder state).

What a peer may rely on (RFC 9113): the connection preface, SETTINGS acknowledged both
ways, PING answered, flow control both ways (this side's windows replenished as the
handlers take what arrived, a large request's stream window as it arrives, so a peer's
sends never stall; answers wait for the peer's windows), CONTINUATION, padding, PRIORITY
(ignored), RST_STREAM (the call cancelled), GOAWAY on shutdown with the calls in flight
answered (streams opened after it dropped), grpc-timeout (a call past it answered
DEADLINE_EXCEEDED and its task cancelled). What a peer may hold is bounded per connection:
frame size, concurrent streams, a header block's size, the bytes buffered for requests (the
windows, in one buffer per message), work not paid for by calls (control frames, settings,
CONTINUATIONs, header bytes), the time a frame or header block may take to arrive, a request
to arrive whole and answers to find a window; past a bound the connection ends with GOAWAY
and the error code RFC 9113 names (a request that does not arrive whole is reset alone).
The timeouts and deadlines are judged by the listener's sweep, never by a timer per call.

Streaming calls (serve_grpc's `streams`; h2_streams.py): the handler takes the request
messages from an async iterator and yields its answers, each sent once the peer's windows let
it. The same bounds hold, but for the ones a long-lived stream cannot keep: a request stream
need not arrive whole (each message must, within the frame timeout, or the call ends
INTERNAL), and a connection with a stream open is never idle. A stream's receive window is
returned to the peer only as its handler takes messages (and for a message still arriving
while the handler waits for it, within AHEAD_BUDGET), but the connection's as the bytes
arrive: a handler that never takes holds back its own stream alone, never the peer's other
calls on the connection (Envoy's Check beside a slow access-log stream). What a connection
holds is bounded all the same: CONNECTION_WINDOW for unary requests, and for the streams
MAX_CONCURRENT_STREAMS x STREAM_WINDOW + AHEAD_BUDGET (1000 x 64 KiB + 8 MiB).
grpc-timeout is honoured; on shutdown the open streams get STREAM_STOP_GRACE_SECONDS, then
end UNAVAILABLE and are cancelled, so an access-log stream that never ends holds no shutdown.

No compression (not advertised, so a client does not compress); gRPC status and message go
in the trailers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from enum import IntEnum
from typing import Any, cast
from urllib.parse import quote

from meshtoll.transport.h2_streams import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from meshtoll.transport.h2_streams import PREFIX_BYTES, RequestMessages, StreamFailed
from meshtoll.transport.hpack_decoder import HeaderBlockDecoder, HeaderBlockError, Headers
from meshtoll.transport.http_listener import Connection, HttpLimits, HttpListener

log = logging.getLogger("meshtoll.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Frame(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


# The frame types as plain ints for the per-frame dispatch: on Python 3.11 an IntEnum
# member's lookup (Frame.DATA) costs about 1,000 instructions more than a module global's,
# and a call's frames went through some fifteen of them.
_DATA = int(Frame.DATA)
_HEADERS = int(Frame.HEADERS)
_PRIORITY = int(Frame.PRIORITY)
_RST_STREAM = int(Frame.RST_STREAM)
_SETTINGS = int(Frame.SETTINGS)
_PUSH_PROMISE = int(Frame.PUSH_PROMISE)
_PING = int(Frame.PING)
_GOAWAY = int(Frame.GOAWAY)
_WINDOW_UPDATE = int(Frame.WINDOW_UPDATE)
_CONTINUATION = int(Frame.CONTINUATION)


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Setting(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384  # also the largest this side accepts (it advertises no other)
MAX_FRAME_SIZE_SETTING = 2**24 - 1
# A stream's initial receive window: what one stream may hold beyond what this side returned.
# Small, so that the messages a streaming handler has not taken hold back only their own
# stream (and every stream's share stays small: MAX_CONCURRENT_STREAMS of them); a larger
# request gets its stream's window back as it arrives (a unary one, up to a whole message;
# a streaming one's message in part, from AHEAD_BUDGET), so a 4 MiB message still completes.
STREAM_WINDOW = 64 * 1024
# The largest request a unary stream's window grows to: one whole message of the largest size.
UNARY_REQUEST_BYTES = MAX_MESSAGE_BYTES + PREFIX_BYTES
# The connection's receive window. Unary requests hold it until they are whole (the call is
# made), so two of the largest can arrive at once; streaming calls' bytes return it as they
# arrive (their stream windows bound them), so a stream whose handler is slow never holds it.
CONNECTION_WINDOW = 2 * UNARY_REQUEST_BYTES + STREAM_WINDOW
# The stream window a connection may return for streaming messages still arriving, before
# their handlers take them: two messages of the largest size at once.
AHEAD_BUDGET = 2 * UNARY_REQUEST_BYTES
# When windows are returned: once half of them is used (module globals, for the per-frame path).
_HALF_STREAM_WINDOW = STREAM_WINDOW // 2
_HALF_CONNECTION_WINDOW = CONNECTION_WINDOW // 2
MAX_CONCURRENT_STREAMS = 1000
# A header list's decoded bytes (RFC 7541's count): grpc core's hard limit. Envoy's calls to
# a rate limit service carry a few hundred.
MAX_HEADER_LIST_BYTES = 16 * 1024
# A header block's encoded bytes (HEADERS + CONTINUATIONs) before it must have ended.
MAX_HEADER_BLOCK_BYTES = 16 * 1024
# Frames that cost this side work but carry no call (PING, SETTINGS entries, PRIORITY,
# RST_STREAM, WINDOW_UPDATE, CONTINUATION, GOAWAY, empty DATA, unknown types, refused
# streams, frames on streams this side reset or will not serve): a connection may send
# this many before any call, and each call answered buys a few more, up to this many again.
CONTROL_FRAME_ALLOWANCE = 1000
CONTROL_FRAMES_PER_CALL = 10
# Header blocks are paid for by their size as well: decoding costs about a microsecond a
# byte (Huffman), so every this many bytes of a block count as one control frame. A call's
# block from Envoy is a few dozen bytes once its encoder's table holds the fields.
HEADER_BYTES_PER_CONTROL_FRAME = 128
# A new initial window that may take a stream's window past 2^31-1 walks the open streams
# (only then): every this many walked count as one control frame.
STREAMS_WALKED_PER_CONTROL_FRAME = 100
# Streams this side reset whose late frames are ignored, not an error (RFC 9113 5.4.2).
_RESET_REMEMBERED = 64
# Calls whose method and deadline are remembered by their header list (the decoder hands
# back the same tuple for a block it remembers), and the largest block remembered so.
_HEADS_REMEMBERED = 64
_HEAD_BLOCK_BYTES = 512
# grpc-timeout's units (gRPC over HTTP/2: "H" / "M" / "S" / "m" / "u" / "n"), in seconds.
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
MALFORMED_TIMEOUT = -1.0
# How long the open streams may go on once shutting down: unary calls finish within Envoy's
# 0.25-0.5 s timeouts, and an access-log stream never ends by itself, so a longer grace would
# only delay every shutdown by all of it.
STREAM_STOP_GRACE_SECONDS = 1.0

SERVER_SETTINGS: tuple[tuple[Setting, int], ...] = (
    (Setting.ENABLE_PUSH, 0),
    (Setting.MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
    (Setting.INITIAL_WINDOW_SIZE, STREAM_WINDOW),
    (Setting.MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_BYTES),
)


class StatusCode(IntEnum):
    """gRPC status codes (the ones this server or its handlers send)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class CallAborted(Exception):
    """Raised by CallContext.abort: the call ends with this status and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class CallContext:
    """What a handler may ask of its call: the request's metadata, and abort, named as
    grpc.aio's ServicerContext names them; `abort` takes a StatusCode, a grpc.StatusCode
    or a number."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def invocation_metadata(self) -> Headers:
        return tuple(field for field in self._headers if not field[0].startswith(":"))

    async def abort(self, code: Any, details: str = "") -> None:
        # grpc.StatusCode's value is (number, name).
        number = code.value[0] if isinstance(getattr(code, "value", None), tuple) else int(code)
        raise CallAborted(number, details)


UnaryHandler = Callable[[bytes, CallContext], bytes | Awaitable[bytes]]
"""(request message bytes, the call) -> the answer message's bytes, or an awaitable of
them. Raising CallAborted (CallContext.abort) ends the call with that status."""

StreamHandler = Callable[[AsyncIterator[bytes], CallContext], AsyncIterator[bytes]]
"""(the request messages' bytes, the call) -> the answers' bytes, for client, server and
bidirectional streaming alike. The requests end at the peer's END_STREAM; the call ends OK
when the handler's iterator ends, with the status of a CallAborted it raises, INTERNAL (and
logged) for any other exception. The peer's RST_STREAM, the connection's loss or the end of
the shutdown's grace cancels it."""


def _frame_head(length: int, kind: int, flags: int, stream: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's prefixed integer (RFC 7541 5.1), `first` holding the prefix's pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_field(name: str, value: str) -> bytes:
    """A header field as a literal without indexing, with a new name, no Huffman coding:
    an encoding that needs no encoder state, so blocks of it can be built once."""
    raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    return (
        _integer(0, 4, 0x00)
        + _integer(len(raw_name), 7, 0)
        + raw_name
        + _integer(len(raw_value), 7, 0)
        + raw_value
    )


# :status 200 (static index 8) and content-type (static index 31) with its value.
RESPONSE_HEADERS = bytes((0x88,)) + _integer(31, 4, 0x00) + _integer(16, 7, 0) + b"application/grpc"


def trailers(code: int, message: str = "") -> bytes:
    block = literal_field("grpc-status", str(code))
    if message:
        # gRPC's percent-encoding of grpc-message: printable ASCII but '%' as is.
        block += literal_field("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"))
    return block


_OK_TRAILERS = trailers(StatusCode.OK)
_HEADERS_HEAD = _frame_head(len(RESPONSE_HEADERS), Frame.HEADERS, END_HEADERS, 0)[:5]
_TRAILERS_HEAD = _frame_head(len(_OK_TRAILERS), Frame.HEADERS, END_HEADERS | END_STREAM, 0)[:5]
_DATA_KIND = bytes((Frame.DATA, 0))


# The time a frame or a header block may take to arrive once begun, and how long a
# connection without calls stays open: longer than Envoy's own idle timeout of an upstream
# connection (an hour by default), so that Envoy is the one to close it.
GRPC_LIMITS = HttpLimits(header_timeout_seconds=10.0, idle_timeout_seconds=7200.0)


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def grpc_timeout(value: str) -> float:
    """A grpc-timeout value in seconds: up to 8 digits and a unit (gRPC over HTTP/2);
    MALFORMED_TIMEOUT for anything else."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not (digits.isascii() and digits.isdigit()):
        return MALFORMED_TIMEOUT
    return int(digits) * unit


# A call's header list, its method's path and its timeout in seconds (None: no deadline).
_Head = tuple[Headers, str, float | None]


def _head_of(headers: Headers) -> _Head:
    path = ""
    timeout: float | None = None
    for name, value in headers:
        if name == ":path":
            path = value
        elif name == "grpc-timeout":
            timeout = grpc_timeout(value)
    return headers, path, timeout


_NO_DEADLINE = float("inf")


class _StreamCall:
    """A streaming call's state beside its _Stream's."""

    __slots__ = ("ahead", "closed", "drained", "headers_sent", "requests", "taken")

    def __init__(self, requests: RequestMessages) -> None:
        self.requests = requests
        self.headers_sent = False
        self.closed = False  # answered (or reset): nothing more is sent or credited
        # Request bytes the handler took whose stream window is not yet returned to the peer.
        self.taken = 0
        # Bytes held, not yet taken, whose stream window was returned ahead (a message in
        # part while the handler waits for it), from the connection's AHEAD_BUDGET.
        self.ahead = 0
        # Set while the handler's last answer waits for the peer's windows.
        self.drained: asyncio.Future[None] | None = None

    def sent(self) -> None:
        drained = self.drained
        if drained is not None:
            self.drained = None
            if not drained.done():
                drained.set_result(None)


class _Stream:
    __slots__ = (
        "call",
        "credit",
        "data",
        "deadline",
        "ended",
        "head",
        "opened",
        "received",
        "task",
        "window_used",
    )

    def __init__(self, head: _Head, opened: float) -> None:
        self.head = head
        self.data: bytes | bytearray = b""
        # A unary request's bytes, held against the connection window until the call is made.
        self.received = 0
        # The bytes received on the stream whose stream window is not yet returned.
        self.window_used = 0
        # The peer's WINDOW_UPDATEs for the stream less what was sent on it: its window is
        # the peer's initial window plus this, so a new initial window applies at once.
        self.credit = 0
        self.opened = opened  # the coarse clock when its HEADERS arrived
        self.ended = False  # the request arrived whole (END_STREAM) and the call was made
        self.deadline = _NO_DEADLINE  # when an awaited call is answered DEADLINE_EXCEEDED
        self.task: asyncio.Future[Any] | None = None
        self.call: _StreamCall | None = None  # a streaming call's own state


class H2Connection(Connection):
    """One client connection: frames in, calls dispatched, answers out."""

    __slots__ = (
        "_ahead",
        "_allowance",
        "_block",
        "_block_end_stream",
        "_block_size",
        "_block_stream",
        "_blocked_since",
        "_buffer",
        "_clock",
        "_closing",
        "_consumed",
        "_credit_bound",
        "_decoder",
        "_goaway_last",
        "_goaway_sent",
        "_grace",
        "_handlers",
        "_heads",
        "_last_stream",
        "_loop",
        "_outgoing",
        "_owner",
        "_peer_frame_size",
        "_peer_window",
        "_preface",
        "_queued",
        "_reset",
        "_send_window",
        "_since",
        "_starved",
        "_stream_grace",
        "_stream_handlers",
        "_streams",
        "_transport",
        "_window_left",
        "_write_paused",
    )

    def __init__(
        self,
        handlers: Mapping[str, UnaryHandler],
        owner: HttpListener,
        stream_handlers: Mapping[str, StreamHandler] | None = None,
        stream_grace: float = STREAM_STOP_GRACE_SECONDS,
    ) -> None:
        self._handlers = handlers
        self._stream_handlers = stream_handlers or {}
        self._stream_grace = stream_grace
        self._grace: asyncio.TimerHandle | None = None
        self._owner = owner
        # The loop's own clock, for deadlines: the listener's coarse one lags by more than a
        # sweep when the loop itself lags, which would answer a call before its deadline.
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self._transport: asyncio.Transport | None = None
        # Frames written in this turn of the event loop, sent in one write at its end.
        self._outgoing: list[bytes] = []
        self._buffer = b""
        self._preface = True  # the client's preface is still to come
        self._decoder = HeaderBlockDecoder(max_list_size=MAX_HEADER_LIST_BYTES)
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._reset: list[int] = []
        self._block: list[bytes] | None = None  # a header block awaiting its CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._block_size = 0
        self._heads: dict[int, _Head] = {}  # by the header list's id; the entry holds the list
        self._consumed = 0  # request bytes taken since the connection window was last replenished
        self._ahead = 0  # the streaming calls' _StreamCall.ahead, together: within AHEAD_BUDGET
        # Streams whose handler waits for a message the budget had no window for, in turn.
        self._starved: dict[int, _Stream] = {}
        self._window_left = CONNECTION_WINDOW  # the request bytes the peer may still send
        self._send_window = DEFAULT_WINDOW
        self._peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        # At least every open stream's credit (_Stream.credit): a new initial window is
        # checked against it, and the streams walked only when it says one may pass 2^31-1.
        self._credit_bound = 0
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._queued: dict[int, bytes] = {}  # answers waiting for the peer's windows, by stream
        self._allowance = CONTROL_FRAME_ALLOWANCE
        self._goaway_sent = False
        self._goaway_last = MAX_WINDOW  # the last stream id a GOAWAY sent promised to serve
        self._closing = False
        self._write_paused = False
        self._since = owner.now
        self._blocked_since = owner.now  # when answers waiting for windows last moved

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        settings = b"".join(
            setting.to_bytes(2, "big") + value.to_bytes(4, "big") for setting, value in SERVER_SETTINGS
        )
        opening = _frame_head(len(settings), Frame.SETTINGS, 0, 0) + settings
        grow = CONNECTION_WINDOW - DEFAULT_WINDOW
        opening += _frame_head(4, Frame.WINDOW_UPDATE, 0, 0) + grow.to_bytes(4, "big")
        self._transport.write(opening)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after GOAWAY for an error: read and dropped until the peer closes
        # The frame timeout runs from the first byte of a frame (or header block) that has
        # not fully arrived: bytes that trickle in do not restart it, a frame completed does
        # (the next one began in this read), but not a header block's CONTINUATION.
        in_block = self._block is not None
        was_waiting = bool(self._buffer) or in_block or self._preface
        buffer = self._buffer + data if self._buffer else data
        try:
            if self._preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(buffer):
                        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._buffer = buffer
                    return
                if not buffer.startswith(PREFACE):
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                buffer = buffer[len(PREFACE) :]
                self._preface = False
                in_block = was_waiting = False  # what is left began in this read
            position = 0
            end = len(buffer)
            while end - position >= 9 and not self._closing:
                length = int.from_bytes(buffer[position : position + 3], "big")
                if length > DEFAULT_FRAME_SIZE:
                    raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - position - 9 < length:
                    break
                kind = buffer[position + 3]
                flags = buffer[position + 4]
                stream = int.from_bytes(buffer[position + 5 : position + 9], "big") & 0x7FFFFFFF
                payload = buffer[position + 9 : position + 9 + length]
                position += 9 + length
                self._frame(kind, flags, stream, payload)
            self._buffer = buffer[position:]
        except _ConnectionError as error:
            self._fail(error.code, error.reason)
            return
        if self._block is not None:
            if not in_block:
                self._since = self._owner.now
        elif not (was_waiting and self._buffer and not position):
            self._since = self._owner.now

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._outgoing.clear()
        if self._grace is not None:
            self._grace.cancel()
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self._owner.forget(self)

    def pause_writing(self) -> None:
        # The peer is not reading what it is sent: read nothing more from it until it does,
        # so that what waits for it stays bounded.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._since = self._owner.now
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    # Connection (the listener's bounds)

    def expire(self, now: float, limits: HttpLimits) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        waited = now - self._since
        if self._closing or self._write_paused:
            if waited > limits.header_timeout_seconds:
                transport.abort()  # the peer neither closes nor reads what it was sent
        elif self._buffer or self._block is not None or self._preface:
            if waited > limits.header_timeout_seconds:
                self._fail(ErrorCode.PROTOCOL_ERROR, "a frame or header block did not arrive in time")
        elif self._streams:
            self._expire_calls(now, limits.header_timeout_seconds)
        elif waited > limits.idle_timeout_seconds:
            self._goaway(ErrorCode.NO_ERROR, "idle")
            self._end()

    def _expire_calls(self, now: float, frame_timeout: float) -> None:
        """The sweep's look at the streams (at most MAX_CONCURRENT_STREAMS, once a second):
        answers the peer gives no window to and requests that do not arrive whole (on the
        listener's coarse clock, as the other timeouts), calls past their grpc-timeout (on
        the loop's, so within a sweep after the deadline, never before)."""
        if self._queued and now - self._blocked_since > frame_timeout:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "answers waited for the peer's windows too long")
            return
        late = now - frame_timeout
        clock = self._clock()
        for stream_id, stream in tuple(self._streams.items()):
            call = stream.call
            if call is not None:
                if stream.deadline <= clock:
                    self._end_call(
                        stream_id, stream, StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed"
                    )
                elif (begun := call.requests.partial_since) is not None and begun < late:
                    # As a unary request must arrive whole: what a partial message holds is freed.
                    self._end_call(
                        stream_id,
                        stream,
                        StatusCode.INTERNAL,
                        "a request message did not arrive whole in time",
                    )
                continue
            if stream_id in self._queued:
                continue
            if stream.ended:
                if stream.deadline <= clock:
                    # The answer first: the task's own end then finds the stream closed.
                    self._answer_status(stream_id, StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
                    if stream.task is not None:
                        stream.task.cancel()
            elif stream.opened < late:
                # A request that did not arrive whole in time: reset, and what it held freed.
                del self._streams[stream_id]
                self._consumed += stream.received
                self._reset_stream(stream_id, ErrorCode.CANCEL)
                self._finished()

    def close_when_idle(self) -> None:
        """Shutting down: GOAWAY now (no new calls), close once the calls in flight are answered."""
        if self._transport is None or self._transport.is_closing():
            return
        self._goaway(ErrorCode.NO_ERROR, "shutting down")
        if not self._streams:
            self._end()
        elif self._grace is None and any(stream.call is not None for stream in self._streams.values()):
            self._grace = self._loop.call_later(self._stream_grace, self._grace_over)

    def _grace_over(self) -> None:
        """The shutdown's grace for the open streams has passed: they end UNAVAILABLE (a client
        may try another instance) and their handlers are cancelled."""
        for stream_id, stream in tuple(self._streams.items()):
            if stream.call is not None:
                self._end_call(stream_id, stream, StatusCode.UNAVAILABLE, "the server is shutting down")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # Frames

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._block is not None and kind != _CONTINUATION:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "a header block interrupted by another frame")
        if kind == _DATA:
            self._data(flags, stream, payload)
        elif kind == _HEADERS:
            self._headers(flags, stream, payload)
        elif kind == _WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == _CONTINUATION:
            self._continuation(flags, stream, payload)
        elif kind == _SETTINGS:
            self._settings(flags, stream, payload)
        elif kind == _PING:
            self._control()
            if stream != 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING of other than 8 bytes")
            if not flags & ACK:
                self._write(_frame_head(8, Frame.PING, ACK, 0) + payload)
        elif kind == _RST_STREAM:
            self._rst_stream(stream, payload)
        elif kind == _PRIORITY:
            self._control()
            if stream == 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")
        elif kind == _GOAWAY:
            self._control()
            if stream != 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY of fewer than 8 bytes")
            # The peer opens no more streams; those it opened are still answered.
        elif kind == _PUSH_PROMISE:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self._control()  # an unknown type: ignored (RFC 9113 4.1), but not for free

    def _control(self, frames: int = 1) -> None:
        self._allowance -= frames
        if self._allowance < 0:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "too many frames without calls")

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding as long as the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        # The whole frame counts against the window, padding included; it is taken (and
        # the window replenished) once a handler has the message or the bytes are dropped.
        size = len(payload)
        self._window_left -= size
        if self._window_left < 0:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "DATA past the connection's window")
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            if stream is None and self._ignored(stream_id):
                self._consumed += size
                if not size:
                    self._control()
                return
            if stream_id > self._last_stream:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            raise _ConnectionError(ErrorCode.STREAM_CLOSED, f"DATA on stream {stream_id}, which is closed")
        data = self._unpad(flags, payload)
        stream.window_used += size
        if stream.window_used > STREAM_WINDOW:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream_id} sent past its window")
        call = stream.call
        if call is not None:
            self._stream_data(stream_id, stream, call, size, data, flags & END_STREAM)
            return
        stream.received += size
        if stream.window_used > _HALF_STREAM_WINDOW and not flags & END_STREAM:
            self._unary_window(stream_id, stream)
        if data:
            held = stream.data
            if not held:
                stream.data = data
            elif type(held) is bytearray:
                held += data
            else:
                # One buffer for a message in many frames: a list of a frame's bytes each
                # would hold ~40 bytes of objects for a DATA frame of one byte.
                stream.data = bytearray(held) + data
        elif not flags & END_STREAM:
            self._control()
        if flags & END_STREAM:
            self._call(stream_id, stream)

    def _unary_window(self, stream_id: int, stream: _Stream) -> None:
        """A unary request larger than half the stream's window: its window returned as it
        arrives, up to a whole message of the largest size (its bytes hold the connection's
        window meanwhile, which bounds what all of them hold)."""
        if stream.received < UNARY_REQUEST_BYTES:
            used, stream.window_used = stream.window_used, 0
            self._write(_frame_head(4, Frame.WINDOW_UPDATE, 0, stream_id) + used.to_bytes(4, "big"))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(fragment) < 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            fragment = fragment[5:]
        self._block_stream = stream_id
        self._block_end_stream = bool(flags & END_STREAM)
        self._block_size = len(fragment)
        if flags & END_HEADERS:
            self._header_block(fragment)
        else:
            self._block = [fragment]

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._block
        if block is None or stream_id != self._block_stream:
            raise _ConnectionError(
                ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a header block to continue"
            )
        self._control()  # a block needs none when it fits a frame, as Envoy's calls do
        block.append(payload)
        self._block_size += len(payload)
        if self._block_size > MAX_HEADER_BLOCK_BYTES:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_BLOCK_BYTES} bytes"
            )
        if flags & END_HEADERS:
            self._block = None
            self._header_block(b"".join(block))

    def _header_block(self, block: bytes) -> None:
        stream_id = self._block_stream
        if len(block) >= HEADER_BYTES_PER_CONTROL_FRAME:
            self._control(len(block) // HEADER_BYTES_PER_CONTROL_FRAME)
        try:
            headers = self._decoder.decode(block)  # always: the table must follow the peer's
        except HeaderBlockError as exc:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, str(exc)) from None
        if stream_id <= self._last_stream:
            stream = self._streams.get(stream_id)
            if stream is not None:
                if not stream.ended and self._block_end_stream:
                    # trailers end the request
                    if stream.call is not None:
                        self._requests_ended(stream_id, stream, stream.call)
                    else:
                        self._call(stream_id, stream)
                    return
            elif self._ignored(stream_id):
                self._control()
                return
            raise _ConnectionError(
                ErrorCode.STREAM_CLOSED, f"HEADERS on stream {stream_id}, which is not open"
            )
        if stream_id % 2 == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"a client stream of even id {stream_id}")
        self._last_stream = stream_id
        if self._goaway_sent:
            self._control()
            return  # after GOAWAY: not answered; the peer knows from its last stream id
        if len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._control()
            self._reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        head = self._heads.get(id(headers))
        if head is None or head[0] is not headers:
            head = _head_of(headers)
            if len(block) <= _HEAD_BLOCK_BYTES:
                if len(self._heads) >= _HEADS_REMEMBERED:
                    self._heads.clear()
                self._heads[id(headers)] = head  # the entry holds the list: its id stays its own
        stream = _Stream(head, self._owner.now)
        self._streams[stream_id] = stream
        streaming = self._stream_handlers.get(head[1]) if self._stream_handlers else None
        if streaming is not None:
            self._open_call(stream_id, stream, streaming)
        elif self._block_end_stream:
            self._call(stream_id, stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._control(1 + len(payload) // 6)  # each setting is work, and a frame holds 2,730
        if stream_id != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(
                    ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload"
                )
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        for offset in range(0, len(payload), 6):
            setting = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if setting == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                if value + self._credit_bound > MAX_WINDOW:
                    self._check_stream_windows(value)
                self._peer_window = value  # every stream's window follows (_Stream.credit)
            elif setting == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE_SETTING:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"a max frame size of {value}")
                self._peer_frame_size = value
            elif setting == Setting.ENABLE_PUSH and value > 1:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH of {value}")
            # HEADER_TABLE_SIZE bounds the peer's decoder, which this side's encoding (no
            # dynamic table) never touches; the others do not concern a server's answers.
        self._write(_frame_head(0, Frame.SETTINGS, ACK, 0))
        if self._queued:
            self._send_queued()

    def _check_stream_windows(self, initial: int) -> None:
        """RFC 9113 6.9.2: a new initial window that takes an open stream's window past
        2^31-1 is a connection error. The streams' credits are walked (and the bound made
        exact) only when the bound says one may pass, and the walk is paid for."""
        self._control(len(self._streams) // STREAMS_WALKED_PER_CONTROL_FRAME)
        self._credit_bound = max((stream.credit for stream in self._streams.values()), default=0)
        if initial + self._credit_bound > MAX_WINDOW:
            raise _ConnectionError(
                ErrorCode.FLOW_CONTROL_ERROR, "an initial window that takes a stream's window past 2^31-1"
            )

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        self._control()
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if increment == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "the connection window past 2^31-1")
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                if stream_id > self._last_stream:
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}"
                    )
                return  # a stream answered or reset meanwhile
            stream.credit += increment
            if self._peer_window + stream.credit > MAX_WINDOW:
                raise _ConnectionError(
                    ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream_id}'s window past 2^31-1"
                )
            if stream.credit > self._credit_bound:
                self._credit_bound = stream.credit
        if self._queued:
            self._send_queued()

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        self._control()
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
        if stream_id > self._last_stream:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self._streams.pop(stream_id, None)
        self._queued.pop(stream_id, None)
        if stream is None:
            return
        call = stream.call
        if call is None:
            self._consumed += stream.received
        else:
            call.closed = True
            self._release_ahead(call)
        if stream.task is not None:
            stream.task.cancel()  # the peer gave up on the call (Envoy's timeout, a client's cancel)
        self._finished()

    # Calls

    def _call(self, stream_id: int, stream: _Stream) -> None:
        stream.ended = True
        held = stream.data
        data = held if type(held) is bytes else bytes(held)
        stream.data = b""
        self._consumed += stream.received
        stream.received = 0  # counted: a reset while its answer is awaited must not count it again
        headers, path, timeout = stream.head
        handler = self._handlers.get(path)
        if handler is None:
            self._answer_status(stream_id, StatusCode.UNIMPLEMENTED, f"method {path!r} is not served here")
            return
        if timeout is not None and timeout <= 0:
            if timeout == MALFORMED_TIMEOUT:  # as grpc-go answers it
                self._answer_status(stream_id, StatusCode.INTERNAL, "malformed grpc-timeout")
            else:
                self._answer_status(stream_id, StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
            return
        if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
            message = (
                "compressed messages are not accepted"
                if data[:1] == b"\x01"
                else "the request is not one whole message"
            )
            self._answer_status(stream_id, StatusCode.INTERNAL, message)
            return
        try:
            answer = handler(data[5:], CallContext(headers))
        except CallAborted as aborted:
            self._answer_status(stream_id, aborted.code, aborted.message)
            return
        except Exception:
            log.exception("gRPC handler of %s failed", path)
            self._answer_status(stream_id, StatusCode.UNKNOWN, "the handler failed")
            return
        if isinstance(answer, bytes):
            self._answer(stream_id, answer)
            return
        task = asyncio.ensure_future(answer)
        stream.task = task
        if timeout is not None:
            # Judged by the connection's sweep (no timer per call).
            stream.deadline = self._clock() + timeout
        task.add_done_callback(lambda done: self._answered(stream_id, path, done))

    def _answered(self, stream_id: int, path: str, task: asyncio.Future[bytes]) -> None:
        if task.cancelled() or self._streams.get(stream_id) is None:
            return  # reset by the peer, or the connection is gone
        error = task.exception()
        if error is None:
            self._answer(stream_id, task.result())
        elif isinstance(error, CallAborted):
            self._answer_status(stream_id, error.code, error.message)
        else:
            log.error("gRPC handler of %s failed", path, exc_info=error)
            self._answer_status(stream_id, StatusCode.UNKNOWN, "the handler failed")

    def _answer(self, stream_id: int, message: bytes) -> None:
        stream = self._streams[stream_id]
        size = len(message) + 5
        sid = stream_id.to_bytes(4, "big")
        if (
            size <= self._send_window
            and size <= self._peer_window + stream.credit
            and size <= self._peer_frame_size
            and not self._queued
        ):
            self._send_window -= size
            self._write(
                b"".join(
                    (
                        _HEADERS_HEAD,
                        sid,
                        RESPONSE_HEADERS,
                        size.to_bytes(3, "big"),
                        _DATA_KIND,
                        sid,
                        b"\x00",
                        len(message).to_bytes(4, "big"),
                        message,
                        _TRAILERS_HEAD,
                        sid,
                        _OK_TRAILERS,
                    )
                )
            )
            self._close_stream(stream_id)
            return
        # The peer's windows or frame size do not let the whole answer go at once.
        self._write(_HEADERS_HEAD + sid + RESPONSE_HEADERS)
        if not self._queued:
            self._blocked_since = self._owner.now
        self._queued[stream_id] = b"\x00" + len(message).to_bytes(4, "big") + message
        self._send_queued()

    def _send_queued(self) -> None:
        for stream_id, pending in list(self._queued.items()):
            stream = self._streams[stream_id]
            while pending:
                size = min(
                    len(pending), self._send_window, self._peer_window + stream.credit, self._peer_frame_size
                )
                if size <= 0:
                    break
                self._write(_frame_head(size, Frame.DATA, 0, stream_id) + pending[:size])
                pending = pending[size:]
                self._send_window -= size
                stream.credit -= size
                self._blocked_since = self._owner.now
            if pending:
                self._queued[stream_id] = pending
                continue
            del self._queued[stream_id]
            if stream.call is not None:
                stream.call.sent()  # the handler's next step may go
                continue
            self._write(_TRAILERS_HEAD + stream_id.to_bytes(4, "big") + _OK_TRAILERS)
            self._close_stream(stream_id)

    def _answer_status(self, stream_id: int, code: int, message: str) -> None:
        """A trailers-only answer: the status, no message."""
        block = RESPONSE_HEADERS + trailers(code, message)
        self._write(_frame_head(len(block), Frame.HEADERS, END_HEADERS | END_STREAM, stream_id) + block)
        self._close_stream(stream_id)

    # Streaming calls

    def _open_call(self, stream_id: int, stream: _Stream, handler: StreamHandler) -> None:
        """A streaming call starts at its HEADERS: its handler runs in a Task from now on,
        taking the request messages as they arrive."""
        headers, path, timeout = stream.head
        call = _StreamCall(
            RequestMessages(
                lambda size: self._took(stream_id, stream, size), lambda: self._hungry(stream_id, stream)
            )
        )
        stream.call = call
        if self._block_end_stream:
            stream.ended = True
            call.requests.end()
        if timeout is not None and timeout <= 0:
            if timeout == MALFORMED_TIMEOUT:
                self._end_call(stream_id, stream, StatusCode.INTERNAL, "malformed grpc-timeout")
            else:
                self._end_call(stream_id, stream, StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
            return
        if timeout is not None:
            stream.deadline = self._clock() + timeout  # judged by the sweep, as a unary call's
        stream.task = self._loop.create_task(self._run_call(stream_id, stream, call, handler, headers, path))

    async def _run_call(
        self,
        stream_id: int,
        stream: _Stream,
        call: _StreamCall,
        handler: StreamHandler,
        headers: Headers,
        path: str,
    ) -> None:
        answers: AsyncIterator[bytes] | None = None
        try:
            answers = handler(call.requests, CallContext(headers))
            async for answer in answers:
                if not self._send_message(stream_id, stream, call, answer):
                    # A queue of one: the handler's next step waits for this answer to leave.
                    call.drained = self._loop.create_future()
                    try:
                        await call.drained
                    except asyncio.CancelledError:
                        # Cancelled here, the handler is held at its yield: closed now, so
                        # that its own clean-up (a span's end) runs at once, not at collection.
                        if isinstance(answers, AsyncGenerator):
                            await answers.aclose()
                        raise
        except CallAborted as aborted:
            self._end_call(stream_id, stream, aborted.code, aborted.message)
        except Exception:
            log.exception("gRPC stream handler of %s failed", path)
            self._end_call(stream_id, stream, StatusCode.INTERNAL, "the handler failed")
        else:
            self._end_call(stream_id, stream, StatusCode.OK, "")
        finally:
            # Still open here only when the handler raised CancelledError itself (a cancel by
            # this side closed the call first): ended CANCELLED, as grpc.aio answers it, so that
            # no stream stays open without its task.
            self._end_call(stream_id, stream, StatusCode.CANCELLED, "the handler was cancelled")

    def _stream_data(
        self, stream_id: int, stream: _Stream, call: _StreamCall, size: int, data: bytes, end: int
    ) -> None:
        # The connection's window back at once: a stream's own window bounds what it holds.
        self._consumed += size
        call.taken += size - len(data)  # padding: never held, its stream window returnable
        requests = call.requests
        try:
            if data:
                requests.feed(data, self._owner.now)
            elif not end:
                self._control()
            if end:
                stream.ended = True
                requests.end()
        except StreamFailed as failed:
            self._end_call(stream_id, stream, failed.code, failed.message)
            return
        if requests.waiting:
            self._give_back(stream_id, stream, call)
        if self._consumed and (
            self._consumed >= _HALF_CONNECTION_WINDOW or self._window_left < _HALF_CONNECTION_WINDOW
        ):
            self._replenish()

    def _requests_ended(self, stream_id: int, stream: _Stream, call: _StreamCall) -> None:
        stream.ended = True
        try:
            call.requests.end()
        except StreamFailed as failed:
            self._end_call(stream_id, stream, failed.code, failed.message)

    def _took(self, stream_id: int, stream: _Stream, size: int) -> None:
        """The handler took a request message of `size` bytes on the wire."""
        call = stream.call
        if call is None or call.closed:
            return  # its bytes were counted as the stream closed
        ahead = min(call.ahead, size)  # its window returned as it arrived
        call.taken += size - ahead
        if ahead:
            call.ahead -= ahead
            self._free_ahead(ahead)
        # A message taken buys control frames as a call does: a long-lived stream is many calls.
        self._allowance = min(CONTROL_FRAME_ALLOWANCE, self._allowance + CONTROL_FRAMES_PER_CALL)
        self._give_back(stream_id, stream, call)

    def _hungry(self, stream_id: int, stream: _Stream) -> None:
        call = stream.call
        if call is not None and not call.closed:
            self._give_back(stream_id, stream, call)

    def _give_back(self, stream_id: int, stream: _Stream, call: _StreamCall) -> None:
        """Return to the peer the stream window of the request bytes its handler took, once
        more than half of the window is used (a batch). A handler waiting for a message still
        arriving holds nothing else: that message's bytes get their window back too (from
        the connection's AHEAD_BUDGET, which bounds what all streams hold past their windows),
        so a message larger than the window completes; past the budget it waits its turn
        until others' are taken (or ends at the frame timeout)."""
        used = stream.window_used
        if used <= _HALF_STREAM_WINDOW:
            return
        back = call.taken
        if call.requests.waiting:
            ahead = used - back  # the message in part's bytes whose window is not returned
            if ahead > 0:
                if self._ahead + ahead <= AHEAD_BUDGET:
                    self._ahead += ahead
                    call.ahead += ahead
                    back = used
                else:
                    self._starved[stream_id] = stream
        if back:
            call.taken = 0
            stream.window_used = used - back
            self._write(_frame_head(4, Frame.WINDOW_UPDATE, 0, stream_id) + back.to_bytes(4, "big"))

    def _release_ahead(self, call: _StreamCall) -> None:
        ahead, call.ahead = call.ahead, 0
        if ahead:
            self._free_ahead(ahead)

    def _free_ahead(self, size: int) -> None:
        """AHEAD_BUDGET freed: the streams it was short for try again, in turn, until it is
        short again."""
        self._ahead -= size
        starved = self._starved
        while starved:
            stream_id = next(iter(starved))
            stream = starved.pop(stream_id)
            call = stream.call
            if call is None or call.closed or not call.requests.waiting:
                continue
            self._give_back(stream_id, stream, call)
            if stream_id in starved:
                break  # short again: it keeps its turn at the end

    def _send_message(self, stream_id: int, stream: _Stream, call: _StreamCall, message: bytes) -> bool:
        """Send one of a stream's answers, or as much of it as the peer's windows let: True
        when it is all sent."""
        if call.closed:
            return True  # the call ended meanwhile (reset, deadline): the answer goes nowhere
        sid = stream_id.to_bytes(4, "big")
        head = b"" if call.headers_sent else _HEADERS_HEAD + sid + RESPONSE_HEADERS
        call.headers_sent = True
        size = len(message) + PREFIX_BYTES
        if (
            size <= self._send_window
            and size <= self._peer_window + stream.credit
            and size <= self._peer_frame_size
            and not self._queued
        ):
            self._send_window -= size
            stream.credit -= size
            self._write(
                b"".join(
                    (
                        head,
                        size.to_bytes(3, "big"),
                        _DATA_KIND,
                        sid,
                        b"\x00",
                        len(message).to_bytes(4, "big"),
                        message,
                    )
                )
            )
            return True
        if head:
            self._write(head)
        if not self._queued:
            self._blocked_since = self._owner.now
        self._queued[stream_id] = b"\x00" + len(message).to_bytes(4, "big") + message
        self._send_queued()
        return stream_id not in self._queued

    def _end_call(self, stream_id: int, stream: _Stream, code: int, message: str) -> None:
        """End a streaming call with `code`: its trailers (trailers only when nothing was
        sent), a reset when the peer is still sending (RFC 9113 8.1: the rest of the
        request is not wanted), what it held counted as taken, and its handler cancelled."""
        call = stream.call
        if call is None or call.closed or self._streams.get(stream_id) is not stream:
            return
        call.closed = True
        self._queued.pop(stream_id, None)
        if call.headers_sent:
            block = _OK_TRAILERS if code == StatusCode.OK else trailers(code, message)
        else:
            block = RESPONSE_HEADERS + trailers(code, message)
        self._write(_frame_head(len(block), Frame.HEADERS, END_HEADERS | END_STREAM, stream_id) + block)
        if not stream.ended:
            self._reset_stream(stream_id, ErrorCode.NO_ERROR)
        self._release_ahead(call)
        task = stream.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._close_stream(stream_id)

    def _close_stream(self, stream_id: int) -> None:
        del self._streams[stream_id]
        self._allowance = min(CONTROL_FRAME_ALLOWANCE, self._allowance + CONTROL_FRAMES_PER_CALL)
        self._finished()

    def _finished(self) -> None:
        if self._consumed >= _HALF_CONNECTION_WINDOW:
            self._replenish()
        if self._goaway_sent and not self._streams:
            self._end()

    def _replenish(self) -> None:
        consumed, self._consumed = self._consumed, 0
        self._window_left += consumed
        self._write(_frame_head(4, Frame.WINDOW_UPDATE, 0, 0) + consumed.to_bytes(4, "big"))

    def _ignored(self, stream_id: int) -> bool:
        """A stream whose late frames are dropped: reset by this side, or opened after the
        GOAWAY this side sent (RFC 9113 6.8: not served, and no error)."""
        return stream_id in self._reset or stream_id > self._goaway_last

    def _reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        self._write(_frame_head(4, Frame.RST_STREAM, 0, stream_id) + int(code).to_bytes(4, "big"))
        self._reset.append(stream_id)
        if len(self._reset) > _RESET_REMEMBERED:
            del self._reset[0]

    # The connection's end

    def _goaway(self, code: ErrorCode, reason: str) -> None:
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self._goaway_last = self._last_stream
        debug = reason.encode()[:256]
        self._write(
            _frame_head(8 + len(debug), Frame.GOAWAY, 0, 0)
            + self._last_stream.to_bytes(4, "big")
            + int(code).to_bytes(4, "big")
            + debug
        )

    def _fail(self, code: ErrorCode, reason: str) -> None:
        """A connection error: GOAWAY with its code, and the connection closed."""
        log.info("closing an HTTP/2 connection: %s (%s)", reason, code.name)
        self._goaway(code, reason)
        self._buffer = b""
        self._block = None
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self._queued.clear()
        self._end()

    def _end(self) -> None:
        """Send nothing more: the end of the stream after what was written (GOAWAY last),
        and the connection closed once the peer closes its side (what it still sends is
        read and dropped, so that a close with unread bytes cannot reset the connection
        and lose the GOAWAY); a peer that never closes is cut after the frame timeout."""
        self._flush()  # what was written before the end goes first (GOAWAY last)
        self._closing = True
        self._since = self._owner.now
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the peer reset the connection before the loop saw it: it is gone
            transport.abort()

    def _write(self, data: bytes) -> None:
        """Queue `data` for the write at the end of this turn of the event loop: the answers
        one Redis reply completes (and the acknowledgements of one read) leave in a single
        send() rather than one each: a loopback send() was the largest single item of a
        call's profile in-process, its kernel work (the peer's receive) charged to this side."""
        if self._closing:
            return
        outgoing = self._outgoing
        if not outgoing:
            self._loop.call_soon(self._flush)
        outgoing.append(data)

    def _flush(self) -> None:
        outgoing = self._outgoing
        if not outgoing:
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))
        outgoing.clear()


# Over the listener's max_connections: a server preface and GOAWAY, so that a client knows
# no call was taken and may try another connection.
TOO_MANY_CONNECTIONS = (
    _frame_head(0, Frame.SETTINGS, 0, 0)
    + _frame_head(8, Frame.GOAWAY, 0, 0)
    + (0).to_bytes(4, "big")
    + int(ErrorCode.ENHANCE_YOUR_CALM).to_bytes(4, "big")
)


def serve_grpc(
    handlers: Mapping[str, UnaryHandler],
    sock: socket.socket,
    limits: HttpLimits = GRPC_LIMITS,
    *,
    streams: Mapping[str, StreamHandler] | None = None,
    stream_grace_seconds: float = STREAM_STOP_GRACE_SECONDS,
    tls: ssl.SSLContext | None = None,
) -> HttpListener:
    """Serve gRPC calls on the listening `sock`: unary ones by `handlers`, streaming ones by
    `streams`, each by method path ("/package.Service/Method"); any other path is answered
    UNIMPLEMENTED. `limits`: the header timeout bounds a frame's or header block's arrival
    (and a stream's message's, and a TLS handshake's); the idle timeout, a connection without
    calls or streams. `stream_grace_seconds`: how long open streams go on once the listener
    closes. `tls`: a context that offers ALPN `h2` (gRPC clients require it), None for h2c."""
    streaming = dict(streams or {})
    listener = HttpListener(
        sock,
        lambda owner: H2Connection(handlers, owner, streaming, stream_grace_seconds),
        limits,
        tls,
        TOO_MANY_CONNECTIONS,
    )
    listener.start()
    return listener
