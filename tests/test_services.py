"""build(settings) wires every service from Settings alone: the whole decision path can be
exercised in-process, with no socket, no task and no other process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshtoll.errors import PolicyError
from meshtoll.local.dev import EXAMPLE_POLICY
from meshtoll.server.services import build
from meshtoll.settings import Settings
from meshtoll.transport.http_server import Handler

ACME_KEY = "mt_demo_acme_5f0c1e9a7b2d4e6f"  # the demo policy's acme key, on a priced plan


async def answer(handler: Handler, path: str, headers: dict[str, str]) -> bytes:
    reply = handler("GET", path, headers, "127.0.0.1")
    return reply if isinstance(reply, bytes) else await reply


async def test_built_services_decide_and_record_without_serving() -> None:
    services = await build(Settings(policy=EXAMPLE_POLICY))
    try:
        allowed = await answer(
            services.http_authz, "/v1/orders", {"x-api-key": ACME_KEY, "x-request-id": "r-1"}
        )
        refused = await answer(services.http_authz, "/v1/orders", {"x-api-key": "mt_nobody"})
        ready = await answer(services.admin, "/readyz", {})
        metrics = await answer(services.admin, "/metrics", {})
        assert allowed.startswith(b"HTTP/1.1 200 ")
        assert b"x-meshtoll-tenant: acme\r\n" in allowed
        assert refused.startswith(b"HTTP/1.1 401 ")
        assert ready.startswith(b"HTTP/1.1 200 ")
        # acme's plan has a per-second limit and a daily quota: the fused decision counted them.
        assert b'meshtoll_limit_decisions_total{outcome="admitted"} 1' in metrics
        # The admission waits in the recorder until its background flush: nothing runs yet.
        assert await services.usage.backlog() == 0
        assert set(services.background) >= {"policy watcher", "admission recorder", "reconciler"}
        assert "Redis probe" not in services.background  # counters in memory: nothing to probe
    finally:
        await services.close()


def test_an_invalid_policy_fails_the_build_with_its_problems_located(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("plans: {free: {}}\ntenants: {acme: {plan: gold}}\n")
    with pytest.raises(PolicyError, match=r"policy.yaml:2 tenants.acme.plan"):
        asyncio.run(build(Settings(policy=policy)))
