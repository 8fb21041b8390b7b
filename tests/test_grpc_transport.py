"""The gRPC Check adapter: Envoy's protobufs in, the shared decision, protobufs out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import AuthorizationServicer
from meshtoll.authz.jwks import JwksCache
from meshtoll.policy.reload import PolicyHolder

KEY = "grpc-test-key"


def servicer(tmp_path: Path) -> AuthorizationServicer:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(
        "plans: {pro: {}}\n"
        f"tenants: {{acme: {{plan: pro, api_keys: [{{id: ci, sha256: {digest}}}],"
        ' mtls: {spiffe_ids: ["spiffe://acme.test/bot"]}}}\n'
        "routes: [{prefix: /v1/, name: v1}]\n"
    )
    return AuthorizationServicer(Authorizer(PolicyHolder.from_file(path), JwksCache()))


def check_request(headers: dict[str, str], principal: str = "") -> external_auth_pb2.CheckRequest:
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.principal = principal
    http = attributes.request.http
    http.method, http.path = "GET", "/v1/items"
    http.headers.update({"x-request-id": "rid-7", **headers})
    return external_auth_pb2.CheckRequest(attributes=attributes)


async def test_allow_sets_identity_headers_removes_spoofed_ones_and_emits_metadata(tmp_path: Path) -> None:
    request = check_request({"x-api-key": KEY, "x-meshtoll-shadow": "1"})
    answer = await servicer(tmp_path).Check(request, None)
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
    answer = await servicer(tmp_path).Check(check_request({"x-api-key": "wrong"}), None)
    assert answer.status.code == 16  # UNAUTHENTICATED
    assert answer.denied_response.status.code == 401
    assert json.loads(answer.denied_response.body) == {
        "error": "invalid_api_key",
        "message": "the API key is not valid",
        "request_id": "rid-7",
    }


async def test_spiffe_principal_of_a_verified_peer_identifies_the_tenant(tmp_path: Path) -> None:
    answer = await servicer(tmp_path).Check(check_request({}, principal="spiffe://acme.test/bot"), None)
    assert answer.status.code == 0
