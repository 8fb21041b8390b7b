"""ext_proc hooks through a real Envoy: header changes with the tenant's values, units read
from a JSON response body into metering and token budgets, and only on hooked routes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-hooked"
BUDGET_KEY = "k-budget"
COUNTED_KEY = "k-counted"
LISTENERS = ("listen_full_port", "listen_rls_port")

POLICY = """
plans:
  llm:
    price: {currency: USD, tiers: [{up_to: null, unit_price: "0.00002"}]}
  budget:
    limits: [{units: 1000, per: month, name: monthly_tokens}]
tenants:
  hooked:
    plan: llm
    api_keys: [{id: app, sha256: %(key)s}]
  counted:
    plan: llm
    api_keys: [{id: app, sha256: %(counted_key)s}]
  budgeted:
    plan: budget
    api_keys: [{id: app, sha256: %(budget_key)s}]
routes:
  - prefix: /v1/chat/completions
    name: chat
    hooks:
      usage_from_body: usage.total_tokens
      request_headers:
        set: {x-tenant-id: "{tenant}", x-caller: "{consumer}@{plan}"}
        append: {x-via: meshtoll}
        remove: [x-api-key]
      response_headers:
        set: {x-served-for: "{tenant}"}
  - prefix: /v1/metered
    name: metered
    hooks: {usage_from_body: usage.total_tokens}
  - prefix: /v1/small
    name: small
    cost: 3
    hooks: {usage_from_body: usage.total_tokens, max_body_bytes: 64}
  - prefix: /v1/strict
    name: strict
    hooks:
      request_headers: {set: {x-tenant-id: "{tenant}"}}
  - prefix: /v1/plain
    name: plain
"""


def write_policy(path: Path) -> Path:
    path.write_text(
        POLICY
        % {
            "key": hashlib.sha256(KEY.encode()).hexdigest(),
            "budget_key": hashlib.sha256(BUDGET_KEY.encode()).hexdigest(),
            "counted_key": hashlib.sha256(COUNTED_KEY.encode()).hexdigest(),
        }
    )
    return path


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    return start_stack(write_policy(tmp_path_factory.mktemp("hooks") / "policy.yaml"))


def call(stack: LocalStack, path: str, *, key: str = KEY, listener: str = "listen_full_port") -> Reply:
    return fetch(stack.url(listener, path), headers={"x-api-key": key, "x-meshtoll-extproc": "open"})


def usage_of(stack: LocalStack, tenant: str, requests: int) -> dict[str, object]:
    """The tenant's usage once its `requests` are all billed."""
    found: dict[str, object] = eventually(
        lambda: fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/usage").json(),
        lambda document: document["requests"] == requests,
        timeout=30,  # a deadline, not an expectation: Envoy flushes its access log every 0.5 s
        message=f"{tenant}'s {requests} requests were not all billed",
    )
    return found


def hook_streams(stack: LocalStack) -> int:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith('meshtoll_extproc_outcomes_total{outcome="streams"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.mark.parametrize("listener", LISTENERS)
def test_request_and_response_headers_carry_the_tenants_values(stack: LocalStack, listener: str) -> None:
    reply = call(stack, "/v1/chat/completions?tokens=5", listener=listener)
    assert reply.status == 200
    seen = reply.json()["headers"]
    assert seen["x-tenant-id"] == "hooked"
    assert seen["x-caller"] == "app@llm"
    assert seen["x-via"] == "meshtoll"
    assert "x-api-key" not in seen  # the credential stops at the gateway on this route
    assert "x-meshtoll-extproc" not in seen
    assert reply.headers["x-served-for"] == "hooked"


def test_routes_without_hooks_never_reach_the_ext_proc_service(stack: LocalStack) -> None:
    before = hook_streams(stack)
    reply = call(stack, "/v1/plain")  # the client's own x-meshtoll-extproc is ignored
    assert reply.status == 200
    seen = reply.json()["headers"]
    assert "x-meshtoll-extproc" not in seen
    assert "x-tenant-id" not in seen  # no hook ran; (the key is gone anyway: authz hides it)
    assert call(stack, "/v1/chat/completions").status == 200
    assert hook_streams(stack) == before + 1


def test_units_from_the_response_body_are_billed(stack: LocalStack) -> None:
    for tokens in (250, 1000, 7):
        assert call(stack, f"/v1/chat/completions?tokens={tokens}", key=COUNTED_KEY).status == 200
    # A metering-only route: its hook is the other ext_proc instance (failure mode open).
    assert call(stack, "/v1/metered?tokens=40", key=COUNTED_KEY).status == 200
    # Over the route's 64-byte body cap: the route's cost stands in, whether the upstream
    # announced the length or sent the body chunked.
    assert call(stack, "/v1/small?tokens=500", key=COUNTED_KEY).status == 200
    chunked = call(stack, "/v1/small?tokens=500&chunked=1", key=COUNTED_KEY)
    assert chunked.status == 200
    assert "content-length" not in chunked.headers
    found = usage_of(stack, "counted", 6)
    assert found["by_route"] == [
        {"route": "chat", "requests": 3, "units": 250 + 1000 + 7},
        {"route": "metered", "requests": 1, "units": 40},
        {"route": "small", "requests": 2, "units": 3 + 3},
    ]


def test_a_token_budget_refuses_once_the_units_are_spent(stack: LocalStack) -> None:
    # 1000 units a month: each call may start while anything is left, its tokens are charged
    # once the response says how many; the call that overdraws is served, the next refused.
    statuses = [call(stack, "/v1/chat/completions?tokens=400", key=BUDGET_KEY).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = call(stack, "/v1/chat/completions?tokens=1", key=BUDGET_KEY)
    assert (refused.status, refused.json()["error"]) == (429, "quota_exceeded")


def test_the_rate_limit_service_charges_units_after_the_response(
    start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Limits enforced by Envoy's ratelimit filter: it looks before the request, and its
    # apply_on_stream_done descriptor carries the body's units as hits_addend afterwards.
    # Envoy charges once the stream is done, so a client that calls again at once can get in
    # before the charge lands: each call waits for the last one's charge, so that this test
    # is about the charge, not that race.
    path = write_policy(tmp_path_factory.mktemp("hooks-rls") / "policy.yaml")
    fresh_counters = path.read_text().replace("budgeted:", "budgeted-rls:")
    path.write_text(fresh_counters + "ratelimit: {enforced_in: service}\n")
    stack = start_stack(path)
    statuses = []
    for charged in (600, 1200, None):
        reply = call(stack, "/v1/chat/completions?tokens=600", key=BUDGET_KEY, listener="listen_rls_port")
        statuses.append(reply.status)
        if charged is not None:
            wait_for_charge(stack, "budgeted-rls", charged)
    assert statuses == [200, 200, 429]


def wait_for_charge(stack: LocalStack, tenant: str, used: int) -> None:
    eventually(
        lambda: tokens_used(stack, tenant),
        lambda seen: seen == used,
        timeout=10,
        message=f"the response's tokens were never charged ({used} used expected)",
    )


def tokens_used(stack: LocalStack, tenant: str) -> int:
    """The tenant's monthly_tokens used, as meshtoll's admin port reads them from Redis."""
    quota = fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/quota").json()
    (tokens,) = [limit for limit in quota["limits"] if limit["name"] == "monthly_tokens"]
    return int(tokens["used"])


def test_failure_modes_per_route_when_the_ext_proc_service_is_unreachable(
    start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # meshtoll's gRPC server on a port of its own choice, which Envoy does not know: HTTP
    # authz still answers, every ext_proc stream fails. The metering hook passes the
    # request, the policy hook fails it.
    path = write_policy(tmp_path_factory.mktemp("hooks-down") / "policy.yaml")
    stack = start_stack(path, serve_args=("--grpc-port", "0"))
    assert call(stack, "/v1/small?tokens=5").status == 200  # metering only: open by default
    assert call(stack, "/v1/strict").status == 503  # changes headers: closed by default
    assert call(stack, "/v1/chat/completions?tokens=5").status == 503  # both: closed
    assert call(stack, "/v1/plain").status == 200  # no hooks, no ext_proc
