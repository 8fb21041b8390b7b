"""Redis stopped mid-traffic, then restarted: the "open" policy keeps admitting, the
"closed" one refuses with 503, every answer is meshtoll's (Envoy's shipped timeout never
ran out on a call), and service comes back without a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack, RedisServer
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-failure"
# Envoy's counts of calls to meshtoll it gave up on (its shipped timeouts, 0.25-0.5 s).
GAVE_UP = ("cluster.meshtoll_http.upstream_rq_timeout", "cluster.meshtoll_grpc.upstream_rq_timeout")


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("failure") / "policy.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(
        "plans: {roomy: {limits: [{requests: 100000, per: hour}]}}\n"
        f"tenants: {{acme: {{plan: roomy, api_keys: [{{id: k, sha256: {digest}}}]}}}}\n"
        "routes: [{prefix: /rls/, name: rls, enforced_in: service}]\n"
    )
    return path


def called(stack: LocalStack, listener: str, path: str = "/v1/x") -> tuple[int, str]:
    reply = fetch(stack.url(listener, path), headers={"x-api-key": KEY})
    error = reply.json().get("error", "") if reply.headers.get("content-type") == "application/json" else ""
    return reply.status, error


def gave_up(stack: LocalStack) -> int:
    """How many calls to meshtoll Envoy gave up on: its own 503s, not meshtoll's answers."""
    text = fetch(f"{stack.envoy_admin_url}/stats?filter=upstream_rq_timeout$").body.decode()
    counts = dict(line.split(": ") for line in text.splitlines())
    return sum(int(counts[name]) for name in GAVE_UP)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_outage_follows_the_failure_policy_and_recovers(
    start_stack: StartStack, policy: Path, tmp_path: Path, mode: str
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.__enter__()
    try:
        stack = start_stack(
            policy,
            redis_url=redis.url,
            # Without leases: a lease would go on admitting the hits it reserved in Redis.
            serve_args=("--ratelimit-failure-mode", mode, "--redis-timeout-ms", "50", "--lease-max", "1"),
            # The bound is Envoy's shipped timeout: that the failure policy answers inside
            # it, before Envoy gives up, is what this test is about.
            shipped_timeouts=True,
        )
        assert called(stack, "listen_http_authz_port")[0] == 200
    finally:
        redis.__exit__(None, None, None)

    http = [called(stack, "listen_http_authz_port") for _ in range(10)]
    grpc = [called(stack, "listen_grpc_authz_port") for _ in range(10)]
    rls = [called(stack, "listen_rls_port", "/rls/x") for _ in range(5)]
    # The failure policy answered every call before Envoy's shipped timeout ran out: Envoy
    # gave up on none (not a wall-clock window measured by this client: a refused Redis
    # makes meshtoll answer in well under a tenth of Envoy's 0.25 s).
    assert gave_up(stack) == 0
    if mode == "open":
        assert {status for status, _ in http + grpc + rls} == {200}
    else:
        # Envoy turns any 5xx of an HTTP authz service into its own status_on_error (503),
        # without the body; the gRPC transport carries meshtoll's JSON error through.
        assert {status for status, _ in http} == {503}
        assert {(status, error) for status, error in grpc} == {(503, "ratelimit_unavailable")}
        assert {status for status, _ in rls} == {503}  # the ratelimit filter's failure_mode_deny

    # On the port meshtoll knows: below the ephemeral range, nobody else took it meanwhile.
    with RedisServer(tmp_path / "redis-again", port=redis.port):
        eventually(
            lambda: called(stack, "listen_http_authz_port")[0],
            lambda status: status == 200,
            timeout=10,
            message="meshtoll did not recover when Redis came back",
        )
        assert called(stack, "listen_rls_port", "/rls/x")[0] == 200
