"""The ext_proc service's byte handler (extproc/service.py `process_stream`) on the h2c server,
called by grpcio's client: the answer Envoy gets for a hooked request's headers, and a
message that is not a ProcessingRequest refused."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from meshtoll.extproc.service import ExternalProcessorServicer
from meshtoll.policy import load_policy_text
from meshtoll.transport.h2_server import serve_grpc
from meshtoll.transport.http_listener import listening_socket
from tests.test_h2_server import TIMEOUT

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
POLICY = f"""
plans: {{pro: {{}}}}
tenants:
  acme: {{plan: pro, api_keys: [{{id: app, sha256: {hashlib.sha256(b"k").hexdigest()}}}]}}
routes:
  - prefix: /v1/chat
    name: chat
    hooks: {{request_headers: {{set: {{x-tenant-id: "{{tenant}}"}}}}}}
"""


async def sent(*messages: bytes) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


def request_headers(fields: dict[str, str]) -> bytes:
    headers = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=name, raw_value=value.encode()) for name, value in fields.items()]
    )
    encoded: bytes = ext_proc_pb2.ProcessingRequest(
        request_headers=ext_proc_pb2.HttpHeaders(headers=headers)
    ).SerializeToString()
    return encoded


async def test_a_hooked_requests_headers_are_answered_and_garbage_is_refused() -> None:
    policy = load_policy_text(POLICY, "policy.yaml")
    sock = listening_socket("127.0.0.1", 0)
    listener = serve_grpc(
        {}, sock, streams={PROCESS: ExternalProcessorServicer(lambda: policy).process_stream}
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel:
            process = channel.stream_stream(PROCESS)
            hooked = request_headers({"x-meshtoll-tenant": "acme", "x-meshtoll-route": "chat"})
            answers = [answer async for answer in process(sent(hooked), timeout=TIMEOUT)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await process(sent(b"\xff not a message"), timeout=TIMEOUT).read()
    finally:
        listener.close()
        await listener.wait_closed()
    (answer,) = [ext_proc_pb2.ProcessingResponse.FromString(raw) for raw in answers]
    mutation = answer.request_headers.response.header_mutation
    assert [(option.header.key, option.header.raw_value) for option in mutation.set_headers] == [
        ("x-tenant-id", b"acme")
    ]
    assert list(mutation.remove_headers) == ["x-meshtoll-extproc"]
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a ProcessingRequest",
    )
