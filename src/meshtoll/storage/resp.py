"""A lean Redis client for the decision hot path: one connection, automatic pipelining.

Every command issued during one turn of the event loop goes out in a single write, and
hiredis (C) parses the replies, so concurrent decisions share syscalls and parsing costs a
few microseconds. redis-py's asyncio client spends about 100 µs of CPU per command on this
machine, more than the whole HTTP authz decision; this costs a fraction of that. Replies
come back in order, so a request that times out breaks the connection: it is closed, every
pending request fails, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import NamedTuple, cast

import hiredis

from meshtoll.errors import ConnectionLost, StorageRefused
from meshtoll.storage.urls import RedisTarget

Argument = bytes | str | int


def encode(arguments: Sequence[Argument]) -> bytes:
    """A RESP array of bulk strings. Built as text when it can be: one encode at the end is
    several times cheaper than formatting every argument as bytes."""
    texts = [
        argument if isinstance(argument, str) else str(argument)
        for argument in arguments
        if not isinstance(argument, bytes)
    ]
    if len(texts) == len(arguments) and all(text.isascii() for text in texts):
        body = "".join(f"${len(text)}\r\n{text}\r\n" for text in texts)
        return f"*{len(texts)}\r\n{body}".encode()
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        data = argument if isinstance(argument, bytes) else str(argument).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# Items framed once and remembered (BulkStrings), at most this many, none longer than this:
# a key may carry a client's header value (a descriptor's), up to Envoy's header limit.
FRAMES_KEPT = 4096
_LONGEST_FRAMED_KEPT = 256


class BulkStrings:
    """Items as RESP bulk strings (`$<bytes>\\r\\n<item>\\r\\n`), each framed once: a hot
    command's keys and numbers repeat (a window's counter, a limit, an expiry), and looking a
    frame up costs a fraction of formatting an int and its length. Text, to be encoded with
    the rest of its command in one step; a frame's length counts UTF-8 bytes."""

    __slots__ = ("_frames", "get")

    def __init__(self) -> None:
        self._frames: dict[str | int, str] = {}
        self.get = self._frames.get  # a frame, None when not remembered

    def __len__(self) -> int:
        return len(self._frames)

    def frame(self, item: str | int) -> str:
        """`item`'s frame, remembered when it is short (the caller's miss path)."""
        text = item if isinstance(item, str) else str(item)
        framed = f"${len(text.encode())}\r\n{text}\r\n"
        if len(text) <= _LONGEST_FRAMED_KEPT:
            if len(self._frames) >= FRAMES_KEPT:
                self._frames.clear()  # values that change (a time, an expiry) fill it slowly
            self._frames[item] = framed
        return framed


class ScriptErrors(NamedTuple):
    """What the connection does with an error reply to a script's call: `load`, the script's
    SCRIPT LOAD, is sent before the call goes again after NOSCRIPT (None: the call's second
    try); any other error reply fails the call with StorageRefused naming `what`."""

    what: str  # "the decision script"
    load: bytes | None


# What a pending request holds: the future its reply resolves (None: nobody waits for it),
# when it was sent, its command and, for a script's call, what to do with an error reply.
_Pending = tuple[asyncio.Future[object] | None, float, bytes, ScriptErrors | None]


class RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._pending: deque[_Pending] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's implement asyncio.Transport
        # without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # Where a reply lands it is settled: a script's error reply too, so that the caller
        # awaits this future alone, with no coroutine of the client's between.
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future, _, command, script = self._pending.popleft()
            if future is None or future.done():
                continue
            if script is not None and reply.__class__ is hiredis.ReplyError:
                self._script_failed(future, command, script, reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionLost(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def send(self, command: bytes, script: ScriptErrors | None = None) -> asyncio.Future[object]:
        """The future of `command`'s reply: a hiredis.ReplyError for an error reply, except
        to a script's call (`script`), which StorageRefused fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        if self.closed:
            future.set_exception(ConnectionLost("connection to Redis closed"))
            return future
        self._queue(loop, future, command, script)
        return future

    def _queue(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[object] | None,
        command: bytes,
        script: ScriptErrors | None,
    ) -> None:
        self._pending.append((future, loop.time(), command, script))
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)

    def _script_failed(
        self, future: asyncio.Future[object], command: bytes, script: ScriptErrors, reply: hiredis.ReplyError
    ) -> None:
        if script.load is not None and str(reply).startswith("NOSCRIPT"):
            # A restarted or flushed Redis forgot the script. NOSCRIPT means it did not run, so
            # the second try cannot count twice; the load's own reply is not awaited (a failed
            # load fails the second try). Replies come in order: both go after every pending one.
            loop = asyncio.get_running_loop()
            self._queue(loop, None, script.load, None)
            self._queue(loop, future, command, script._replace(load=None))
            return
        future.set_exception(StorageRefused(f"Redis refused {script.what}: {reply}"))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def oldest_wait(self, now: float) -> float:
        """How long the oldest unanswered request has been waiting."""
        return now - self._pending[0][1] if self._pending else 0.0

    def fail(self, error: Exception) -> None:
        self.closed = True
        while self._pending:
            future = self._pending.popleft()[0]
            if future is not None and not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()


class LeanRedis:
    """One pipelined connection to a standalone Redis, opened on first use."""

    def __init__(self, target: RedisTarget, *, timeout: float) -> None:
        """`target`: a standalone Redis, reached over TCP or its Unix socket."""
        self._target = target
        self._timeout = timeout
        self._setup = []
        if target.password is not None:
            username, password = target.username, target.password
            self._setup.append(encode(["AUTH", username, password] if username else ["AUTH", password]))
        if target.db:
            self._setup.append(encode(["SELECT", target.db]))
        self._tls = ssl.create_default_context() if target.tls else None
        self._protocol: RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def call(self, command: bytes, script: ScriptErrors | None = None) -> Awaitable[object]:
        """Send one encoded command; its reply (a hiredis.ReplyError for an error reply, but
        see RespProtocol.send for a script's call).

        Bounded by the timeout without a timer of its own: the watchdog fails a request left
        unanswered, and setting up a connection (waiting for another caller's set-up
        included) has its own bound. Not a coroutine: on a connection that is up, the reply's
        future itself, one frame less for every decision to resume."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return self._connect_then_call(command, script)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout / 4, self._watch)
        return protocol.send(command, script)

    async def _connect_then_call(self, command: bytes, script: ScriptErrors | None) -> object:
        await self._connect()
        return await self.call(command, script)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None:
            self._protocol.fail(ConnectionLost("client closed"))
            self._protocol = None

    def _watch(self) -> None:
        """One timer for all requests (a timer per request costs more than the request):
        every quarter timeout, fail the connection if its oldest request is overdue."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        self._watchdog = None
        if protocol is None or protocol.closed or not protocol.pending:
            return  # idle: the next call arms the watchdog again
        if protocol.oldest_wait(loop.time()) > self._timeout:
            # The reply may still come, out of step with the next request's: drop the connection.
            protocol.fail(TimeoutError(f"Redis did not answer within {self._timeout * 1000:.0f} ms"))
            return
        self._watchdog = loop.call_later(self._timeout / 4, self._watch)

    async def _connect(self) -> RespProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        # Around the lock as well: callers queued behind a set-up that times out must not
        # each start another and wait out a timeout of their own in turn.
        async with asyncio.timeout(self._timeout), self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            if self._target.unix_socket is not None:
                _, protocol = await loop.create_unix_connection(RespProtocol, self._target.unix_socket)
            else:
                host, port = self._target.nodes[0]
                _, protocol = await loop.create_connection(RespProtocol, host, port, ssl=self._tls)
            try:
                for command in self._setup:
                    reply = await protocol.send(command)
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionLost(f"Redis refused the connection set-up: {reply}")
            except BaseException as exc:  # the timeout's cancellation too: close, then raise
                protocol.fail(ConnectionLost(f"connection set-up failed: {exc!r}"))
                raise
            self._protocol = protocol
            return protocol
