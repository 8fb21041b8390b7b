"""The streaming calls of the h2c server (h2_server.py): a stream's request messages as the
handler's async iterator, cut from the DATA the connection hands over.

A streaming handler gets the request messages' bytes in order, the iterator ending at the
peer's END_STREAM, and yields its answers' bytes; the connection sends each as the peer's
windows allow and steps the handler again only once it is sent (a queue of one), so a peer
that does not read holds one answer per stream. The other way, the bytes a stream may hold
are its receive window: this side returns a message's bytes to the stream's window only once
the handler has taken the message (or, for a message larger than the window, as it arrives
while the handler waits for it: h2_server.H2Connection._give_back), so a slow handler slows
its own stream instead of buffering; the connection's window comes back as bytes arrive, so
the peer's other calls on the connection go on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

# gRPC's default largest message (grpcio's and grpc-go's receive limit).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The 5 bytes before each message: a compressed flag and the length.
PREFIX_BYTES = 5


class StreamFailed(Exception):
    """The peer's bytes on a stream are not a sequence of whole gRPC messages: the call
    ends with this status (gRPC's number) and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


_INTERNAL = 13
_RESOURCE_EXHAUSTED = 8


class RequestMessages:
    """One stream's request messages, fed by the connection, taken by the handler.

    `taken(size)` is called with a message's wire size (prefix included) as the handler
    takes it, `hungry()` as the handler finds nothing to take: the connection returns
    window to the peer then, and only then."""

    __slots__ = ("_buffer", "_ended", "_hungry", "_messages", "_taken", "_waiter", "held", "partial_since")

    def __init__(self, taken: Callable[[int], None], hungry: Callable[[], None]) -> None:
        self._taken = taken
        self._hungry = hungry
        self._buffer = bytearray()  # the start of a message not yet whole
        self._messages: deque[bytes] = deque()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self.held = 0  # the bytes of messages (and of a part of one) not yet taken
        # The coarse clock when the message now in part began to arrive (None: none is):
        # a message begun must arrive whole within the connection's frame timeout.
        self.partial_since: float | None = None

    @property
    def waiting(self) -> bool:
        """The handler waits for a message that has not arrived whole."""
        return self._waiter is not None

    def feed(self, data: bytes, now: float) -> int:
        """Take DATA's bytes; the number of messages they completed. Raises StreamFailed
        for a compressed message (none is accepted: this side advertises no compression)
        or one over MAX_MESSAGE_BYTES."""
        buffer = self._buffer
        if not buffer and len(data) >= PREFIX_BYTES and data[0] == 0:
            # The common case: whole messages, each in its own frame.
            length = int.from_bytes(data[1:PREFIX_BYTES], "big")
            if length == len(data) - PREFIX_BYTES:
                self.held += len(data)
                self._messages.append(data[PREFIX_BYTES:])
                self._wake()
                return 1
        buffer += data
        self.held += len(data)
        completed = 0
        while len(buffer) >= PREFIX_BYTES:
            flag = buffer[0]
            length = int.from_bytes(buffer[1:PREFIX_BYTES], "big")
            if flag != 0:
                raise StreamFailed(
                    _INTERNAL,
                    "compressed messages are not accepted" if flag == 1 else "not a gRPC message prefix",
                )
            if length > MAX_MESSAGE_BYTES:
                raise StreamFailed(
                    _RESOURCE_EXHAUSTED, f"a message of {length} bytes, over the {MAX_MESSAGE_BYTES} accepted"
                )
            if len(buffer) < PREFIX_BYTES + length:
                break
            self._messages.append(bytes(buffer[PREFIX_BYTES : PREFIX_BYTES + length]))
            del buffer[: PREFIX_BYTES + length]
            completed += 1
        if completed:
            self._wake()
        if not buffer:
            self.partial_since = None
        elif completed or self.partial_since is None:
            self.partial_since = now
        return completed

    def end(self) -> None:
        """The peer's END_STREAM: no more messages. Raises StreamFailed when it ends one in part."""
        self._ended = True
        self._wake()
        if self._buffer:
            raise StreamFailed(_INTERNAL, "the request stream ended inside a message")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self) -> RequestMessages:
        return self

    async def __anext__(self) -> bytes:
        messages = self._messages
        while not messages:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            self._hungry()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = messages.popleft()
        size = len(message) + PREFIX_BYTES
        self.held -= size
        self._taken(size)
        return message
