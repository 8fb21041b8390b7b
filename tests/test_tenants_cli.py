"""`meshtoll tenants` and `meshtoll keys` against a real Redis: the admin API's changes from the
command line (and `quota show`, `billing invoice` reading run-time tenants), checked against
the policy file (`keys new` without a store prints a policy
entry as before: tests/test_policy_load.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtoll.cli import main
from meshtoll.local.devstack import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("cli-redis")) as server:
        yield server


@pytest.fixture
def flags(redis: RedisServer, tmp_path: Path) -> list[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "plans:\n  free: {}\n  pro: {}\n"
        "  paid:\n    limits: [{requests: 100, per: minute}]\n"
        '    price: {currency: EUR, base_fee: "10.00", tiers: [{up_to: null, unit_price: "0.01"}]}\n'
        "tenants: {filed: {plan: pro}}\n"
    )
    return ["--policy", str(policy), "--redis-url", redis.url]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    try:
        document = json.loads(captured.out) if captured.out.strip().startswith(("{", "[")) else captured.out
    except json.JSONDecodeError:
        document = captured.out
    return status, document, captured.err


def test_a_tenant_and_its_keys_from_the_command_line(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, created, _ = run(
        capsys,
        "tenants",
        "create",
        "cli-acme",
        "--plan",
        "free",
        "--field",
        'allow={"ip": ["10.0.0.0/8"]}',
        *flags,
    )
    assert status == 0
    assert (created["name"], created["plan"], created["allow"]) == (
        "cli-acme",
        "free",
        {"ip": ["10.0.0.0/8"]},
    )
    status, issued, err = run(capsys, "keys", "new", "--tenant", "cli-acme", "--id", "ci", *flags)
    assert status == 0
    assert issued["key"].startswith("mt_live_")
    assert issued["key"] in err  # shown once, on the terminal too
    status, rolled, _ = run(
        capsys,
        "keys",
        "roll",
        "--tenant",
        "cli-acme",
        "--id",
        "ci",
        "--overlap-seconds",
        "60",
        "--new-id",
        "ci2",
        *flags,
    )
    assert (status, rolled["id"]) == (0, "ci2")
    assert rolled["rolled"]["expires_at"] is not None
    assert run(capsys, "keys", "revoke", "--tenant", "cli-acme", "--id", "ci", *flags)[0] == 0
    status, listed, _ = run(capsys, "keys", "list", "--tenant", "cli-acme", *flags)
    assert [(key["id"], key["revoked_at"] is not None) for key in listed["keys"]] == [
        ("ci", True),
        ("ci2", False),
    ]
    assert issued["key"] not in json.dumps(listed)
    status, updated, _ = run(
        capsys, "tenants", "update", "cli-acme", "--plan", "pro", "--remove", "allow", *flags
    )
    assert (status, updated["plan"], "allow" in updated) == (0, "pro", False)
    status, table, _ = run(capsys, "tenants", "list", *flags)
    assert status == 0
    assert [line.split()[:3] for line in table.splitlines()[1:]] == [
        ["cli-acme", "runtime", "pro"],
        ["filed", "file", "pro"],
    ]
    status, deleted, _ = run(capsys, "tenants", "delete", "cli-acme", *flags)
    assert (status, deleted["deleted"]) == (0, "cli-acme")


def test_invalid_changes_print_every_problem_and_exit_1(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        capsys, "tenants", "create", "cli-bad", "--plan", "gold", "--field", "limits=[{}]", *flags
    )
    assert status == 1
    assert "invalid_tenant" in err
    assert "  plan: unknown plan 'gold' (plans: free, paid, pro)" in err
    assert "  limits[0]: missing required field 'per'" in err
    status, _, err = run(capsys, "tenants", "update", "filed", "--plan", "free", *flags)
    assert (status, "file_tenant" in err) == (1, True)
    status, _, err = run(capsys, "tenants", "show", "cli-nobody", *flags)
    assert (status, "unknown_tenant" in err) == (1, True)


def test_quota_and_invoices_include_run_time_tenants(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "tenants", "create", "cli-payer", "--plan", "paid", *flags)[0] == 0
    status, quota, _ = run(capsys, "quota", "show", "--tenant", "cli-payer", "--format", "json", *flags)
    assert status == 0
    assert [(limit["name"], limit["limit"]) for limit in quota["limits"]] == [("100/minute", 100)]
    status, invoice, _ = run(
        capsys, "billing", "invoice", "--tenant", "cli-payer", "--format", "json", *flags
    )
    assert (status, invoice["currency"], invoice["total"]) == (0, "EUR", "10.00")
    status, invoices, _ = run(capsys, "billing", "invoice", "--all", "--format", "json", *flags)
    assert status == 0
    assert "cli-payer" in {bill["tenant"] for bill in invoices}


def test_usage_export_names_a_run_time_tenant_by_its_billing_block(
    flags: list[str], redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import time

    from meshtoll.storage.usage_redis import RedisUsageStore
    from meshtoll.usage.records import UsageRecord

    created = run(
        capsys,
        "tenants",
        "create",
        "cli-billed",
        "--plan",
        "paid",
        "--field",
        'billing={"openmeter_subject": "subj-9"}',
        *flags,
    )
    assert created[0] == 0
    now = time.time()

    async def record() -> None:
        store = RedisUsageStore(redis.url)
        try:
            await store.record(
                [UsageRecord("req-billed-1", now, "cli-billed", "k", "paid", "", "GET", 200, 0, 0, 1.0, 1)]
            )
        finally:
            await store.close()

    asyncio.run(record())
    window = ["--since", "2020-01-01", "--until", "2099-01-01", "--tenant", "cli-billed"]
    status, events, _ = run(capsys, "usage", "export", *window, *flags)
    assert status == 0
    event = events if isinstance(events, dict) else json.loads(events.splitlines()[0])  # one line: parsed
    assert event["subject"] == "subj-9"  # the tenant's own name without its billing block
