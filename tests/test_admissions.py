"""authz records an admission for every request it lets through, whoever the tenant; one
without a request id cannot be billed, and says so once."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import Allow, CheckRequest
from meshtoll.policy.reload import PolicyHolder
from meshtoll.storage import MemoryUsageStore
from meshtoll.usage.recorder import AdmissionRecorder

KEY = "k-admitted"


@pytest.fixture
def authorizer(tmp_path: Path) -> tuple[Authorizer, MemoryUsageStore, AdmissionRecorder]:
    path = tmp_path / "policy.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(
        "plans: {free: {}}\n"  # no price: admitted and metered all the same
        f"tenants: {{acme: {{plan: free, api_keys: [{{id: ci, sha256: {digest}}}]}}}}\n"
        "routes: [{prefix: /v1/chat/, name: chat, hooks: {usage_from_body: usage.total_tokens}}, "
        "{prefix: /v1/, name: v1, cost: 3}]\n"
    )
    store = MemoryUsageStore()
    recorder = AdmissionRecorder(store)
    return Authorizer(PolicyHolder.from_file(path), JwksCache(), recorder=recorder), store, recorder


def request(path: str, request_id: str | None) -> CheckRequest:
    headers = {"x-api-key": KEY} | ({} if request_id is None else {"x-request-id": request_id})
    return CheckRequest("GET", path, headers, "127.0.0.1")


async def test_every_allowed_request_of_every_plan_is_admitted_with_its_routes_terms(
    authorizer: tuple[Authorizer, MemoryUsageStore, AdmissionRecorder],
) -> None:
    check, store, recorder = authorizer
    assert isinstance(check.check(request("/v1/items", "r1")), Allow)
    assert isinstance(check.check(request("/v1/chat/completions", "r2")), Allow)
    await recorder.flush()
    found = await store.pending([("acme", "r1"), ("acme", "r2")])
    assert [(a.route, a.plan, a.units, a.awaits_report) for a, _ in found.values()] == [
        ("v1", "free", 3, False),
        ("chat", "free", 1, True),
    ]


async def test_an_allowed_request_without_a_request_id_is_not_admitted_and_warned_about_once(
    authorizer: tuple[Authorizer, MemoryUsageStore, AdmissionRecorder], caplog: pytest.LogCaptureFixture
) -> None:
    check, store, recorder = authorizer
    with caplog.at_level(logging.WARNING, logger="meshtoll.authz"):
        for _ in range(3):
            assert isinstance(check.check(request("/v1/items", None)), Allow)
    await recorder.flush()
    assert await store.backlog() == 0
    assert caplog.text.count("without x-request-id") == 1
