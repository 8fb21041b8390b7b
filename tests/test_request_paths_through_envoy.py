"""Path tricks against route rules and billing routes, through a real Envoy and straight at
meshtoll's HTTP authz port: a tenant allowed only `/v1/public/` and `/v1/status` reaches
nothing else however the path is spelt, and `/v1//chat/completions` pays the chat route's
units like `/v1/chat/completions` does."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Mapping

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

NARROW_KEY = "k-narrow"
CHATTY_KEY = "k-chatty"
LISTENERS = ("listen_http_authz_port", "listen_grpc_authz_port", "listen_full_port")
# Each aims at /v1/admin from inside /v1/public/; what meshtoll alone answers to it.
TRICKS = {
    "/v1/public/../admin": "route_not_allowed",
    "/v1/public/%2e%2e/admin": "route_not_allowed",
    "/v1/public/%2E%2E/admin": "route_not_allowed",
    "/v1/public/./../admin": "route_not_allowed",
    "/v1/public/..%2fadmin": "bad_path",
    "/v1/public/..%2Fadmin": "bad_path",
    "/v1/public/%2e%2e%2fadmin": "bad_path",
    "/v1/public/..%5cadmin": "bad_path",
    "/v1/public/..\\admin": "bad_path",
    "/v1/public/..;/admin": "bad_path",
    "/v1/public/..;jsessionid=1/admin": "bad_path",
    "/v1/public/%2e%2e;/admin": "bad_path",  # Envoy forwards this one as `..;`: meshtoll refuses it
    "/v1/public/../../../admin": "bad_path",
    "http://evil/v1/public/../admin": "bad_path",
    # Double encoding: `/v1/admin` to an upstream that decodes twice.
    "/v1/public/%252e%252e/admin": "bad_path",
    "/v1/public/%252E%252E/admin": "bad_path",
    "/v1/public/%252e%252e%252fadmin": "bad_path",
}
# Other spellings of the chat route, whose hook bills the body's token count.
CHAT_SPELLINGS = ("/v1//chat/completions", "/v1/./chat/completions", "/v1/%63hat/completions")


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    policy = tmp_path_factory.mktemp("paths") / "policy.yaml"
    policy.write_text(f"""
plans:
  free: {{}}
  llm: {{price: {{currency: USD, tiers: [{{up_to: null, unit_price: "0.00002"}}]}}}}
tenants:
  narrow:
    plan: free
    api_keys: [{{id: app, sha256: {hashlib.sha256(NARROW_KEY.encode()).hexdigest()}}}]
    allow:
      routes: [{{prefix: /v1/public/, methods: [GET]}}, {{exact: /v1/status}}]
  chatty:
    plan: llm
    api_keys: [{{id: app, sha256: {hashlib.sha256(CHATTY_KEY.encode()).hexdigest()}}}]
routes:
  - {{prefix: /v1/chat/completions, name: chat, hooks: {{usage_from_body: usage.total_tokens}}}}
  - {{prefix: /v1/files/, name: files, allow_double_encoding: true}}
""")
    return start_stack(policy)


def send(port: int, target: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One GET with the request target sent as given: urllib would resolve or quote it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def reached_upstream(body: bytes) -> bool:
    # The demo upstream echoes every request it gets as JSON with its method and path.
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and "method" in document


def port_of(stack: LocalStack, name: str) -> int:
    return int(getattr(stack.ports.envoy, name))


@pytest.mark.parametrize("listener", LISTENERS)
def test_the_tenants_own_routes_are_served(stack: LocalStack, listener: str) -> None:
    for path in ("/v1/public/report", "/v1/status"):
        status, _, body = send(port_of(stack, listener), path, {"x-api-key": NARROW_KEY})
        assert status == 200, path
        assert reached_upstream(body), path


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("target", list(TRICKS))
def test_a_path_trick_never_reaches_the_upstream_through_envoy(
    stack: LocalStack, listener: str, target: str
) -> None:
    status, _, body = send(port_of(stack, listener), target, {"x-api-key": NARROW_KEY})
    # Envoy refuses escaped slashes itself (400); meshtoll refuses the rest (403 or 400).
    assert status in (400, 403), (status, body)
    assert not reached_upstream(body)


@pytest.mark.parametrize("target", list(TRICKS))
def test_meshtoll_alone_refuses_every_path_trick(stack: LocalStack, target: str) -> None:
    # Straight at meshtoll's HTTP authz port, as an Envoy that normalises nothing would ask.
    status, headers, body = send(stack.ports.envoy.authz_http_port, target, {"x-api-key": NARROW_KEY})
    code = TRICKS[target]
    assert (status, json.loads(body)["error"]) == (400 if code == "bad_path" else 403, code)
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("spelling", CHAT_SPELLINGS)
def test_meshtoll_alone_finds_the_chat_route_under_any_spelling(stack: LocalStack, spelling: str) -> None:
    status, headers, _ = send(
        stack.ports.envoy.authz_http_port, f"{spelling}?tokens=5000", {"x-api-key": CHATTY_KEY}
    )
    assert status == 200
    assert headers["x-meshtoll-route"] == "chat"
    assert headers["x-meshtoll-extproc"] == "open"  # so Envoy runs the chat route's hook


def test_other_spellings_of_the_chat_route_bill_its_tokens(stack: LocalStack) -> None:
    for spelling in CHAT_SPELLINGS:
        status, _, body = send(
            port_of(stack, "listen_full_port"), f"{spelling}?tokens=5000", {"x-api-key": CHATTY_KEY}
        )
        assert status == 200, spelling
        assert json.loads(body)["path"] == "/v1/chat/completions?tokens=5000"
    usage = eventually(
        lambda: fetch(f"{stack.meshtoll_admin_url}/api/tenants/chatty/usage").json(),
        lambda usage: usage["requests"] >= len(CHAT_SPELLINGS),
        timeout=5,
        message="the chat route's spellings were not all billed",
    )
    assert usage["by_route"] == [{"route": "chat", "requests": 3, "units": 3 * 5000}]


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_route_that_allows_double_encoding_gets_the_path_unchanged(
    stack: LocalStack, listener: str
) -> None:
    # A file store whose names may hold `%`: its route opts out, every other route refuses.
    status, _, body = send(port_of(stack, listener), "/v1/files/100%2541.txt", {"x-api-key": CHATTY_KEY})
    assert status == 200, body
    assert json.loads(body)["path"] == "/v1/files/100%2541.txt"
    status, _, body = send(port_of(stack, listener), "/v1/other/100%2541.txt", {"x-api-key": CHATTY_KEY})
    assert status == 400
    assert not reached_upstream(body)
