"""Every identity method and every denial, through a real Envoy, on both authz transports."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.certs import BOT_SPIFFE_ID, TestPki
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.tokens import AUDIENCE, ISSUER, hs256_confused_token, signing_key, unsigned_token
from tests.waiting import eventually

pytestmark = pytest.mark.integration

ACME_KEY = "e2e-acme-key"
REVOKED_KEY = "e2e-acme-revoked"
SUSPENDED_KEY = "e2e-initech-key"
FENCED_KEY = "e2e-fenced-key"  # a tenant allowed only from 10.0.0.0/8
REMOTE_ISSUER = "https://id.remote.test"
TRANSPORTS = ["listen_http_authz_port", "listen_grpc_authz_port"]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def jwks_uri() -> Iterator[str]:
    """A real HTTP server on loopback serving the remote issuer's JWK Set."""
    body = json.dumps(signing_key("remote-1").jwks()).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, jwks_uri: str) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    jwks = json.dumps(signing_key().jwks())
    path.write_text(f"""
plans: {{pro: {{}}, free: {{}}}}
tenants:
  acme:
    plan: pro
    api_keys:
      - {{id: acme-ci, sha256: {sha(ACME_KEY)}}}
      - {{id: acme-old, sha256: {sha(REVOKED_KEY)}, revoked: true}}
    jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [RS256], jwks: {jwks}}}
    mtls: {{spiffe_ids: ["{BOT_SPIFFE_ID}"]}}
    allow:
      routes: [{{prefix: /v1/, methods: [GET, POST]}}]
  remote:
    plan: free
    jwt: {{issuer: "{REMOTE_ISSUER}", audiences: [{AUDIENCE}], jwks_uri: "{jwks_uri}"}}
  initech: {{plan: free, status: suspended, api_keys: [{{id: i, sha256: {sha(SUSPENDED_KEY)}}}]}}
  fenced: {{plan: free, api_keys: [{{id: f, sha256: {sha(FENCED_KEY)}}}], allow: {{ip: ["10.0.0.0/8"]}}}}
routes:
  - {{prefix: /v1/search, name: search, cost: 5}}
""")
    return path


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, policy: Path) -> LocalStack:
    return start_stack(policy, mtls=True)


@pytest.fixture(params=TRANSPORTS)
def listener(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def call(stack: LocalStack, listener: str, path: str = "/v1/search?q=1", **kwargs: object) -> Reply:
    return fetch(stack.url(listener, path), **kwargs)  # type: ignore[arg-type]


def assert_denied(reply: Reply, status: int, code: str) -> dict[str, str]:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    body: dict[str, str] = reply.json()
    assert body["error"] == code
    assert body["request_id"], "Envoy's x-request-id must reach the denial body"
    return body


def test_api_key_reaches_the_upstream_with_identity_headers(stack: LocalStack, listener: str) -> None:
    reply = call(stack, listener, headers={"x-api-key": ACME_KEY})
    assert reply.status == 200, reply
    echoed = reply.json()["headers"]
    assert echoed["x-meshtoll-tenant"] == "acme"
    assert echoed["x-meshtoll-plan"] == "pro"
    assert echoed["x-meshtoll-consumer"] == "acme-ci"
    assert echoed["x-meshtoll-route"] == "search"


def test_api_key_as_bearer_token(stack: LocalStack, listener: str) -> None:
    reply = call(stack, listener, headers={"authorization": f"Bearer {ACME_KEY}"})
    assert reply.status == 200, reply


def test_missing_unknown_and_revoked_keys_get_401(stack: LocalStack, listener: str) -> None:
    missing = call(stack, listener)
    assert_denied(missing, 401, "missing_credentials")
    assert missing.headers["www-authenticate"] == 'Bearer realm="meshtoll"'
    assert_denied(call(stack, listener, headers={"x-api-key": "not-a-key"}), 401, "invalid_api_key")
    assert_denied(call(stack, listener, headers={"x-api-key": REVOKED_KEY}), 401, "revoked_api_key")


def test_spoofed_identity_headers_never_reach_the_upstream(stack: LocalStack, listener: str) -> None:
    spoofed = {
        "x-api-key": ACME_KEY,
        "x-meshtoll-tenant": "globex",
        "x-meshtoll-plan": "enterprise",
        "x-meshtoll-consumer": "admin",
        "x-meshtoll-route": "free-stuff",
        "x-meshtoll-peer-address": "10.0.0.1",
        "x-meshtoll-anything": "1",
    }
    reply = call(stack, listener, "/v1/other", headers=spoofed)
    assert reply.status == 200, reply
    echoed = reply.json()["headers"]
    meshtoll_headers = {name: value for name, value in echoed.items() if name.startswith("x-meshtoll-")}
    assert meshtoll_headers == {
        "x-meshtoll-tenant": "acme",
        "x-meshtoll-plan": "pro",
        "x-meshtoll-consumer": "acme-ci",
    }


def test_spoofed_peer_address_does_not_open_an_ip_allow_list(stack: LocalStack, listener: str) -> None:
    headers = {"x-api-key": FENCED_KEY, "x-meshtoll-peer-address": "10.1.1.1", "x-forwarded-for": "10.1.1.1"}
    assert_denied(call(stack, listener, headers=headers), 403, "ip_not_allowed")


def test_suspended_tenant_route_and_method_denials_get_403(stack: LocalStack, listener: str) -> None:
    assert_denied(call(stack, listener, headers={"x-api-key": SUSPENDED_KEY}), 403, "tenant_suspended")
    assert_denied(call(stack, listener, "/admin", headers={"x-api-key": ACME_KEY}), 403, "route_not_allowed")
    reply = call(stack, listener, method="DELETE", headers={"x-api-key": ACME_KEY})
    assert_denied(reply, 403, "method_not_allowed")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_valid_jwt_identifies_the_tenant_and_subject(stack: LocalStack, listener: str) -> None:
    reply = call(stack, listener, headers=bearer(signing_key().token(sub="deploy-bot")))
    assert reply.status == 200, reply
    assert reply.json()["headers"]["x-meshtoll-consumer"] == "deploy-bot"


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (lambda: "eyJhbGciOi.broken.token", "invalid_token"),
        (lambda: signing_key().token(exp=int(time.time()) - 300), "token_expired"),
        (lambda: signing_key().token(nbf=int(time.time()) + 300), "token_not_yet_valid"),
        (lambda: signing_key().token(aud="someone-else"), "invalid_audience"),
        (lambda: signing_key().token(iss="https://evil.test"), "invalid_issuer"),
        (lambda: unsigned_token(), "invalid_token"),
        (lambda: hs256_confused_token(signing_key()), "invalid_token"),
    ],
    ids=[
        "malformed",
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "alg-none",
        "hs-rs-confusion",
    ],
)
def test_bad_jwts_get_401_with_a_bearer_challenge(
    stack: LocalStack, listener: str, token: object, code: str
) -> None:
    reply = call(stack, listener, headers=bearer(token()))  # type: ignore[operator]
    assert_denied(reply, 401, code)
    assert reply.headers["www-authenticate"].startswith('Bearer realm="meshtoll", error="invalid_token"')


def test_jwks_uri_keys_are_fetched_in_the_background(stack: LocalStack, listener: str) -> None:
    token = signing_key("remote-1").token(iss=REMOTE_ISSUER, sub="remote-user")
    # 503 until the background fetch of the JWKS has brought the key.
    reply = eventually(
        lambda: call(stack, listener, headers=bearer(token)),
        lambda reply: reply.status != 503,
        timeout=10,
        message="the key from the jwks_uri never arrived",
    )
    assert reply.status == 200, reply
    assert reply.json()["headers"]["x-meshtoll-tenant"] == "remote"


def test_oversized_headers_get_431_from_envoy(stack: LocalStack, listener: str) -> None:
    reply = call(stack, listener, headers={"x-api-key": ACME_KEY, "x-big": "a" * 70_000})
    assert reply.status == 431


@pytest.mark.parametrize("listener", ["listen_mtls_grpc_authz_port", "listen_mtls_http_authz_port"])
def test_client_certificate_spiffe_id_identifies_the_tenant(
    stack: LocalStack, pki: TestPki, listener: str
) -> None:
    url = stack.url(listener, "/v1/items").replace("http:", "https:")
    ca = str(pki.server.ca_cert)
    reply = fetch(url, client_cert=pki.bot, ca_file=ca)
    assert reply.status == 200, reply
    assert reply.json()["headers"]["x-meshtoll-consumer"] == BOT_SPIFFE_ID
    assert_denied(fetch(url, client_cert=pki.other, ca_file=ca), 401, "unknown_client_certificate")


def test_decisions_are_counted_by_transport_and_outcome_on_the_metrics_endpoint(stack: LocalStack) -> None:
    def decisions() -> dict[str, float]:
        text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshtoll_authz_decisions_total{")
        }

    before = decisions()
    call(stack, "listen_http_authz_port", headers={"x-api-key": ACME_KEY})
    call(stack, "listen_grpc_authz_port", headers={"x-api-key": "not-a-key"})
    after = decisions()
    allowed = 'meshtoll_authz_decisions_total{outcome="allow",transport="http"}'
    rejected = 'meshtoll_authz_decisions_total{outcome="invalid_api_key",transport="grpc"}'
    assert after[allowed] == before.get(allowed, 0) + 1
    assert after[rejected] == before.get(rejected, 0) + 1
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    assert "meshtoll_policy_tenants 4" in text
