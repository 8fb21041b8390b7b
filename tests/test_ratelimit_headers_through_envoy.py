"""`ratelimit.headers: near_limit` through a real Envoy and Redis: an allowed request carries
the RateLimit headers only once its most restrictive limit has a tenth or less left, a
refused one always, and the limit is enforced exactly as with the headers on every answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import wait_out_a_window_end

pytestmark = pytest.mark.integration

KEYS = {"listen_http_authz_port": "k-near-http", "listen_grpc_authz_port": "k-near-grpc"}
RATELIMIT_HEADERS = {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"}


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    path: Path = tmp_path_factory.mktemp("near-limit") / "policy.yaml"
    tenants = "".join(
        f"  t{n}: {{plan: twenty-a-minute, api_keys: [{{id: t{n}, sha256: {hashlib.sha256(key.encode()).hexdigest()}}}]}}\n"
        for n, key in enumerate(KEYS.values())
    )
    path.write_text(f"""
ratelimit: {{headers: near_limit}}
plans:
  twenty-a-minute: {{limits: [{{requests: 20, per: minute}}]}}
tenants:
{tenants}routes: [{{prefix: /v1/, name: v1}}]
""")
    return start_stack(path)


@pytest.mark.parametrize("listener", list(KEYS))
def test_near_limit_sends_the_ratelimit_headers_only_for_the_last_tenth(
    stack: LocalStack, listener: str
) -> None:
    wait_out_a_window_end("minute", margin=15)  # twenty a minute, counted exactly
    replies = [
        fetch(stack.url(listener, "/v1/items"), headers={"x-api-key": KEYS[listener]}) for _ in range(22)
    ]
    assert [reply.status for reply in replies] == [200] * 20 + [429] * 2
    # 19 to 3 left: far from the limit, no header; 2, 1 and 0 left (a tenth of 20): headers.
    assert all(RATELIMIT_HEADERS.isdisjoint(reply.headers) for reply in replies[:17])
    assert [reply.headers["ratelimit-remaining"] for reply in replies[17:20]] == ["2", "1", "0"]
    refused = replies[20]
    assert refused.json()["error"] == "rate_limited"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
