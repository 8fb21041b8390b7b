"""Servicers written on messages (grpc.aio's shape: an async iterator of requests in, a
message or an async iterator of messages out) served as the h2c server's streaming
handlers (transport/h2_server.py), which take and give bytes: each request parsed by its
type's FromString, each answer serialised.

Bytes that do not parse end the call INTERNAL, as grpcio answers a request its own
deserialiser refuses; the servicer sees the failure as its iterator raising, so its clean-up
(a span ended, a stream's state) runs as it would for any other end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError

from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode, StreamHandler

Request = TypeVar("Request")


class _Serialisable(Protocol):
    def SerializeToString(self) -> bytes: ...


async def parsed(
    requests: AsyncIterator[bytes], parse: Callable[[bytes], Request], name: str
) -> AsyncIterator[Request]:
    """The request messages of a stream, each parsed as it is taken."""
    async for request in requests:
        try:
            message = parse(request)
        except DecodeError:
            raise CallAborted(StatusCode.INTERNAL, f"a request message is not a {name}") from None
        yield message


def client_streaming(
    method: Callable[[AsyncIterator[Request], CallContext], Awaitable[_Serialisable]],
    parse: Callable[[bytes], Request],
    name: str,
) -> StreamHandler:
    """A stream of requests, one answer once they end (the access-log service's)."""

    async def handler(requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        answer = await method(parsed(requests, parse, name), context)
        yield answer.SerializeToString()

    return handler


def bidirectional(
    method: Callable[[AsyncIterator[Request], CallContext], AsyncIterator[_Serialisable]],
    parse: Callable[[bytes], Request],
    name: str,
) -> StreamHandler:
    """Requests and answers both streamed (ext_proc's)."""

    async def handler(requests: AsyncIterator[bytes], context: CallContext) -> AsyncIterator[bytes]:
        async for answer in method(parsed(requests, parse, name), context):
            yield answer.SerializeToString()

    return handler
