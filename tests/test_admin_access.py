"""The admin port's tenant data: a bearer token when one is set, else loopback clients only;
probes and metrics open to all."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from meshtoll.server.admin import AdminHandler
from meshtoll.server.services import build
from meshtoll.settings import Settings
from tests.client import fetch
from tests.serve import EXAMPLE_POLICY, running_serve

TOKEN = "adm-7f3c2a91e0b4d5c6"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


def loaded_handler(admin_token: str | None = None) -> AdminHandler:
    return asyncio.run(build(Settings(policy=EXAMPLE_POLICY, admin_token=admin_token))).admin


def answer(handler: AdminHandler, path: str, peer: str, headers: dict[str, str] | None = None) -> bytes:
    reply = handler("GET", path, headers or {}, peer)
    assert isinstance(reply, bytes)
    return reply


def body(reply: bytes) -> dict[str, str]:
    document: dict[str, str] = json.loads(reply.partition(b"\r\n\r\n")[2])
    return document


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.0.7", "2001:db8::1", "::ffff:10.1.2.3", ""])
def test_without_a_token_the_api_refuses_a_client_that_is_not_on_loopback(peer: str) -> None:
    refused = answer(loaded_handler(), "/api/policy", peer)
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert body(refused)["error"] == "forbidden"
    assert "--admin-token" in body(refused)["message"]
    for path in OPEN_PATHS:
        assert answer(loaded_handler(), path, peer).startswith(b"HTTP/1.1 200 "), path


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_without_a_token_the_api_answers_loopback_clients(peer: str) -> None:
    assert answer(loaded_handler(), "/api/policy", peer).startswith(b"HTTP/1.1 200 ")


def test_an_unknown_path_is_refused_before_it_is_found_missing() -> None:
    assert answer(loaded_handler(), "/api/nothing", "10.1.2.3").startswith(b"HTTP/1.1 403 ")
    assert answer(loaded_handler(), "/api/nothing", "127.0.0.1").startswith(b"HTTP/1.1 404 ")


def test_with_a_token_any_address_gets_the_api_by_presenting_it() -> None:
    handler = loaded_handler(TOKEN)
    granted = answer(handler, "/api/policy", "10.1.2.3", {"authorization": f"Bearer {TOKEN}"})
    assert granted.startswith(b"HTTP/1.1 200 ")
    assert answer(handler, "/api/policy", "10.1.2.3", {"authorization": f"bearer {TOKEN}"}).startswith(
        b"HTTP/1.1 200 "
    )
    # Loopback is no exemption once a token is set: a sidecar in the pod shares loopback.
    assert answer(handler, "/api/policy", "127.0.0.1").startswith(b"HTTP/1.1 401 ")


@pytest.mark.integration
def test_a_running_serve_with_an_admin_token_asks_every_api_call_for_it(tmp_path: Path) -> None:
    with running_serve(tmp_path, env={"MESHTOLL_ADMIN_TOKEN": TOKEN}) as serving:
        api = [f"{serving.admin_url}{path}" for path in ("/api/policy", "/api/tenants/acme/quota")]
        api += [f"{serving.admin_url}/api/tenants/acme/{report}" for report in ("usage", "invoice")]
        for url in api:
            missing = fetch(url)
            assert missing.status == 401, url
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"] == "unauthorized"
            wrong = fetch(url, headers={"authorization": f"Bearer {TOKEN}x"})
            assert wrong.status == 401, url
            assert wrong.headers["www-authenticate"].startswith("Bearer")
            assert fetch(url, headers={"authorization": "Basic " + TOKEN}).status == 401
            assert fetch(url, headers={"authorization": f"Bearer {TOKEN}"}).status == 200, url
        for path in OPEN_PATHS:
            assert fetch(f"{serving.admin_url}{path}").status == 200, path
        assert "admin /api/*: bearer token" in serving.child.log_tail()
