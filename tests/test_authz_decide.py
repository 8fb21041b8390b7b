"""The authz decision core, with plain values: no server, no Envoy."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import jwt
import pytest

from meshtoll.authz.decide import client_address, decide
from meshtoll.authz.verdict import Allow, CheckRequest, Deny
from meshtoll.policy import CompiledPolicy, load_policy_text
from tests.tokens import AUDIENCE, ISSUER, hs256_confused_token, signing_key, unsigned_token

ACME_KEY = "acme-secret-key"
REVOKED_KEY = "acme-old-key"


def policy_text() -> str:
    import hashlib

    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    jwks = json.dumps(signing_key().jwks())
    return f"""
auth: {{api_key_query_param: api_key, trusted_proxy_hops: 1}}
plans: {{pro: {{}}, free: {{}}}}
tenants:
  acme:
    plan: pro
    api_keys:
      - {{id: acme-ci, sha256: {sha(ACME_KEY)}}}
      - {{id: acme-old, sha256: {sha(REVOKED_KEY)}, revoked: true}}
    jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [RS256], jwks: {jwks}}}
    mtls: {{spiffe_ids: ["spiffe://acme.test/ns/ci/sa/bot"]}}
    allow:
      ip: ["10.0.0.0/8"]
      routes: [{{prefix: /v1/, methods: [GET, POST]}}, {{exact: /v1/admin, methods: [DELETE]}}]
  sleepy: {{plan: free, status: suspended, api_keys: [{{id: s, sha256: {sha("sleepy-key")}}}]}}
routes:
  - {{prefix: /v1/search, cost: 5}}
"""


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy_text(policy_text(), "policy.yaml")


def check(
    policy: CompiledPolicy,
    *,
    path: str = "/v1/search?q=1",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    source: str = "10.1.2.3",
    sans: tuple[str, ...] = (),
    now: float | None = None,
) -> Allow | Deny:
    request = CheckRequest(method, path, {"x-request-id": "req-1", **(headers or {})}, source, sans)
    return decide(request, policy, {}, time.time() if now is None else now)


def denied(verdict: Allow | Deny) -> tuple[int, str]:
    assert isinstance(verdict, Deny), verdict
    return verdict.status, verdict.code


def test_api_key_header_identifies_tenant_plan_and_consumer(policy: CompiledPolicy) -> None:
    verdict = check(policy, headers={"x-api-key": ACME_KEY})
    assert isinstance(verdict, Allow)
    assert (verdict.tenant, verdict.plan, verdict.consumer, verdict.route) == (
        "acme",
        "pro",
        "acme-ci",
        "/v1/search",
    )
    assert dict(verdict.headers) == {
        "x-meshtoll-tenant": "acme",
        "x-meshtoll-plan": "pro",
        "x-meshtoll-consumer": "acme-ci",
        "x-meshtoll-route": "/v1/search",
    }
    assert verdict.metadata == {
        "tenant": "acme",
        "plan": "pro",
        "consumer": "acme-ci",
        "route": "/v1/search",
    }


def test_api_key_as_opaque_bearer_token_and_as_query_parameter(policy: CompiledPolicy) -> None:
    assert isinstance(check(policy, headers={"authorization": f"Bearer {ACME_KEY}"}), Allow)
    assert isinstance(check(policy, path=f"/v1/x?api_key={ACME_KEY}"), Allow)


def test_missing_unknown_and_revoked_keys_are_401_with_a_challenge(policy: CompiledPolicy) -> None:
    missing = check(policy)
    assert denied(missing) == (401, "missing_credentials")
    assert isinstance(missing, Deny)
    assert ("www-authenticate", 'Bearer realm="meshtoll"') in missing.headers
    assert denied(check(policy, headers={"x-api-key": "nope"})) == (401, "invalid_api_key")
    assert denied(check(policy, headers={"x-api-key": REVOKED_KEY})) == (401, "revoked_api_key")


def test_deny_body_is_json_with_a_stable_code_and_the_request_id(policy: CompiledPolicy) -> None:
    verdict = check(policy, headers={"x-api-key": "nope"})
    assert isinstance(verdict, Deny)
    assert json.loads(verdict.body("req-1")) == {
        "error": "invalid_api_key",
        "message": "the API key is not valid",
        "request_id": "req-1",
    }


def test_suspended_tenant_is_403(policy: CompiledPolicy) -> None:
    assert denied(check(policy, headers={"x-api-key": "sleepy-key"})) == (403, "tenant_suspended")


def test_routes_and_methods_outside_the_allow_list_are_403(policy: CompiledPolicy) -> None:
    key = {"x-api-key": ACME_KEY}
    assert denied(check(policy, path="/v2/x", headers=key)) == (403, "route_not_allowed")
    assert denied(check(policy, method="DELETE", headers=key)) == (403, "method_not_allowed")
    # The exact rule is the more specific one for its path, and it allows DELETE only.
    assert isinstance(check(policy, path="/v1/admin", method="DELETE", headers=key), Allow)
    assert denied(check(policy, path="/v1/admin", method="GET", headers=key)) == (
        403,
        "method_not_allowed",
    )


def test_routes_are_matched_against_the_normalised_path(policy: CompiledPolicy) -> None:
    key = {"x-api-key": ACME_KEY}
    for dodge in ("/v1/x/../../v2/x", "/v1/%2e%2e/v2/x", "/v1/./../v2/x"):
        assert denied(check(policy, path=dodge, headers=key)) == (403, "route_not_allowed"), dodge
    for spelling in ("/v1//search?q=1", "/v1/./search", "/v1/%73earch", "/v2/../v1/search"):
        verdict = check(policy, path=spelling, headers=key)
        assert isinstance(verdict, Allow), spelling
        assert verdict.route == "/v1/search", spelling  # so it pays the route's cost of 5


def test_a_path_that_cannot_be_read_safely_is_400_bad_path_before_credentials(
    policy: CompiledPolicy,
) -> None:
    for target in ("/v1/x/..%2fadmin", "/v1/x/..;/admin", "/v1/x%00", "http://evil/v1/x", "/.."):
        assert denied(check(policy, path=target, headers={"x-api-key": ACME_KEY})) == (400, "bad_path")
        assert denied(check(policy, path=target)) == (400, "bad_path")


def test_ip_allow_list_uses_the_hop_behind_the_trusted_proxy(policy: CompiledPolicy) -> None:
    key = {"x-api-key": ACME_KEY}
    # One trusted hop: the proxy at 192.0.2.1 says the client is 10.9.9.9.
    forwarded = {**key, "x-forwarded-for": "203.0.113.7, 10.9.9.9"}
    assert isinstance(check(policy, headers=forwarded, source="192.0.2.1"), Allow)
    spoofed = {**key, "x-forwarded-for": "10.9.9.9, 203.0.113.7"}
    assert denied(check(policy, headers=spoofed, source="192.0.2.1")) == (403, "ip_not_allowed")


def test_client_address_with_and_without_trusted_hops() -> None:
    request = CheckRequest("GET", "/", {"x-forwarded-for": "1.1.1.1, 2.2.2.2"}, "3.3.3.3")
    assert client_address(request, 0) == "3.3.3.3"
    assert client_address(request, 1) == "2.2.2.2"
    assert client_address(request, 2) == "1.1.1.1"
    assert client_address(request, 5) == "1.1.1.1"
    # A proxy that already appended the peer is not counted twice.
    appended = CheckRequest("GET", "/", {"x-forwarded-for": "1.1.1.1, 3.3.3.3"}, "3.3.3.3")
    assert client_address(appended, 1) == "1.1.1.1"


def test_spoofed_identity_headers_are_replaced_or_removed(policy: CompiledPolicy) -> None:
    verdict = check(
        policy,
        path="/v1/other",
        headers={
            "x-api-key": ACME_KEY,
            "x-meshtoll-tenant": "evil",
            "x-meshtoll-route": "/x",
            "x-meshtoll-extproc": "closed",
            "x-meshtoll-extra": "1",
        },
    )
    assert isinstance(verdict, Allow)
    assert dict(verdict.headers)["x-meshtoll-tenant"] == "acme"
    assert "x-meshtoll-route" not in dict(verdict.headers)
    # No route matched, so none has hooks: the client's route and ext_proc marks go, and so
    # does the API key's header (hide credentials, tested on its own below).
    assert set(verdict.remove_headers) == {
        "x-meshtoll-route",
        "x-meshtoll-extproc",
        "x-meshtoll-extra",
        "x-api-key",
    }


def test_a_client_ext_proc_mark_goes_on_a_route_without_hooks(policy: CompiledPolicy) -> None:
    verdict = check(
        policy,
        headers={"x-api-key": ACME_KEY, "x-meshtoll-route": "/x", "x-meshtoll-extproc": "closed"},
    )
    assert isinstance(verdict, Allow)
    # The route matched: its header is meshtoll's and replaces the client's, not removed.
    assert dict(verdict.headers)["x-meshtoll-route"] == "/v1/search"
    assert set(verdict.remove_headers) == {"x-meshtoll-extproc", "x-api-key"}


def test_spiffe_identity_from_the_client_certificate(policy: CompiledPolicy) -> None:
    verdict = check(policy, sans=("spiffe://acme.test/ns/ci/sa/bot",))
    assert isinstance(verdict, Allow)
    assert verdict.consumer == "spiffe://acme.test/ns/ci/sa/bot"
    assert denied(check(policy, sans=("spiffe://other.test/x",))) == (
        401,
        "unknown_client_certificate",
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_valid_jwt_identifies_tenant_and_subject(policy: CompiledPolicy) -> None:
    verdict = check(policy, headers=bearer(signing_key().token(sub="robot-7")))
    assert isinstance(verdict, Allow)
    assert (verdict.tenant, verdict.consumer) == ("acme", "robot-7")


# Made when the test runs, not when the module is imported: a whole suite on a loaded machine
# ran this test more than the 30 s leeway + 90 s after the import, and the nbf had passed.
@pytest.mark.parametrize(
    ("claims", "code"),
    [
        (lambda: {"exp": int(time.time()) - 120}, "token_expired"),
        (lambda: {"nbf": int(time.time()) + 120}, "token_not_yet_valid"),
        (lambda: {"aud": "other"}, "invalid_audience"),
        (lambda: {"iss": "https://evil.test"}, "invalid_issuer"),
        (lambda: {"exp": None}, "invalid_token"),
    ],
)
def test_jwt_claim_failures_are_401_invalid_token(
    policy: CompiledPolicy, claims: Callable[[], dict[str, object]], code: str
) -> None:
    verdict = check(policy, headers=bearer(signing_key().token(**claims())))
    assert denied(verdict) == (401, code)
    assert isinstance(verdict, Deny)
    assert 'error="invalid_token"' in dict(verdict.headers)["www-authenticate"]


def test_jwt_time_claims_use_the_injected_clock_with_leeway(policy: CompiledPolicy) -> None:
    token = signing_key().token(exp=1_000_000, iat=999_000)
    assert isinstance(check(policy, headers=bearer(token), now=1_000_020), Allow)  # inside 30 s leeway
    assert denied(check(policy, headers=bearer(token), now=1_000_031)) == (401, "token_expired")


def test_alg_none_forged_signature_and_hs_rs_confusion_are_rejected(policy: CompiledPolicy) -> None:
    assert denied(check(policy, headers=bearer(unsigned_token()))) == (401, "invalid_token")
    assert denied(check(policy, headers=bearer(hs256_confused_token(signing_key())))) == (
        401,
        "invalid_token",
    )
    other = signing_key("acme-1-impostor")
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        other.private,
        algorithm="RS256",
        headers={"kid": "acme-1"},
    )
    assert denied(check(policy, headers=bearer(forged))) == (401, "invalid_token")
    assert denied(check(policy, headers=bearer("eyJub3Q.a.jwt"))) == (401, "invalid_token")


def test_jwks_uri_keys_not_fetched_yet_is_503_not_401() -> None:
    text = f"""
plans: {{pro: {{}}}}
tenants:
  acme: {{plan: pro, jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], jwks_uri: "http://127.0.0.1:9/jwks"}}}}
"""
    remote = load_policy_text(text, "p.yaml")
    token = signing_key().token()
    request = CheckRequest("GET", "/", bearer(token), "127.0.0.1")
    assert denied(decide(request, remote, {}, time.time())) == (503, "jwks_unavailable")
    keys = {"http://127.0.0.1:9/jwks": jwt.PyJWKSet.from_dict(signing_key().jwks())}
    assert isinstance(decide(request, remote, keys, time.time()), Allow)
