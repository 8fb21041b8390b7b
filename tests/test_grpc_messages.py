"""Servicers on messages served as the h2c server's streaming handlers: each request parsed,
each answer serialised, and bytes that are not the request's type end the call INTERNAL
with the servicer's own clean-up run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest as Request
from grpc_health.v1.health_pb2 import HealthCheckResponse as Answer

from meshtoll.transport.grpc_messages import bidirectional, client_streaming
from meshtoll.transport.h2_server import CallContext, serve_grpc
from meshtoll.transport.http_listener import listening_socket

ECHO = "/test.Messages/Echo"
COUNT = "/test.Messages/Count"


class Servicer:
    def __init__(self) -> None:
        self.ended = 0

    async def echo(self, requests: AsyncIterator[Request], context: CallContext) -> AsyncIterator[Answer]:
        try:
            async for request in requests:
                yield Answer(status=len(request.service))
        finally:
            self.ended += 1  # as ext_proc's span is ended, whatever ends the stream

    async def count(self, requests: AsyncIterator[Request], context: CallContext) -> Answer:
        answer: Answer = Answer(status=len([request async for request in requests]))
        return answer


@pytest.fixture
async def port() -> AsyncIterator[tuple[int, Servicer]]:
    servicer = Servicer()
    sock = listening_socket("127.0.0.1", 0)
    streams = {
        ECHO: bidirectional(servicer.echo, Request.FromString, "HealthCheckRequest"),
        COUNT: client_streaming(servicer.count, Request.FromString, "HealthCheckRequest"),
    }
    async with serve_grpc({}, sock, streams=streams):
        yield sock.getsockname()[1], servicer


async def test_each_request_is_parsed_and_each_answer_serialised(port: tuple[int, Servicer]) -> None:
    number, servicer = port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{number}") as channel:
        echo = channel.stream_stream(ECHO)
        sent = [Request(service=name).SerializeToString() for name in ("a", "bcd", "")]
        answers = [Answer.FromString(answer).status async for answer in echo(iter(sent))]
        assert answers == [1, 3, 0]
        count = channel.stream_unary(COUNT)
        assert Answer.FromString(await count(iter(sent))).status == 3
    assert servicer.ended == 1


async def test_bytes_that_are_not_the_request_type_end_the_call_internal(port: tuple[int, Servicer]) -> None:
    number, servicer = port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{number}") as channel:
        for method in (ECHO, COUNT):
            call = channel.stream_stream(method)(
                iter([Request(service="a").SerializeToString(), b"\x0a\xff"])
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in call:
                    pass
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert "not a HealthCheckRequest" in (failed.value.details() or "")
    assert servicer.ended == 1
