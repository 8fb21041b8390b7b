"""The gRPC Check servicer: Envoy's protobufs in, the shared decision, protobufs out, on the
call's bytes as meshtoll serve's h2c server hands them over."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import (
    AllowAnswer,
    AuthorizationServicer,
    allowed_response,
    check_request_from_envoy,
    denied_response,
)
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import Allow, Deny
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.verdict import rate_limit_pairs
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode

KEY = "grpc-test-key"


def authorizer(tmp_path: Path) -> Authorizer:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(
        "plans: {pro: {}}\n"
        f"tenants: {{acme: {{plan: pro, api_keys: [{{id: ci, sha256: {digest}}}],"
        ' mtls: {spiffe_ids: ["spiffe://acme.test/bot"]}}}\n'
        "routes: [{prefix: /v1/, name: v1}]\n"
    )
    return Authorizer(PolicyHolder.from_file(path), JwksCache())


def servicer(tmp_path: Path) -> AuthorizationServicer:
    return AuthorizationServicer(authorizer(tmp_path))


def check_request(headers: dict[str, str], principal: str = "") -> external_auth_pb2.CheckRequest:
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.principal = principal
    http = attributes.request.http
    http.method, http.path = "GET", "/v1/items"
    http.headers.update({"x-request-id": "rid-7", **headers})
    return external_auth_pb2.CheckRequest(attributes=attributes)


def bytes_context() -> CallContext:
    return CallContext((("content-type", "application/grpc"),))


async def check_bytes(servicer: AuthorizationServicer, request: bytes) -> bytes:
    answer = servicer.check(request, bytes_context())
    return answer if isinstance(answer, bytes) else await answer


async def checked(
    servicer: AuthorizationServicer, request: external_auth_pb2.CheckRequest
) -> external_auth_pb2.CheckResponse:
    """The servicer's answer to `request`, as serve's port would send it, parsed."""
    return external_auth_pb2.CheckResponse.FromString(
        await check_bytes(servicer, request.SerializeToString())
    )


async def test_allow_sets_identity_headers_removes_spoofed_ones_and_emits_metadata(tmp_path: Path) -> None:
    request = check_request({"x-api-key": KEY, "x-meshtoll-shadow": "1"})
    answer = await checked(servicer(tmp_path), request)
    assert answer.status.code == 0
    headers = {option.header.key: option for option in answer.ok_response.headers}
    assert headers["x-meshtoll-tenant"].header.value == "acme"
    assert headers["x-meshtoll-route"].header.value == "v1"
    assert all(
        option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        for option in headers.values()
    )
    # The spoofed header, and the API key's own (hide credentials); a protobuf map (the
    # request's headers) keeps no order.
    assert sorted(answer.ok_response.headers_to_remove) == ["x-api-key", "x-meshtoll-shadow"]
    assert json_format.MessageToDict(answer.dynamic_metadata) == {
        "tenant": "acme",
        "plan": "pro",
        "consumer": "ci",
        "route": "v1",
    }


async def test_deny_carries_http_status_json_body_and_grpc_code(tmp_path: Path) -> None:
    answer = await checked(servicer(tmp_path), check_request({"x-api-key": "wrong"}))
    assert answer.status.code == 16  # UNAUTHENTICATED
    assert answer.denied_response.status.code == 401
    assert json.loads(answer.denied_response.body) == {
        "error": "invalid_api_key",
        "message": "the API key is not valid",
        "request_id": "rid-7",
    }


async def test_spiffe_principal_of_a_verified_peer_identifies_the_tenant(tmp_path: Path) -> None:
    answer = await checked(servicer(tmp_path), check_request({}, principal="spiffe://acme.test/bot"))
    assert answer.status.code == 0


async def test_check_answers_the_serialised_response_of_the_decision(tmp_path: Path) -> None:
    deciding = authorizer(tmp_path)
    served = AuthorizationServicer(deciding)
    for request in (
        check_request({"x-api-key": KEY, "x-meshtoll-shadow": "1"}),
        check_request({"x-api-key": "wrong"}),
        check_request({}, principal="spiffe://acme.test/bot"),
    ):
        # The same bytes to both: a protobuf map (the request's headers) keeps no order
        # across a serialisation, and the headers to remove follow it.
        sent = request.SerializeToString()
        verdict = deciding.check(
            check_request_from_envoy(external_auth_pb2.CheckRequest.FromString(sent).attributes)
        )
        if not isinstance(verdict, Allow | Deny):
            verdict = await verdict
        expected = (
            denied_response(verdict, "rid-7") if isinstance(verdict, Deny) else allowed_response(verdict)
        )
        # Compared as messages: the metadata Struct is a protobuf map, whose entries two
        # serialisations of equal messages may write in different orders.
        assert external_auth_pb2.CheckResponse.FromString(await check_bytes(served, sent)) == expected


ALLOW = Allow(
    tenant="acme",
    plan="pro",
    consumer="ci",
    route="v1",
    headers=(("x-meshtoll-tenant", "acme"), ("x-meshtoll-route", "v1")),
    remove_headers=("x-api-key",),
    metadata={"tenant": "acme", "plan": "pro"},
)


@pytest.mark.parametrize("query_params", [(), ("api_key",)])
def test_an_allow_with_ratelimit_values_is_the_message_with_its_headers_added(
    query_params: tuple[str, ...],
) -> None:
    allow = ALLOW._replace(remove_query_params=query_params)
    cached = AllowAnswer(allowed_response(allow))
    for state in ((100, 7, 30), (100, 6, 29)):
        expected = allowed_response(allow)
        expected.ok_response.response_headers_to_add.extend(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, value=value),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for name, value in rate_limit_pairs(state)
        )
        # As messages, not bytes: the metadata Struct's map entries keep no order across
        # serialisations (this compared bytes and failed about one run in fifteen).
        assert (
            external_auth_pb2.CheckResponse.FromString(cached.encode(allow._replace(rate_limit=state)))
            == expected
        )


def test_the_cached_allow_answer_never_carries_one_requests_ratelimit_values_into_another() -> None:
    cached = AllowAnswer(allowed_response(ALLOW))
    plain = cached.encode(ALLOW)
    first = external_auth_pb2.CheckResponse.FromString(cached.encode(ALLOW._replace(rate_limit=(100, 7, 30))))
    second = external_auth_pb2.CheckResponse.FromString(
        cached.encode(ALLOW._replace(rate_limit=(100, 6, 29)))
    )
    assert [(o.header.key, o.header.value) for o in second.ok_response.response_headers_to_add] == [
        ("ratelimit-limit", "100"),
        ("ratelimit-remaining", "6"),
        ("ratelimit-reset", "29"),
    ]
    assert len(first.ok_response.response_headers_to_add) == 3
    assert cached.encode(ALLOW) == plain
    assert not external_auth_pb2.CheckResponse.FromString(plain).ok_response.response_headers_to_add


def test_check_on_bytes_that_are_not_a_check_request_ends_the_call_internal(tmp_path: Path) -> None:
    with pytest.raises(CallAborted) as aborted:
        servicer(tmp_path).check(b"\xff\xff\xff", bytes_context())
    assert aborted.value.code == StatusCode.INTERNAL
