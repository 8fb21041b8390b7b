"""Limits and quotas through a real Envoy and a real Redis: the fused authz path on both
transports, and Envoy's ratelimit filter calling meshtoll's rate-limit service."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.waiting import wait_out_a_window_end

pytestmark = pytest.mark.integration


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


TENANTS = {
    # tenant: (plan, key)
    "fused-http": ("five-a-minute", "k-fused-http"),
    "fused-grpc": ("five-a-minute", "k-fused-grpc"),
    "monthly": ("three-a-month", "k-monthly"),
    "bucket": ("bucket", "k-bucket"),
    "rls": ("five-a-minute", "k-rls"),
    "rls-http": ("five-a-minute", "k-rls-http"),
    "shared": ("twenty-an-hour", "k-shared"),
    "shared-bucket": ("bucket-twenty", "k-shared-bucket"),
    "shared-roomy": ("four-hundred-an-hour", "k-shared-roomy"),
    "shadowed": ("shadowed", "k-shadowed"),
    "sliding": ("sliding-three", "k-sliding"),
    "leased": ("per-minute-and-daily", "k-leased"),
}


@pytest.fixture(autouse=True)
def one_window_per_test() -> None:
    """Every test here counts in fixed windows (a minute's, an hour's, a day's, a month's)
    and asserts exact counts: none starts close enough to a window's end for it to turn
    mid-test (the two-worker test takes the longest, seconds at a load of 20)."""
    wait_out_a_window_end("minute", margin=15)
    wait_out_a_window_end("hour", margin=120)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tenants = "".join(
        f"  {name}: {{plan: {plan}, api_keys: [{{id: {name}-key, sha256: {sha(key)}}}]}}\n"
        for name, (plan, key) in TENANTS.items()
    )
    path = tmp_path_factory.mktemp("limits") / "policy.yaml"
    path.write_text(f"""
plans:
  five-a-minute: {{limits: [{{requests: 5, per: minute}}]}}
  three-a-month: {{limits: [{{requests: 100, per: second}}, {{requests: 3, per: month, name: monthly}}]}}
  bucket: {{limits: [{{requests: 1, per: hour, algorithm: token_bucket, burst: 4}}]}}
  twenty-an-hour: {{limits: [{{requests: 20, per: hour}}]}}
  bucket-twenty: {{limits: [{{requests: 1, per: hour, algorithm: token_bucket, burst: 20}}]}}
  four-hundred-an-hour: {{limits: [{{requests: 400, per: hour}}]}}
  shadowed: {{limits: [{{requests: 1, per: hour, shadow: true}}]}}
  sliding-three: {{limits: [{{requests: 3, per: hour, algorithm: sliding_window}}]}}
  per-minute-and-daily: {{limits: [{{requests: 1000, per: minute}}, {{requests: 100000, per: day, name: daily}}]}}
tenants:
{tenants}
routes:
  - {{prefix: /rls/, name: rls-route, enforced_in: service, limits: [{{requests: 2, per: minute}}]}}
""")
    return path


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, policy: Path) -> LocalStack:
    return start_stack(policy)


def call(stack: LocalStack, listener: str, tenant: str, path: str = "/v1/items") -> Reply:
    return fetch(stack.url(listener, path), headers={"x-api-key": TENANTS[tenant][1]})


@pytest.mark.parametrize(
    ("listener", "tenant"),
    [("listen_http_authz_port", "fused-http"), ("listen_grpc_authz_port", "fused-grpc")],
)
def test_fused_path_gives_exactly_five_then_429_with_ratelimit_headers(
    stack: LocalStack, listener: str, tenant: str
) -> None:
    replies = [call(stack, listener, tenant) for _ in range(7)]
    assert [reply.status for reply in replies] == [200] * 5 + [429] * 2
    assert [reply.headers["ratelimit-remaining"] for reply in replies[:5]] == ["4", "3", "2", "1", "0"]
    assert replies[0].headers["ratelimit-limit"] == "5"
    refused = replies[5]
    assert refused.json()["error"] == "rate_limited"
    assert refused.json()["request_id"]
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["retry-after"] == refused.headers["ratelimit-reset"]


def test_decisions_served_from_token_leases_report_exact_remaining_through_envoy(stack: LocalStack) -> None:
    replies = [call(stack, "listen_http_authz_port", "leased") for _ in range(20)]
    assert {reply.status for reply in replies} == {200}
    # One process: its leased hits count as remaining, so every decision reports what the
    # exact path would, though most never asked Redis.
    remaining = [int(reply.headers["ratelimit-remaining"]) for reply in replies]
    assert remaining[1:] == [left - 1 for left in remaining[:-1]]
    quota = fetch(f"{stack.meshtoll_admin_url}/api/tenants/leased/quota").json()
    # Redis counts the hits leased to the process and not yet spent as used: at most
    # L - 1 + m = 30, a lease at its refill mark and the next grant.
    used = {entry["name"]: entry["used"] for entry in quota["limits"]}
    assert 20 < used["daily"] <= 20 + 30


def test_a_monthly_quota_answers_quota_exceeded(stack: LocalStack) -> None:
    replies = [call(stack, "listen_http_authz_port", "monthly") for _ in range(4)]
    assert [reply.status for reply in replies] == [200, 200, 200, 429]
    assert replies[3].json()["error"] == "quota_exceeded"
    assert "monthly" in replies[3].json()["message"]


def test_a_token_bucket_admits_its_burst(stack: LocalStack) -> None:
    statuses = [call(stack, "listen_grpc_authz_port", "bucket").status for _ in range(6)]
    assert statuses == [200] * 4 + [429] * 2


def test_a_sliding_window_admits_its_limit(stack: LocalStack) -> None:
    replies = [call(stack, "listen_http_authz_port", "sliding") for _ in range(5)]
    assert [reply.status for reply in replies] == [200] * 3 + [429] * 2
    assert replies[3].json()["error"] == "rate_limited"


def test_shadow_limits_are_counted_but_never_refuse(stack: LocalStack) -> None:
    assert {call(stack, "listen_http_authz_port", "shadowed").status for _ in range(4)} == {200}
    quota = fetch(f"{stack.meshtoll_admin_url}/api/tenants/shadowed/quota").json()
    assert quota["limits"][0]["used"] == 4


@pytest.mark.parametrize(
    ("listener", "tenant"), [("listen_rls_port", "rls"), ("listen_rls_http_authz_port", "rls-http")]
)
def test_the_rls_filter_enforces_routes_the_policy_gives_to_the_service(
    stack: LocalStack, listener: str, tenant: str
) -> None:
    # Behind either ext_authz transport: the tenant and route headers authz set are the
    # descriptors' source either way.
    replies = [call(stack, listener, tenant, "/rls/x") for _ in range(4)]
    assert [reply.status for reply in replies] == [200, 200, 429, 429]
    # Envoy's ratelimit filter adds the draft RateLimit headers from meshtoll's statuses.
    assert replies[0].headers["x-ratelimit-limit"].startswith("2")
    assert replies[1].headers["x-ratelimit-remaining"] == "0"
    # The fused path did not count these requests a second time.
    quota = fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/quota").json()
    assert {entry["scope"]: entry["used"] for entry in quota["limits"]} == {"tenant": 2, "route:rls-route": 2}


def test_quota_api_reports_each_limit(stack: LocalStack) -> None:
    for _ in range(2):
        call(stack, "listen_http_authz_port", "shared")
    quota = fetch(f"{stack.meshtoll_admin_url}/api/tenants/shared/quota").json()
    assert quota["tenant"] == "shared"
    limit, route_limit = quota["limits"]
    assert (route_limit["scope"], route_limit["used"]) == ("route:rls-route", 0)
    # The first request leased 2 more hits (an eighth of the 19 left), the second spent one
    # of them: Redis, which the quota reads, counts the leased hits as used.
    assert {key: limit[key] for key in ("name", "algorithm", "limit", "per", "used", "remaining")} == {
        "name": "20/hour",
        "algorithm": "fixed_window",
        "limit": 20,
        "per": "hour",
        "used": 3,
        "remaining": 17,
    }
    assert 0 < limit["reset_seconds"] <= 3600
    missing = fetch(f"{stack.meshtoll_admin_url}/api/tenants/nobody/quota")
    assert (missing.status, missing.json()["error"]) == (404, "unknown_tenant")


@pytest.mark.parametrize(
    ("tenant", "limit", "each", "short_by"),
    [
        # Short by at most what each worker's lease holds unused (README, Token leases):
        # P x min(L - 1, floor((limit - 1) / 8)) = 2 x 2 ...
        ("shared", 20, 10, 2 * 2),
        ("shared-bucket", 20, 10, 2 * 2),
        # ... and, far enough from the limit for leases to be refilled before they run
        # out, P x (L - 1 + m) = 2 x 30 (m = L - 1): the refills are in flight while the
        # decisions of eight clients spend what is left.
        ("shared-roomy", 400, 60, 2 * 30),
    ],
)
def test_two_worker_processes_on_one_redis_never_overshoot(
    start_stack: StartStack, policy: Path, tenant: str, limit: int, each: int, short_by: int
) -> None:
    stack = start_stack(policy, workers=2)
    already = fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/quota").json()["limits"][0]["used"]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(each):
            status = call(stack, "listen_http_authz_port", tenant).status
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every answer is meshtoll's: Envoy's test timeouts (tests/envoy_harness.py) leave no
    # authz call for it to give up on with a 503 of its own.
    assert set(statuses) <= {200, 429}, statuses
    # Never more than the limit.
    assert limit - already - short_by <= statuses[200] <= limit - already, statuses
