"""`meshtoll tenants` and `meshtoll keys` against a real Redis: the admin API's changes from the
command line, checked against the policy file (`keys new` without a store prints a policy
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
    policy.write_text("plans: {free: {}, pro: {}}\ntenants: {filed: {plan: pro}}\n")
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
    assert "  plan: unknown plan 'gold' (plans: free, pro)" in err
    assert "  limits[0]: missing required field 'per'" in err
    status, _, err = run(capsys, "tenants", "update", "filed", "--plan", "free", *flags)
    assert (status, "file_tenant" in err) == (1, True)
    status, _, err = run(capsys, "tenants", "show", "cli-nobody", *flags)
    assert (status, "unknown_tenant" in err) == (1, True)
