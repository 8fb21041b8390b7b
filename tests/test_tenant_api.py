"""The tenant API in-process, on the memory registry: every endpoint's answers, refusals
that change nothing, optimistic concurrency, admin token scopes, and what never leaves
(a key after it is shown once, a key's hash)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from meshtoll.server.services import Services, build
from meshtoll.settings import Settings
from tests.tenant_policy import FILE_KEY, POLICY


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    built = await build(Settings(policy=path))
    yield built
    await built.close()


async def call(
    services: Services, method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    reply = services.admin(method, target, headers or {}, "127.0.0.1", raw)
    if not isinstance(reply, bytes):
        reply = await reply
    head, _, content = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    found = dict(line.split(": ", 1) for line in lines[1:])
    return status, found, json.loads(content) if content else None


async def test_a_tenant_is_created_read_listed_and_served_by_this_instance(services: Services) -> None:
    status, headers, created = await call(
        services, "POST", "/api/tenants", {"name": "globex", "plan": "free"}
    )
    assert status == 201, created
    assert headers["etag"] == f'"{created["version"]}"'
    assert (created["name"], created["source"], created["plan"], created["status"]) == (
        "globex",
        "runtime",
        "free",
        "active",
    )
    status, headers, shown = await call(services, "GET", "/api/tenants/globex")
    assert status == 200
    assert shown["version"] == created["version"]
    listed = (await call(services, "GET", "/api/tenants"))[2]
    assert [(t["name"], t["source"]) for t in listed["tenants"]] == [("acme", "file"), ("globex", "runtime")]


async def test_invalid_input_is_refused_with_every_problem_and_nothing_changes(services: Services) -> None:
    body = {"name": "bad name", "plan": "gold", "allow": {"ip": ["10.0.0/8"]}, "colour": "blue"}
    status, _, refused = await call(services, "POST", "/api/tenants", body)
    assert status == 400
    assert refused["error"] == "invalid_tenant"
    fields = {problem["field"] for problem in refused["problems"]}
    assert "name" in fields
    status, _, refused = await call(
        services,
        "POST",
        "/api/tenants",
        {"name": "ok", "plan": "gold", "allow": {"ip": ["10.0.0/8"]}, "colour": "blue"},
    )
    assert status == 400
    assert {p["field"]: p["message"] for p in refused["problems"]} == {
        "plan": "unknown plan 'gold' (plans: free, pro)",
        "allow.ip[0]": "'10.0.0/8' is not a CIDR",
        "colour": "unknown field (expected one of: plan, status, api_keys, jwt, mtls, allow, limits, billing)",
    }
    assert (await call(services, "POST", "/api/tenants", b"{not json"))[0] == 400
    assert (await call(services, "POST", "/api/tenants", {"name": "k", "plan": "free", "api_keys": []}))[
        0
    ] == 400
    assert (await services.tenants.registry.head())[0] == 0  # type: ignore[union-attr]


async def test_file_tenants_are_read_only_and_their_names_taken(services: Services) -> None:
    status, _, refused = await call(services, "POST", "/api/tenants", {"name": "acme", "plan": "free"})
    assert (status, refused["error"]) == (409, "file_tenant")
    status, _, refused = await call(services, "PATCH", "/api/tenants/acme", {"plan": "free"})
    assert (status, refused["error"]) == (409, "file_tenant")
    status, _, shown = await call(services, "GET", "/api/tenants/acme")
    assert (status, shown["source"], shown["keys"]) == (200, "file", [{"id": "acme-ci", "revoked": False}])


async def test_a_stale_if_match_gets_412_and_changes_nothing(services: Services) -> None:
    created = (await call(services, "POST", "/api/tenants", {"name": "globex", "plan": "free"}))[2]
    etag = f'"{created["version"]}"'
    status, _headers, updated = await call(
        services, "PATCH", "/api/tenants/globex", {"plan": "pro"}, {"if-match": etag}
    )
    assert (status, updated["plan"]) == (200, "pro")
    status, _, refused = await call(
        services, "PATCH", "/api/tenants/globex", {"status": "suspended"}, {"if-match": etag}
    )
    assert (status, refused["error"], refused["version"]) == (412, "precondition_failed", updated["version"])
    assert (await call(services, "DELETE", "/api/tenants/globex", None, {"if-match": etag}))[0] == 412
    assert (await call(services, "GET", "/api/tenants/globex"))[2]["status"] == "active"


async def test_keys_are_shown_once_and_listed_without_key_or_hash(services: Services) -> None:
    await call(services, "POST", "/api/tenants", {"name": "globex", "plan": "free"})
    status, _, issued = await call(services, "POST", "/api/tenants/globex/keys", {"id": "ci"})
    assert status == 201
    key = issued["key"]
    assert key.startswith("mt_live_")
    assert issued["hint"] == key[:12] + "..."
    listing = (await call(services, "GET", "/api/tenants/globex/keys"))[2]
    text = json.dumps(listing)
    assert key not in text
    assert hashlib.sha256(key.encode()).hexdigest() not in text
    assert [k["id"] for k in listing["keys"]] == ["ci"]
    audit = json.dumps((await call(services, "GET", "/api/audit"))[2])
    assert key not in audit
    assert hashlib.sha256(key.encode()).hexdigest() not in audit


async def test_a_key_hash_any_tenant_has_is_refused(services: Services) -> None:
    await call(services, "POST", "/api/tenants", {"name": "globex", "plan": "free"})
    await call(services, "POST", "/api/tenants", {"name": "initech", "plan": "free"})
    file_hash = hashlib.sha256(FILE_KEY.encode()).hexdigest()
    status, _, refused = await call(services, "POST", "/api/tenants/globex/keys", {"sha256": file_hash})
    assert (status, refused["error"]) == (409, "key_in_use")
    runtime_hash = hashlib.sha256(b"moved-key").hexdigest()
    assert (await call(services, "POST", "/api/tenants/globex/keys", {"sha256": runtime_hash}))[0] == 201
    status, _, refused = await call(services, "POST", "/api/tenants/initech/keys", {"sha256": runtime_hash})
    assert (status, refused["error"]) == (409, "key_in_use")


async def test_a_read_token_may_read_and_not_change(tmp_path: Path) -> None:
    read, write = "read-token-123", "write-token-456"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - {{name: dashboard, scope: read, sha256: {hashlib.sha256(read.encode()).hexdigest()}}}\n"
        f"  - {{name: ops, scope: write, sha256: {hashlib.sha256(write.encode()).hexdigest()}}}\n"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    services = await build(Settings(policy=path, admin_tokens_file=tokens))
    try:
        as_read = {"authorization": f"Bearer {read}"}
        status, _, refused = await call(
            services, "POST", "/api/tenants", {"name": "g", "plan": "free"}, as_read
        )
        assert (status, refused["error"]) == (403, "insufficient_scope")
        assert (await call(services, "GET", "/api/tenants", None, as_read))[0] == 200
        as_write = {"authorization": f"Bearer {write}"}
        assert (await call(services, "POST", "/api/tenants", {"name": "g", "plan": "free"}, as_write))[
            0
        ] == 201
        entries = (await call(services, "GET", "/api/audit", None, as_read))[2]["entries"]
        assert [(e["actor"], e["action"], e["tenant"]) for e in entries] == [("ops", "tenant.create", "g")]
        assert (await call(services, "GET", "/api/tenants", None, {"authorization": "Bearer nope"}))[0] == 401
    finally:
        await services.close()


def test_the_tokens_file_is_validated_with_located_errors(tmp_path: Path) -> None:
    from meshtoll.errors import PolicyError
    from meshtoll.server.admin_tokens import load_admin_tokens

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n  - {name: ops, scope: admin, sha256: abc}\n  - {name: admin, scope: read, sha256: '"
        + "0" * 64
        + "'}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_admin_tokens(tokens)
    assert [str(problem) for problem in caught.value.problems] == [
        f"{tokens}:2 tokens[0].scope: expected one of read, write, got 'admin'",
        f"{tokens}:2 tokens[0].sha256: expected 64 lower-case hex digits (the SHA-256 of the token)",
        f"{tokens}:3 tokens[1].name: 'admin' is MESHTOLL_ADMIN_TOKEN's name",
    ]


async def test_the_listing_pages_with_an_opaque_cursor_and_filters(services: Services) -> None:
    for n in range(7):
        await call(services, "POST", "/api/tenants", {"name": f"t{n}", "plan": "pro" if n % 2 else "free"})
    seen: list[str] = []
    cursor = ""
    while True:
        page = (await call(services, "GET", f"/api/tenants?limit=3&cursor={cursor}"))[2]
        seen += [t["name"] for t in page["tenants"]]
        if page["next"] is None:
            break
        cursor = page["next"]
    assert seen == ["acme", *(f"t{n}" for n in range(7))]
    pro = (await call(services, "GET", "/api/tenants?plan=pro&limit=100"))[2]
    assert [t["name"] for t in pro["tenants"]] == ["acme", "t1", "t3", "t5"]


async def test_a_bad_audit_cursor_or_page_size_is_400(services: Services) -> None:
    for query in ("since=not-a-cursor", "since=1-2-3", "limit=0", "limit=x", "since=2026-13-01T00:00:00Z"):
        status, _, refused = await call(services, "GET", f"/api/audit?{query}")
        assert (status, refused["error"]) == (400, "bad_query"), query
    for query in ("limit=0", "limit=1001", "cursor=%%%"):
        assert (await call(services, "GET", f"/api/tenants?{query}"))[0] == 400, query


async def test_the_tokens_file_is_reloaded_and_a_bad_version_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def line(name: str, scope: str, token: str) -> str:
        return f"  - {{name: {name}, scope: {scope}, sha256: {hashlib.sha256(token.encode()).hexdigest()}}}\n"

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n" + line("ops", "write", "first-token") + line("ci", "write", "second-token"))
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    services = await build(Settings(policy=path, admin_tokens_file=tokens, policy_poll_seconds=0.05))
    watching = asyncio.create_task(services.background["admin tokens watcher"]())

    async def status_of(token: str) -> int:
        return (await call(services, "GET", "/api/tenants", None, {"authorization": f"Bearer {token}"}))[0]

    async def until(probe: Callable[[], Awaitable[bool]], message: str) -> None:
        deadline = time.monotonic() + 10
        while not await probe():
            if time.monotonic() > deadline:
                pytest.fail(f"{message} (waited 10 s)")
            await asyncio.sleep(0.05)

    try:
        assert await status_of("first-token") == 200
        tokens.write_text("tokens:\n" + line("ci", "write", "second-token"))
        await until(lambda: _is(status_of("first-token"), 401), "the removed token to be refused")
        assert await status_of("second-token") == 200
        tokens.write_text("tokens: [{name: broken}]\n")
        await until(lambda: _now("new version rejected" in caplog.text), "the bad version to be rejected")
        assert await status_of("second-token") == 200
    finally:
        watching.cancel()
        await services.close()


async def _is(pending: Awaitable[int], expected: int) -> bool:
    return await pending == expected


async def _now(value: bool) -> bool:
    return value


async def test_a_run_time_tenants_billing_block_is_the_files_and_names_it_to_the_sinks(
    services: Services,
) -> None:
    body = {"name": "payer", "plan": "pro", "billing": {"stripe_customer": "cus_123", "lago_subscription": 7}}
    status, _, refused = await call(services, "POST", "/api/tenants", body)
    assert status == 400
    assert [p["field"] for p in refused["problems"]] == ["billing.lago_subscription"]
    del body["billing"]["lago_subscription"]  # type: ignore[attr-defined]
    status, _, created = await call(services, "POST", "/api/tenants", body)
    assert (status, created["billing"]) == (201, {"stripe_customer": "cus_123"})
    billing = services.policy.current.billing
    assert (billing.account("payer", "stripe"), billing.account("payer", "lago")) == ("cus_123", "payer")
