"""Streaming calls on meshtoll's h2c server (transport/h2_server.py, h2_streams.py), over real
sockets: grpcio's own client for what a good client sees, raw frames (tests/test_h2_server.py's
client) for flow control seen frame by frame and for hostile peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from meshtoll.transport.h2_server import (
    CONNECTION_WINDOW,
    MAX_MESSAGE_BYTES,
    PREFACE,
    STREAM_WINDOW,
    CallContext,
    ErrorCode,
    Frame,
    Setting,
    StatusCode,
    StreamHandler,
    serve_grpc,
)
from meshtoll.transport.h2_streams import RequestMessages
from meshtoll.transport.http_listener import HttpLimits, HttpListener, listening_socket
from tests.test_h2_server import (
    TIMEOUT,
    RawClient,
    close_raw_clients,
    frame,
    message,
    settings,
    wait_for_connections,
)
from tests.waiting import eventually_async

ECHO = "/test.Streams/Echo"
SUM = "/test.Streams/Sum"
HELD = "/test.Streams/Held"  # takes one message, then waits at the gate before the rest
FOREVER = "/test.Streams/Forever"  # takes messages and never answers
FAILING = "/test.Streams/Fail"
THREE = "/test.Streams/Three"  # yields three answers of 80 bytes, counting its steps
UNARY = "/test.Streams/Unary"
CLEANING = "/test.Streams/Cleaning"  # yields one answer, noting its clean-up
SELF_CANCELLING = "/test.Streams/SelfCancelling"  # raises CancelledError at its first message
BROKEN = "/test.Streams/Broken"  # raises when called, before it is an iterator


@dataclass
class Handlers:
    """The test's stream handlers, and what they saw."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[RequestMessages] = field(default_factory=list)
    steps: int = 0

    async def echo(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        async for request in requests:
            if request.startswith(b"big:"):
                yield b"x" * int(request[4:])
            elif request.startswith(b"abort:"):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, request[6:].decode())
            else:
                yield request

    async def sum(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        total = 0
        async for request in requests:
            total += len(request)
        yield str(total).encode()

    async def held_back(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        assert isinstance(requests, RequestMessages)
        self.held.append(requests)
        total = len(await anext(requests))
        await self.gate.wait()
        async for request in requests:
            total += len(request)
        yield str(total).encode()

    async def forever(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        self.started.set()
        try:
            async for _ in requests:
                pass
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b""  # never reached: makes this an async generator

    async def fail(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            raise RuntimeError("a bug")
        yield b""

    async def cleaning(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        try:
            yield b"an answer"
            yield b"another"
        finally:
            self.cancelled.set()

    async def self_cancelling(
        self, requests: AsyncIterator[bytes], context: CallContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            raise asyncio.CancelledError  # a cancel of its own (a task it awaited was cancelled)
        yield b""

    def broken(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        raise RuntimeError("a bug before the first answer")

    async def three(self, requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        for _ in range(3):
            self.steps += 1
            yield b"a" * 80


@dataclass
class Server:
    port: int
    listener: HttpListener
    handlers: Handlers


async def start(limits: HttpLimits | None = None, grace: float = 1.0) -> Server:
    handlers = Handlers()
    streams: dict[str, StreamHandler] = {
        ECHO: handlers.echo,
        SUM: handlers.sum,
        HELD: handlers.held_back,
        FOREVER: handlers.forever,
        FAILING: handlers.fail,
        THREE: handlers.three,
        CLEANING: handlers.cleaning,
        SELF_CANCELLING: handlers.self_cancelling,
        BROKEN: handlers.broken,
    }
    sock = listening_socket("127.0.0.1", 0)
    unary = {UNARY: lambda request, context: request}
    if limits is None:
        listener = serve_grpc(unary, sock, streams=streams, stream_grace_seconds=grace)
    else:
        listener = serve_grpc(unary, sock, limits, streams=streams, stream_grace_seconds=grace)
    return Server(sock.getsockname()[1], listener, handlers)


async def ends_with(client: RawClient, code: ErrorCode, server: Server) -> None:
    """The connection ends with GOAWAY(code), and the server still answers a good client."""
    assert (await client.goaway())[1] == code
    await client.closed()
    async with channel(server.port) as open_channel:
        assert await open_channel.unary_unary(UNARY)(b"still here", timeout=TIMEOUT) == b"still here"
    await wait_for_connections(server.listener, 0)


async def stop(running: Server) -> None:
    await close_raw_clients()
    running.listener.close()
    await running.listener.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    running = await start()
    yield running
    await stop(running)


@pytest.fixture(autouse=True)
async def raw_clients_closed() -> AsyncIterator[None]:
    yield
    await close_raw_clients()


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def messages(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


# A good client (grpcio's)


async def test_a_bidirectional_stream_answers_each_message_in_order(server: Server) -> None:
    async with channel(server.port) as open_channel:
        call = open_channel.stream_stream(ECHO)(timeout=TIMEOUT)
        for n in range(20):
            await call.write(b"message %d" % n)
            assert await call.read() == b"message %d" % n  # answered before the next is sent
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_client_stream_is_answered_once_when_it_ends(server: Server) -> None:
    async with channel(server.port) as open_channel:
        total = await open_channel.stream_unary(SUM)(
            messages(*(b"x" * n for n in range(100))), timeout=TIMEOUT
        )
    assert total == str(sum(range(100))).encode()


async def test_many_streams_at_once_on_one_connection_keep_their_own_messages(server: Server) -> None:
    async with channel(server.port) as open_channel:

        async def one(n: int) -> list[bytes]:
            sent = [b"%d:%d" % (n, i) for i in range(10)]
            return [
                answer async for answer in open_channel.stream_stream(ECHO)(messages(*sent), timeout=TIMEOUT)
            ]

        answers = await asyncio.gather(*(one(n) for n in range(100)))
    assert answers == [[b"%d:%d" % (n, i) for i in range(10)] for n in range(100)]
    assert server.listener.connections == 1


async def test_large_messages_cross_many_frames_both_ways(server: Server) -> None:
    big = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # past the frame size and half the windows
    async with channel(server.port) as open_channel:
        answers = [
            answer
            async for answer in open_channel.stream_stream(ECHO)(
                messages(big, b"big:%d" % MAX_MESSAGE_BYTES, big), timeout=TIMEOUT
            )
        ]
    assert answers == [big, b"x" * MAX_MESSAGE_BYTES, big]


async def test_a_message_larger_than_the_window_left_is_not_stalled_by_one_taken_before(
    server: Server,
) -> None:
    """The handler took 1 MiB; the next message is 64 times the stream's window, so the
    handler waiting for it gets the window back as the message arrives, not only as taken."""
    first, second = b"a" * (1024 * 1024), b"b" * MAX_MESSAGE_BYTES
    async with channel(server.port) as open_channel:
        total = await open_channel.stream_unary(SUM)(messages(first, second), timeout=TIMEOUT)
    assert total == str(len(first) + len(second)).encode()


async def test_more_request_bytes_than_the_windows_hold_flow_through_a_slow_handler(server: Server) -> None:
    """The handler takes one message and waits: the peer sends what the stream's window lets it
    and then waits too; the server holds no more than that window (a 64 KiB one: each 1 MiB
    message gets its window back as it arrives only while the handler waits for it). Once the
    handler goes on, every message arrives."""
    chunk = b"y" * (1024 * 1024)
    sent = 0

    async def requests() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(12):  # many times the stream's window
            sent += 1
            yield chunk

    async with channel(server.port) as open_channel:
        answer = asyncio.ensure_future(open_channel.stream_unary(HELD)(requests(), timeout=TIMEOUT))
        try:
            held = (
                await eventually_async(lambda: server.handlers.held, timeout=TIMEOUT, message="the call")
            )[0]
            await eventually_async(
                lambda: held.held,
                lambda held_bytes: held_bytes >= STREAM_WINDOW // 4,
                timeout=TIMEOUT,
                message="the peer to fill the stream's window",
            )
            assert held.held <= STREAM_WINDOW
            assert not answer.done()
            server.handlers.gate.set()
            assert await answer == str(12 * len(chunk)).encode()
            assert sent == 12
        finally:
            answer.cancel()


async def test_a_clients_cancel_reaches_the_handler(server: Server) -> None:
    async with channel(server.port) as open_channel:
        call = open_channel.stream_stream(FOREVER)(timeout=TIMEOUT)
        await call.write(b"one")
        await asyncio.wait_for(server.handlers.started.wait(), TIMEOUT)
        call.cancel()
        await asyncio.wait_for(server.handlers.cancelled.wait(), TIMEOUT)


async def test_a_handler_held_at_its_answer_is_closed_when_its_stream_is_reset(server: Server) -> None:
    """The peer gives no window and resets the stream: the handler, held at its yield while
    its answer waits, runs its clean-up at once."""
    client = await RawClient.open(server.port, PREFACE + settings((Setting.INITIAL_WINDOW_SIZE, 0)))
    client.send(open_stream(client, 1, CLEANING, end=True))
    await client.until(Frame.HEADERS, 1)  # the answer's HEADERS; its message waits for a window
    client.send(frame(Frame.RST_STREAM, 0, 1, int(ErrorCode.CANCEL).to_bytes(4, "big")))
    await asyncio.wait_for(server.handlers.cancelled.wait(), TIMEOUT)


async def test_a_failing_handler_is_internal_and_the_other_streams_go_on(server: Server) -> None:
    async with channel(server.port) as open_channel:
        echo = open_channel.stream_stream(ECHO)(timeout=TIMEOUT)
        await echo.write(b"before")
        assert await echo.read() == b"before"
        failing = open_channel.stream_stream(FAILING)(messages(b"boom"), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await failing.read()
        assert (failed.value.code(), failed.value.details()) == (
            grpc.StatusCode.INTERNAL,
            "the handler failed",
        )
        await echo.write(b"after")
        assert await echo.read() == b"after"
        await echo.done_writing()
        assert await echo.code() == grpc.StatusCode.OK


async def test_an_abort_ends_the_stream_with_its_status_after_the_answers_sent(server: Server) -> None:
    async with channel(server.port) as open_channel:
        call = open_channel.stream_stream(ECHO)(messages(b"first", b"abort:no such tenant"), timeout=TIMEOUT)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "no such tenant",
    )


async def test_unary_calls_are_served_beside_the_streams(server: Server) -> None:
    async with channel(server.port) as open_channel:
        assert await open_channel.unary_unary(UNARY)(b"plain", timeout=TIMEOUT) == b"plain"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await open_channel.stream_stream("/test.Streams/Nothing")(messages(b"x"), timeout=TIMEOUT).read()
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_shutting_down_ends_a_stream_that_never_ends_after_the_grace() -> None:
    """An access-log stream never ends by itself: the listener's close gives it the grace,
    then ends it UNAVAILABLE (the client may go to another instance) and cancels its handler,
    and the listener closes without cutting its connection."""
    running = await start(grace=0.1)
    async with channel(running.port) as open_channel:
        call = open_channel.stream_stream(FOREVER)(timeout=TIMEOUT)
        await call.write(b"one")
        await asyncio.wait_for(running.handlers.started.wait(), TIMEOUT)
        running.listener.close()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert (failed.value.code(), failed.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down",
        )
        await asyncio.wait_for(running.handlers.cancelled.wait(), TIMEOUT)
    await asyncio.wait_for(running.listener.wait_closed(), TIMEOUT)
    assert running.listener.connections == 0


async def test_a_stream_past_its_grpc_timeout_ends_deadline_exceeded_and_is_cancelled() -> None:
    running = await start(HttpLimits(header_timeout_seconds=0.4, idle_timeout_seconds=60))
    try:
        async with channel(running.port) as open_channel:
            call = open_channel.stream_stream(FOREVER)(timeout=0.2)
            await call.write(b"one")
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(running.handlers.cancelled.wait(), TIMEOUT)
    finally:
        await stop(running)


async def test_an_open_stream_keeps_its_connection_past_the_idle_timeout() -> None:
    running = await start(HttpLimits(header_timeout_seconds=0.4, idle_timeout_seconds=0.2))
    try:
        async with channel(running.port) as open_channel:
            call = open_channel.stream_stream(ECHO)(timeout=TIMEOUT)
            await call.write(b"one")
            assert await call.read() == b"one"
            opened_at = running.listener.now
            await eventually_async(
                lambda: running.listener.now,
                lambda now: now > opened_at + 1.0,  # five idle timeouts on the listener's own clock
                timeout=TIMEOUT,
                message="sweeps past the idle timeout",
            )
            await call.write(b"two")
            assert await call.read() == b"two"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await stop(running)


# Frame by frame


def open_stream(client: RawClient, stream: int, path: str, end: bool = False) -> bytes:
    return frame(Frame.HEADERS, 0x4 | (0x1 if end else 0), stream, client.headers_block(path))


async def test_answers_wait_for_the_peers_window_and_so_does_the_handler(server: Server) -> None:
    """A peer's window of 100 bytes takes the first answer (85 bytes with its prefix) and 15 of
    the second; the handler is not stepped for its third until the second has gone."""
    client = await RawClient.open(server.port, PREFACE + settings((Setting.INITIAL_WINDOW_SIZE, 100)))
    client.send(open_stream(client, 1, THREE, end=True))
    received = 0
    while received < 100:
        received += len((await client.until(Frame.DATA, 1)).payload)
    assert received == 100
    assert server.handlers.steps == 2  # the third answer is not asked for
    client.send(frame(Frame.WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")))
    rest, trailers = await client.answer(1, prefix=0)
    assert (len(rest), trailers) == (3 * 85 - 100, {"grpc-status": "0"})
    assert server.handlers.steps == 3


async def test_a_message_over_the_size_limit_ends_its_stream_and_no_more(server: Server) -> None:
    client = await RawClient.open(server.port)
    over = b"\x00" + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big")
    client.send(open_stream(client, 1, ECHO), frame(Frame.DATA, 0, 1, over + b"x" * 100))
    _, trailers = await client.answer(1)
    assert trailers["grpc-status"] == str(int(StatusCode.RESOURCE_EXHAUSTED))
    reset = await client.until(Frame.RST_STREAM, 1)
    assert int.from_bytes(reset.payload, "big") == ErrorCode.NO_ERROR
    client.send(frame(Frame.DATA, 0, 1, b"x" * 1000))  # in flight before the reset: dropped
    client.send(open_stream(client, 3, ECHO), frame(Frame.DATA, 0x1, 3, message(b"next")))
    assert await client.answer(3) == (b"next", {"grpc-status": "0"})


async def test_a_length_prefix_that_lies_is_an_internal_error(server: Server) -> None:
    """The prefix says 100 bytes; the stream ends after 10."""
    client = await RawClient.open(server.port)
    lying = b"\x00" + (100).to_bytes(4, "big") + b"0123456789"
    client.send(open_stream(client, 1, SUM), frame(Frame.DATA, 0x1, 1, lying))
    _, trailers = await client.answer(1)
    assert (trailers["grpc-status"], trailers["grpc-message"]) == (
        str(int(StatusCode.INTERNAL)),
        "the request stream ended inside a message",
    )


async def test_a_compressed_message_is_an_internal_error(server: Server) -> None:
    client = await RawClient.open(server.port)
    client.send(
        open_stream(client, 1, ECHO), frame(Frame.DATA, 0, 1, b"\x01" + (3).to_bytes(4, "big") + b"abc")
    )
    _, trailers = await client.answer(1)
    assert trailers["grpc-message"] == "compressed messages are not accepted"


async def test_data_after_the_requests_end_ends_the_connection(server: Server) -> None:
    client = await RawClient.open(server.port)
    client.send(open_stream(client, 1, FOREVER), frame(Frame.DATA, 0x1, 1, message(b"last")))
    await asyncio.wait_for(server.handlers.started.wait(), TIMEOUT)
    client.send(frame(Frame.DATA, 0x1, 1, message(b"after the end")))
    await ends_with(client, ErrorCode.STREAM_CLOSED, server)


async def test_a_message_that_does_not_arrive_whole_in_time_ends_its_stream() -> None:
    running = await start(HttpLimits(header_timeout_seconds=0.2, idle_timeout_seconds=60))
    try:
        client = await RawClient.open(running.port)
        client.send(open_stream(client, 1, FOREVER), frame(Frame.DATA, 0, 1, message(b"never whole")[:8]))
        _, trailers = await client.answer(1)
        assert trailers["grpc-message"] == "a request message did not arrive whole in time"
        await asyncio.wait_for(running.handlers.cancelled.wait(), TIMEOUT)
    finally:
        await stop(running)


async def test_a_held_stream_cannot_send_past_its_own_window(server: Server) -> None:
    """The handler took nothing: a message larger than the stream's window gets none of it back,
    and a peer that sends past the window ends the connection."""
    client = await RawClient.open(server.port)
    chunk = b"z" * 16_384
    client.send(open_stream(client, 1, HELD))
    client.send(frame(Frame.DATA, 0, 1, b"\x00" + (MAX_MESSAGE_BYTES - 10).to_bytes(4, "big")))
    client.send(*(frame(Frame.DATA, 0, 1, chunk) for _ in range(STREAM_WINDOW // len(chunk) + 1)))
    await ends_with(client, ErrorCode.FLOW_CONTROL_ERROR, server)


async def test_unary_requests_together_cannot_send_past_the_connections_window(server: Server) -> None:
    """Each unary request's part within half its stream's window (none of it returned), but
    what all of them hold is the connection's window: a peer that sends past it ends the
    connection."""
    client = await RawClient.open(server.port)
    half = STREAM_WINDOW // 2
    part = b"\x00" + (MAX_MESSAGE_BYTES - 10).to_bytes(4, "big") + b"u" * (half - 5)
    for stream in range(1, 2 * (CONNECTION_WINDOW // half + 1), 2):
        client.send(
            open_stream(client, stream, UNARY),
            frame(Frame.DATA, 0, stream, part[:16_384]),
            frame(Frame.DATA, 0, stream, part[16_384:]),
        )
    await ends_with(client, ErrorCode.FLOW_CONTROL_ERROR, server)


# Flow control beside a slow stream (review of round 9)


async def test_a_stream_whose_handler_is_slow_never_stalls_a_unary_call_beside_it(server: Server) -> None:
    """As Envoy's Check shares a connection with its access-log stream when the meter's store is
    slow: the held stream's untaken messages (4 MiB, all of a message's bytes) hold back its
    own window only, and a unary call on the same connection is answered at once."""
    chunk = b"y" * 1_048_566
    async with channel(server.port) as open_channel:
        held = asyncio.ensure_future(
            open_channel.stream_unary(HELD)(messages(b"a", chunk, chunk, chunk, chunk), timeout=TIMEOUT)
        )
        try:
            requests = (
                await eventually_async(lambda: server.handlers.held, timeout=TIMEOUT, message="the call")
            )[0]
            await eventually_async(
                lambda: requests.held,
                lambda held_bytes: held_bytes >= STREAM_WINDOW // 4,
                timeout=TIMEOUT,
                message="the held stream to fill its window",
            )
            answer = await open_channel.unary_unary(UNARY)(b"c" * 2000, timeout=2)
            assert answer == b"c" * 2000
            assert not held.done()
            server.handlers.gate.set()
            assert await held == str(1 + 4 * len(chunk)).encode()
        finally:
            held.cancel()
    assert server.listener.connections <= 1


async def test_slow_streams_together_holding_more_than_the_connections_window_stall_no_call(
    server: Server,
) -> None:
    """Enough held streams, each with its window full of a message its handler has not taken,
    to hold more than the connection's window: the connection's window came back as their
    bytes arrived, so a unary call on the same connection is still answered."""
    streams = CONNECTION_WINDOW // STREAM_WINDOW + 2
    waiting = b"w" * STREAM_WINDOW  # larger than the window: it stays in part, its window full
    async with channel(server.port) as open_channel:
        held = [
            asyncio.ensure_future(open_channel.stream_unary(HELD)(messages(b"a", waiting), timeout=TIMEOUT))
            for _ in range(streams)
        ]
        try:
            await eventually_async(
                lambda: sum(requests.held for requests in server.handlers.held),
                lambda held_bytes: held_bytes > CONNECTION_WINDOW,
                timeout=TIMEOUT,
                message="the held streams to hold more than the connection's window",
            )
            assert await open_channel.unary_unary(UNARY)(b"c" * 2000, timeout=TIMEOUT) == b"c" * 2000
            server.handlers.gate.set()
            assert await asyncio.gather(*held) == [str(1 + len(waiting)).encode()] * streams
        finally:
            for call in held:
                call.cancel()


async def test_two_of_the_largest_messages_at_once_on_one_connection_both_complete(server: Server) -> None:
    """Two unary requests and two streaming ones of the largest size, all at once on one
    connection: none waits for another to be taken."""
    big = b"q" * MAX_MESSAGE_BYTES
    async with channel(server.port) as open_channel:
        unary = open_channel.unary_unary(UNARY)
        summed = open_channel.stream_unary(SUM)
        answers = await asyncio.gather(
            unary(big, timeout=TIMEOUT),
            unary(big, timeout=TIMEOUT),
            summed(messages(big), timeout=TIMEOUT),
            summed(messages(big), timeout=TIMEOUT),
        )
    assert [len(answer) for answer in answers[:2]] == [MAX_MESSAGE_BYTES] * 2
    assert list(answers[2:]) == [str(MAX_MESSAGE_BYTES).encode()] * 2


# Handlers that end their calls in ways of their own


async def test_a_handler_that_cancels_itself_ends_its_call_cancelled(server: Server) -> None:
    async with channel(server.port) as open_channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await open_channel.stream_unary(SELF_CANCELLING)(messages(b"one"), timeout=5)
        assert failed.value.code() == grpc.StatusCode.CANCELLED
        assert await open_channel.unary_unary(UNARY)(b"after", timeout=TIMEOUT) == b"after"


async def test_a_handler_that_raises_when_called_ends_its_call_internal(server: Server) -> None:
    async with channel(server.port) as open_channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await open_channel.stream_unary(BROKEN)(messages(b"one"), timeout=5)
        assert (failed.value.code(), failed.value.details()) == (
            grpc.StatusCode.INTERNAL,
            "the handler failed",
        )
