"""Run-time tenants through real Envoys, with two meshtoll instances on one real Redis: a
change made through one instance's admin API is applied by both, which every check here
proves by asking both gateways. Instance B reaches Redis through a proxy the outage test cuts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meshtoll.local.devstack import LocalStack, RedisServer
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.scraped import scrape, value
from tests.tcp_proxy import TcpProxy
from tests.waiting import eventually, wait_out_a_window_end

pytestmark = pytest.mark.integration

OPS_TOKEN = "ops-token-5b1e9c"  # a write token of the tokens file
FILE_KEY = "file-tenant-key"
APPLIED_SECONDS = 10.0  # far above the second a change takes: a deadline, not an expectation
LISTENERS = ("listen_http_authz_port", "listen_grpc_authz_port")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # Its own Redis: the registry is global to a Redis, and these instances' list is theirs.
    with RedisServer(tmp_path_factory.mktemp("runtime-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(redis: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(redis.port) as running:
        yield running


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("runtime-files")
    policy = directory / "policy.yaml"
    policy.write_text(f"""
plans:
  free: {{limits: [{{requests: 2, per: minute}}]}}
  pro: {{limits: [{{requests: 1000, per: minute}}]}}
tenants:
  filed: {{plan: pro, api_keys: [{{id: f, sha256: {hashlib.sha256(FILE_KEY.encode()).hexdigest()}}}]}}
routes: [{{prefix: /v1/, name: v1}}]
""")
    tokens = directory / "tokens.yaml"
    tokens.write_text(
        f"tokens: [{{name: ops, scope: write, sha256: {hashlib.sha256(OPS_TOKEN.encode()).hexdigest()}}}]\n"
    )
    return policy, tokens


@pytest.fixture(scope="module")
def stacks(
    start_stack: StartStack, redis: RedisServer, proxy: TcpProxy, files: tuple[Path, Path]
) -> tuple[LocalStack, LocalStack]:
    policy, tokens = files
    flags = ("--admin-tokens-file", str(tokens))
    a = start_stack(policy, redis_url=redis.url, serve_args=flags)
    b = start_stack(policy, redis_url=f"redis://127.0.0.1:{proxy.port}/0", serve_args=flags)
    return a, b


def admin(stack: LocalStack, method: str, path: str, body: Any = None, **headers: str) -> Reply:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"authorization": f"Bearer {OPS_TOKEN}", "content-type": "application/json", **headers}
    return fetch(f"{stack.meshtoll_admin_url}{path}", method=method, headers=sent, body=data)


def call(stack: LocalStack, key: str, listener: str = "listen_http_authz_port") -> Reply:
    return fetch(stack.url(listener, "/v1/items"), headers={"x-api-key": key})


def outcome(reply: Reply) -> str:
    """200, or the refusal's stable code (the HTTP transport keeps meshtoll's JSON body)."""
    if reply.status == 200:
        return "allowed"
    return str(reply.json()["error"])


def everywhere(stacks: tuple[LocalStack, LocalStack], key: str) -> set[str]:
    return {outcome(call(stack, key, listener)) for stack in stacks for listener in LISTENERS}


def until_everywhere(stacks: tuple[LocalStack, LocalStack], key: str, expected: str) -> None:
    eventually(
        lambda: everywhere(stacks, key),
        lambda seen: seen == {expected},
        timeout=APPLIED_SECONDS,
        message=f"both instances, on both transports, to answer {expected}",
    )


def applied(stacks: tuple[LocalStack, LocalStack], version: int) -> list[dict[str, Any]]:
    """Wait until both instances report `version` applied: the registry's proof."""

    def instances() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = admin(stacks[0], "GET", "/api/instances").json()["instances"]
        return found

    return eventually(
        instances,
        lambda found: len(found) == 2 and all(i["version"] >= version for i in found),
        timeout=APPLIED_SECONDS,
        message=f"both instances to report version {version}",
    )


def create(stack: LocalStack, name: str, **fields: Any) -> dict[str, Any]:
    reply = admin(stack, "POST", "/api/tenants", {"name": name, "plan": "pro", **fields})
    assert reply.status == 201, reply
    created: dict[str, Any] = reply.json()
    return created


def new_key(stack: LocalStack, tenant: str, **fields: Any) -> dict[str, Any]:
    reply = admin(stack, "POST", f"/api/tenants/{tenant}/keys", fields)
    assert reply.status == 201, reply
    issued: dict[str, Any] = reply.json()
    return issued


def test_a_tenant_made_through_one_instance_is_served_by_both_and_its_key_never_goes_upstream(
    stacks: tuple[LocalStack, LocalStack],
) -> None:
    a, b = stacks
    create(a, "acme")
    issued = new_key(b, "acme", id="ci")
    applied(stacks, issued["version"])
    for stack in stacks:
        for listener in LISTENERS:
            reply = call(stack, issued["key"], listener)
            assert reply.status == 200, reply
            seen = reply.json()
            assert seen["headers"]["x-meshtoll-tenant"] == "acme"
            assert seen["headers"]["x-meshtoll-consumer"] == "ci"
            assert issued["key"] not in json.dumps(seen)


def test_the_tenant_metrics_follow_the_registry_on_both_instances(
    stacks: tuple[LocalStack, LocalStack],
) -> None:
    a, b = stacks
    before = [scrape(stack.meshtoll_admin_url) for stack in stacks]
    create(a, "observed")
    issued = new_key(a, "observed", id="o")
    assert admin(a, "POST", "/api/tenants", {"name": "observed", "plan": "pro"}).status == 412
    applied(stacks, issued["version"])
    assert call(b, issued["key"]).status == 200
    after = [scrape(stack.meshtoll_admin_url) for stack in stacks]

    def grew(index: int, family: str, sample: str | None = None, **labels: str) -> float:
        return value(after[index], family, sample, **labels) - value(before[index], family, sample, **labels)

    def counted(index: int, family: str, **labels: str) -> float:
        return grew(index, family, f"{family}_total", **labels)

    writes = "meshtoll_tenant_api_writes"
    assert (counted(0, writes, outcome="committed"), counted(0, writes, outcome="precondition_failed")) == (
        2,
        1,
    )
    assert counted(1, writes, outcome="committed") == 0  # asked of A only
    for index in (0, 1):
        assert grew(index, "meshtoll_runtime_tenants") == 1
        assert grew(index, "meshtoll_policy_tenants") == 1  # the file's and the run-time tenants
        assert counted(index, "meshtoll_runtime_registry_changes_applied") >= 2
        assert value(after[index], "meshtoll_runtime_registry_version") >= issued["version"]
        assert value(after[index], "meshtoll_runtime_tenants_skipped") == 0


def test_a_roll_keeps_both_keys_then_only_the_new_one(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "rolling")
    old = new_key(a, "rolling", id="v1")
    rolled = admin(b, "POST", "/api/tenants/rolling/keys/v1/roll", {"overlap_seconds": 3600, "id": "v2"})
    assert rolled.status == 201, rolled
    new = rolled.json()
    assert rolled.json()["rolled"]["expires_at"] is not None
    until_everywhere(stacks, new["key"], "allowed")
    assert everywhere(stacks, old["key"]) == {"allowed"}
    # Ending the overlap now (an expiry in the past): the old key stops everywhere.
    ended = admin(a, "PATCH", "/api/tenants/rolling/keys/v1", {"expires_at": "2020-01-01T00:00:00Z"})
    assert ended.status == 200, ended
    until_everywhere(stacks, old["key"], "expired_api_key")
    assert everywhere(stacks, new["key"]) == {"allowed"}


def test_a_key_that_expires_is_refused_with_expired_api_key(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, _ = stacks
    create(a, "expiring")
    issued = new_key(a, "expiring", id="temp", expires_at="2099-01-01T00:00:00Z")
    assert issued["expires_at"] == "2099-01-01T00:00:00Z"
    until_everywhere(stacks, issued["key"], "allowed")
    admin(a, "PATCH", "/api/tenants/expiring/keys/temp", {"expires_at": "2021-06-01T00:00:00Z"})
    until_everywhere(stacks, issued["key"], "expired_api_key")


def test_suspending_a_tenant_refuses_it_with_403_until_it_is_active_again(
    stacks: tuple[LocalStack, LocalStack],
) -> None:
    a, b = stacks
    create(a, "sleepy")
    key = new_key(a, "sleepy")["key"]
    until_everywhere(stacks, key, "allowed")
    assert admin(b, "PATCH", "/api/tenants/sleepy", {"status": "suspended"}).status == 200
    until_everywhere(stacks, key, "tenant_suspended")
    assert call(a, key).status == 403
    admin(a, "PATCH", "/api/tenants/sleepy", {"status": "active"})
    until_everywhere(stacks, key, "allowed")


def test_a_plan_change_brings_the_new_plans_limits(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    # free's two a minute, counted exactly from the first call served to the refusal, which
    # may come the propagation's deadline after the start.
    wait_out_a_window_end("minute", margin=15 + APPLIED_SECONDS)
    create(a, "upgrader", plan="free")
    key = new_key(a, "upgrader")["key"]
    eventually(
        lambda: outcome(call(b, key)),
        lambda seen: seen == "allowed",
        timeout=APPLIED_SECONDS,
        message="served",
    )
    assert outcome(call(b, key)) == "allowed"  # 2 of free's 2 a minute
    assert outcome(call(b, key)) == "rate_limited"
    upgraded = admin(a, "PATCH", "/api/tenants/upgrader", {"plan": "pro"})
    assert upgraded.json()["plan"] == "pro"
    applied(stacks, upgraded.json()["version"])
    assert {outcome(call(stack, key)) for stack in stacks for _ in range(3)} == {"allowed"}


def test_a_revoked_key_is_refused_by_both_instances(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "leaky")
    kept, leaked = new_key(a, "leaky", id="kept"), new_key(a, "leaky", id="leaked")
    until_everywhere(stacks, leaked["key"], "allowed")
    revoked = admin(b, "DELETE", "/api/tenants/leaky/keys/leaked")
    assert revoked.status == 200, revoked
    assert revoked.json()["revoked_at"] is not None
    proof = applied(stacks, revoked.json()["version"])
    assert len(proof) == 2
    assert everywhere(stacks, leaked["key"]) == {"revoked_api_key"}
    assert everywhere(stacks, kept["key"]) == {"allowed"}


def test_a_deleted_tenant_is_refused_and_its_usage_stays(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "leaving")
    key = new_key(a, "leaving")["key"]
    eventually(
        lambda: fetch(a.url("listen_full_port", "/v1/items"), headers={"x-api-key": key}).status,
        lambda status: status == 200,
        timeout=APPLIED_SECONDS,
        message="served through the metered listener",
    )
    eventually(
        lambda: admin(a, "GET", "/api/tenants/leaving/usage").json().get("requests", 0),
        lambda requests: requests >= 1,
        timeout=APPLIED_SECONDS,
        message="the request to be billed",
    )
    etag = admin(b, "GET", "/api/tenants/leaving").headers["etag"]
    assert admin(b, "DELETE", "/api/tenants/leaving", **{"if-match": etag}).status == 200
    until_everywhere(stacks, key, "invalid_api_key")
    assert admin(a, "GET", "/api/tenants/leaving").status == 404
    assert admin(b, "GET", "/api/tenants/leaving/usage").json()["requests"] >= 1


def test_invalid_input_is_refused_and_changes_nothing(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    before = admin(a, "GET", "/api/instances").json()["version"]
    refused = admin(
        a, "POST", "/api/tenants", {"name": "broken", "plan": "gold", "allow": {"ip": ["300.1.1.1"]}}
    )
    assert refused.status == 400
    assert refused.json()["error"] == "invalid_tenant"
    assert {p["field"] for p in refused.json()["problems"]} == {"plan", "allow.ip[0]"}
    assert admin(b, "POST", "/api/tenants", {"name": "filed", "plan": "pro"}).json()["error"] == "file_tenant"
    assert admin(a, "PATCH", "/api/tenants/filed", {"plan": "free"}).status == 409
    assert admin(a, "POST", "/api/tenants", b"[not json").status == 400
    assert admin(a, "GET", "/api/instances").json()["version"] == before
    assert admin(a, "GET", "/api/tenants/broken").status == 404


def test_a_stale_if_match_is_412_and_changes_nothing(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "contended")
    etag = admin(a, "GET", "/api/tenants/contended").headers["etag"]
    assert admin(b, "PATCH", "/api/tenants/contended", {"plan": "free"}, **{"if-match": etag}).status == 200
    stale = admin(a, "PATCH", "/api/tenants/contended", {"status": "suspended"}, **{"if-match": etag})
    assert stale.status == 412
    assert stale.json()["error"] == "precondition_failed"
    shown = admin(a, "GET", "/api/tenants/contended").json()
    assert (shown["plan"], shown["status"]) == ("free", "active")


def test_a_key_hash_already_in_use_is_refused(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "importer")
    create(a, "other-importer")
    file_hash = hashlib.sha256(FILE_KEY.encode()).hexdigest()
    taken = admin(a, "POST", "/api/tenants/importer/keys", {"sha256": file_hash})
    assert (taken.status, taken.json()["error"]) == (409, "key_in_use")
    moved = "a-key-moved-from-elsewhere"
    imported = admin(
        a,
        "POST",
        "/api/tenants/importer/keys",
        {"id": "moved", "sha256": hashlib.sha256(moved.encode()).hexdigest()},
    )
    assert imported.status == 201
    assert imported.json()["key"] is None  # imported by hash: meshtoll never had the key
    twice = admin(
        b, "POST", "/api/tenants/other-importer/keys", {"sha256": hashlib.sha256(moved.encode()).hexdigest()}
    )
    assert (twice.status, twice.json()["error"]) == (409, "key_in_use")
    until_everywhere(stacks, moved, "allowed")


def test_concurrent_changes_from_two_clients_lose_neither(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, b = stacks
    create(a, "busy")
    with ThreadPoolExecutor(8) as pool:
        issued = list(pool.map(lambda n: new_key(stacks[n % 2], "busy", id=f"k{n}"), range(16)))
    listed = admin(b, "GET", "/api/tenants/busy/keys").json()["keys"]
    assert sorted(key["id"] for key in listed) == sorted(f"k{n}" for n in range(16))
    for key in issued:
        until_everywhere(stacks, key["key"], "allowed")


def test_the_audit_names_the_token_and_never_a_key(stacks: tuple[LocalStack, LocalStack]) -> None:
    a, _ = stacks
    create(a, "audited")
    key = new_key(a, "audited", id="secret")["key"]
    entries = admin(a, "GET", "/api/audit?limit=1000").json()["entries"]
    mine = [(e["actor"], e["action"]) for e in entries if e["tenant"] == "audited"]
    assert mine == [("ops", "tenant.create"), ("ops", "key.create")]
    text = json.dumps(entries)
    assert key not in text
    assert hashlib.sha256(key.encode()).hexdigest() not in text


def test_a_redis_outage_keeps_the_known_tenants_serving_and_the_instance_catches_up(
    stacks: tuple[LocalStack, LocalStack], proxy: TcpProxy
) -> None:
    a, b = stacks
    create(a, "steady")
    steady = new_key(a, "steady", id="s")["key"]
    doomed = new_key(a, "steady", id="d")["key"]
    until_everywhere(stacks, doomed, "allowed")
    proxy.cut()
    try:
        admin(a, "DELETE", "/api/tenants/steady/keys/d")
        create(a, "newcomer")
        newcomer = new_key(a, "newcomer")["key"]
        assert outcome(call(a, doomed)) == "revoked_api_key"
        eventually(
            lambda: outcome(call(a, newcomer)), lambda s: s == "allowed", timeout=APPLIED_SECONDS, message="A"
        )
        # B cannot hear of either change, and serves what it knew; its staleness says so.
        assert outcome(call(b, steady)) == "allowed"
        assert outcome(call(b, doomed)) == "allowed"
        assert outcome(call(b, newcomer)) == "invalid_api_key"
        eventually(
            lambda: staleness(b), lambda s: s > 3, timeout=APPLIED_SECONDS, message="B's staleness to grow"
        )
    finally:
        proxy.restore()
    until_everywhere(stacks, doomed, "revoked_api_key")
    until_everywhere(stacks, newcomer, "allowed")
    eventually(lambda: staleness(b), lambda s: s < 3, timeout=APPLIED_SECONDS, message="B current again")


def staleness(stack: LocalStack) -> float:
    return value(scrape(stack.meshtoll_admin_url), "meshtoll_runtime_registry_staleness_seconds")


def test_a_restarted_instance_loads_every_tenant_before_it_is_ready(
    stacks: tuple[LocalStack, LocalStack],
) -> None:
    a, b = stacks
    keys = []
    for n in range(5):
        create(a, f"restart-{n}")
        keys.append(new_key(a, f"restart-{n}")["key"])
    b.restart("meshtoll")  # ready means /readyz says so: its tenants are loaded by then
    for key in keys:
        assert {outcome(call(b, key, listener)) for listener in LISTENERS} == {"allowed"}
