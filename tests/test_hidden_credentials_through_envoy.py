"""The API key stops at the gateway: authz has Envoy remove the header (or, on the gRPC
transport, the query parameter) that carried it, unless the plan or the route forwards it;
on the HTTP transport, Envoy's header_mutation filter removes a query-parameter key. Through
a real Envoy, on both transports; and the meter records no key."""

from __future__ import annotations

import asyncio
import hashlib
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from meshtoll.local.devstack import LocalStack
from meshtoll.storage.usage_redis import RedisUsageStore
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "hidden-acme-key"
FORWARDED_KEY = "forwarded-globex-key"  # a tenant whose plan forwards its key
TRANSPORTS = ["listen_http_authz_port", "listen_grpc_authz_port"]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    path = tmp_path_factory.mktemp("hidden") / "policy.yaml"
    path.write_text(f"""
auth: {{api_key_query_param: api_key}}
plans: {{pro: {{}}, legacy: {{forward_credentials: true}}}}
tenants:
  acme: {{plan: pro, api_keys: [{{id: a, sha256: {sha(KEY)}}}]}}
  globex: {{plan: legacy, api_keys: [{{id: g, sha256: {sha(FORWARDED_KEY)}}}]}}
routes:
  - {{prefix: /v1/proxy, name: proxy, forward_credentials: true}}
""")
    # As `meshtoll dev` does: Envoy removes the policy's query parameter after HTTP ext_authz.
    return start_stack(path, api_key_query_param="api_key")


def upstream_saw(stack: LocalStack, listener: str, path: str, headers: dict[str, str]) -> dict[str, object]:
    reply = fetch(stack.url(listener, path), headers=headers)
    assert reply.status == 200, reply
    seen: dict[str, object] = reply.json()
    return seen


@pytest.mark.parametrize("listener", TRANSPORTS)
def test_a_key_header_or_bearer_key_never_reaches_the_upstream(stack: LocalStack, listener: str) -> None:
    seen = upstream_saw(stack, listener, "/v1/items", {"x-api-key": KEY, "x-other": "kept"})
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert "x-api-key" not in headers
    assert headers["x-other"] == "kept"
    assert headers["x-meshtoll-tenant"] == "acme"
    seen = upstream_saw(stack, listener, "/v1/items", {"authorization": f"Bearer {KEY}"})
    assert isinstance(seen["headers"], dict)
    assert "authorization" not in seen["headers"]
    assert KEY not in str(seen)


@pytest.mark.parametrize("listener", TRANSPORTS)
def test_a_query_parameter_key_is_removed_and_the_rest_of_the_query_kept(
    stack: LocalStack, listener: str
) -> None:
    # gRPC: meshtoll's answer (query_parameters_to_remove); HTTP: the header_mutation filter
    # after ext_authz, since an HTTP authorization service cannot ask for it.
    seen = upstream_saw(stack, listener, f"/v1/items?q=1&api_key={KEY}&page=2", {})
    target = urlsplit(str(seen["path"]))  # Envoy may reorder what it keeps
    assert (target.path, parse_qs(target.query)) == ("/v1/items", {"q": ["1"], "page": ["2"]})
    assert KEY not in str(seen)


def test_a_route_forwards_a_query_key_on_grpc_only(stack: LocalStack) -> None:
    # The static filter on the HTTP transport removes the parameter whatever the policy says.
    grpc = upstream_saw(stack, "listen_grpc_authz_port", f"/v1/proxy/x?api_key={KEY}", {})
    assert grpc["path"] == f"/v1/proxy/x?api_key={KEY}"
    http = upstream_saw(stack, "listen_http_authz_port", f"/v1/proxy/x?api_key={KEY}", {})
    assert http["path"] == "/v1/proxy/x"


def test_neither_the_meter_nor_its_ledger_records_a_query_key(stack: LocalStack, redis_url: str) -> None:
    for listener in ("listen_full_port", "listen_full_als_port"):
        assert fetch(stack.url(listener, f"/v1/items?api_key={KEY}"), headers={}).status == 200
    eventually(
        lambda: fetch(f"{stack.meshtoll_admin_url}/api/tenants/acme/usage").json().get("requests", 0),
        lambda requests: requests >= 2,
        timeout=15,
        message="both requests billed",
    )

    async def ledger() -> str:
        store = RedisUsageStore(redis_url)
        try:
            return repr(await store.ledger("acme", 0, time.time() + 60))
        finally:
            await store.close()

    recorded = asyncio.run(ledger())
    assert "acme" in recorded
    assert KEY not in recorded
    assert KEY not in stack.children["meshtoll"].log_tail(500)


@pytest.mark.parametrize("listener", TRANSPORTS)
def test_a_plan_or_a_route_that_forwards_credentials_keeps_the_key(stack: LocalStack, listener: str) -> None:
    by_plan = upstream_saw(stack, listener, "/v1/items", {"x-api-key": FORWARDED_KEY})
    assert isinstance(by_plan["headers"], dict)
    assert by_plan["headers"]["x-api-key"] == FORWARDED_KEY
    by_route = upstream_saw(stack, listener, "/v1/proxy/x", {"x-api-key": KEY})
    assert isinstance(by_route["headers"], dict)
    assert by_route["headers"]["x-api-key"] == KEY
