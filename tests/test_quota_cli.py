"""`meshtoll quota show`: each limit of a tenant with used / remaining / reset, from Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.policy import load_policy
from meshtoll.storage.redis import RedisCounterStore

pytestmark = pytest.mark.integration  # every test reads and writes the session's Redis

POLICY = """
plans: {team: {limits: [{requests: 10, per: minute}, {requests: 500, per: month, name: monthly}]}}
tenants: {quotacli: {plan: team}}
routes: [{prefix: /v1/search, name: search, limits: [{requests: 2, per: second, algorithm: token_bucket}]}]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def consume(policy: Path, redis_url: str, times: int) -> None:
    checks = load_policy(policy).limits.checks("quotacli", "search", where="authz")

    async def run() -> None:
        store = RedisCounterStore(redis_url, timeout_ms=500)
        try:
            for _ in range(times):
                await store.check(checks, time.time())
        finally:
            await store.close()

    asyncio.run(run())


def test_quota_show_prints_each_limit_with_its_use(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    consume(policy, redis_url, 2)
    assert (
        main(["quota", "show", "--tenant", "quotacli", "--policy", str(policy), "--redis-url", redis_url])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tenant quotacli (plan team)"
    assert lines[1].split() == [
        "limit",
        "scope",
        "algorithm",
        "used",
        "remaining",
        "of",
        "per",
        "resets",
        "in",
    ]
    assert lines[2].split()[:7] == ["10/minute", "tenant", "fixed_window", "2", "8", "10", "minute"]
    assert lines[3].split()[:7] == ["monthly", "tenant", "fixed_window", "2", "498", "500", "month"]
    assert lines[4].split()[:7] == ["2/second", "route:search", "token_bucket", "2", "0", "2", "second"]


def test_quota_show_as_json_matches_the_admin_api_shape(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["quota", "show", "--tenant", "quotacli", "--policy", str(policy), "--redis-url", redis_url]
    assert main([*arguments, "--format", "json"]) == 0
    quota = json.loads(capsys.readouterr().out)
    assert quota["tenant"] == "quotacli"
    assert set(quota["limits"][0]) >= {
        "name",
        "algorithm",
        "limit",
        "per",
        "used",
        "remaining",
        "reset_seconds",
    }


def test_quota_show_names_an_unknown_tenant_and_a_missing_redis(
    policy: Path, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        main(["quota", "show", "--tenant", "nobody", "--policy", str(policy), "--redis-url", redis_url]) == 1
    )
    assert "no tenant 'nobody'" in capsys.readouterr().err
    monkeypatch.delenv("MESHTOLL_REDIS_URL", raising=False)
    assert main(["quota", "show", "--tenant", "quotacli", "--policy", str(policy)]) == 1
    assert "give --redis-url or MESHTOLL_REDIS_URL" in capsys.readouterr().err
