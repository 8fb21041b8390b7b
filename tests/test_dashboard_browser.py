"""The dashboard in a real browser (Debian's headless chromium, driven by Playwright) against a
local stack: Envoy, meshtoll and its own Redis. Traffic goes through Envoy; what the pages
show is checked against that traffic, against the JSON API and against `meshtoll billing
invoice`; a key issued in the browser authenticates through Envoy and, once revoked there,
gets 401. Screenshots of every page are kept in tests/artifacts/dashboard/ (ignored by git).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_sync

from meshtoll.local.devstack import LocalStack, RedisServer
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration


CHROMIUM = "/usr/bin/chromium"
# What this machine's chromium needs to start headless as root with no network beyond loopback.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"
OPS_TOKEN = "ops-dashboard-token-7c2e51"
VIEWER_TOKEN = "viewer-dashboard-token-93a0d4"
FILE_KEY = "filed-dashboard-key-1f2e3d"
TRAFFIC = 3
APPLIED_SECONDS = 20.0  # a deadline for a change to reach the instance, not an expectation


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # Its own Redis: the overview lists every tenant of the registry, and these are its.
    with RedisServer(tmp_path_factory.mktemp("dashboard-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("dashboard-files")
    policy = directory / "policy.yaml"
    policy.write_text(f"""
plans:
  free: {{limits: [{{requests: 2, per: minute}}]}}
  pro:
    limits: [{{requests: 1000, per: minute}}, {{units: 100000, per: month, name: monthly_units}}]
    price: {{currency: EUR, base_fee: "49.00", included_units: 1, tiers: [{{up_to: null, unit_price: "0.25"}}]}}
tenants:
  filed: {{plan: pro, api_keys: [{{id: f, sha256: {hashlib.sha256(FILE_KEY.encode()).hexdigest()}}}]}}
routes: [{{prefix: /v1/search, cost: 5, name: search}}, {{prefix: /v1/, name: v1}}]
""")
    tokens = directory / "tokens.yaml"
    lines = [
        f"  - {{name: {name}, scope: {scope}, sha256: {hashlib.sha256(token.encode()).hexdigest()}}}"
        for name, scope, token in (("ops", "write", OPS_TOKEN), ("viewer", "read", VIEWER_TOKEN))
    ]
    tokens.write_text("tokens:\n" + "\n".join(lines) + "\n")
    return policy, tokens


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, redis: RedisServer, files: tuple[Path, Path]) -> LocalStack:
    policy, tokens = files
    return start_stack(policy, redis_url=redis.url, serve_args=("--admin-tokens-file", str(tokens)))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which("chromium") is None:
        pytest.fail("chromium is missing: scripts/test installs it (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def api(stack: LocalStack, path: str, token: str = OPS_TOKEN) -> Reply:
    return fetch(f"{stack.meshtoll_admin_url}{path}", headers={"authorization": f"Bearer {token}"})


def through_envoy(stack: LocalStack, key: str, path: str = "/v1/items") -> int:
    return fetch(stack.url("listen_full_port", path), headers={"x-api-key": key}).status


def signed_in(browser: Any, stack: LocalStack, token: str) -> Any:
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.goto(f"{stack.meshtoll_admin_url}/")
    assert page.url.startswith(f"{stack.meshtoll_admin_url}/login")  # sent to sign in first
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_selector("#figures")
    return page


def shoot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_pages_show_the_traffic_sent_through_envoy_and_the_cli_invoice(
    stack: LocalStack, browser: Any, files: tuple[Path, Path], redis: RedisServer
) -> None:
    for path in ("/v1/items", "/v1/items", "/v1/search"):
        assert through_envoy(stack, FILE_KEY, path) == 200
    eventually(
        lambda: api(stack, "/api/tenants/filed/usage").json().get("requests"),
        lambda requests: requests == TRAFFIC,
        timeout=APPLIED_SECONDS,
        message=f"the meter to count the {TRAFFIC} requests",
    )
    page = signed_in(browser, stack, OPS_TOKEN)
    row = page.locator("#tenants tr", has_text="filed")
    assert row.locator("td").nth(4).inner_text() == str(TRAFFIC)
    allowed = int(page.inner_text("#allowed").replace(",", ""))
    assert allowed >= TRAFFIC
    shoot(page, "overview")
    # The page refreshes its figures itself: one more request shows without a reload.
    assert through_envoy(stack, FILE_KEY) == 200
    eventually(lambda: int(page.inner_text("#allowed").replace(",", "")), lambda now: now > allowed,
               timeout=APPLIED_SECONDS, message="the overview to refresh its figures")  # fmt: skip
    assert page.inner_text("#rps") != "—"
    assert page.inner_text("#latency").endswith(" µs")  # from the decision latency histogram

    page.click("#tenants a:text-is('filed')")
    page.wait_for_selector("#invoice-total")
    eventually(lambda: api(stack, "/api/tenants/filed/usage").json().get("requests"),
               lambda requests: requests == TRAFFIC + 1, timeout=APPLIED_SECONDS,
               message="the meter to count the request sent while the overview was open")  # fmt: skip
    page.reload()
    assert page.inner_text("#requests") == str(TRAFFIC + 1)
    assert page.inner_text("#units") == "8"  # three requests of cost 1 and one of cost 5
    policy, _ = files
    invoice = subprocess.run(
        [sys.executable, "-m", "meshtoll", "billing", "invoice", "--tenant", "filed", "--policy", str(policy),
         "--redis-url", redis.url, "--format", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    total = json.loads(invoice.stdout)["total"]
    assert total == "50.75"  # 49.00 + (8 - 1 included) x 0.25
    assert page.inner_text("#invoice-total") == total
    routes = page.locator("#top-routes tbody tr").all_inner_texts()
    assert routes[0].split("\t")[:2] == ["v1", "3"]
    shoot(page, "tenant")

    page.click("nav a:text-is('Policy')")
    page.wait_for_selector("#policy-version")
    assert page.inner_text("#policy-version") == str(api(stack, "/api/policy").json()["version"])
    page.context.close()


def test_a_key_issued_in_the_browser_works_through_envoy_until_it_is_revoked_there(
    stack: LocalStack, browser: Any
) -> None:
    page = signed_in(browser, stack, OPS_TOKEN)
    page.fill("#create-tenant input[name=name]", "webco")
    page.select_option("#create-tenant select[name=plan]", "free")
    page.click("#create-tenant button")
    page.wait_for_selector("#issue-key")
    assert page.inner_text("#tenant-name") == "webco"
    page.fill("#issue-key input[name=id]", "browser")
    page.click("#issue-key button")
    key = page.inner_text("#issued-key")
    assert key.startswith("mt_live_")
    shoot(page, "key-issued")
    eventually(lambda: through_envoy(stack, key), lambda status: status == 200, timeout=APPLIED_SECONDS,
               message="the key issued in the browser to authenticate through Envoy")  # fmt: skip
    # The free plan allows 2 a minute: the next refusals are the tenant's recent denials.
    statuses = [through_envoy(stack, key) for _ in range(3)]
    assert 429 in statuses, statuses
    page.reload()
    assert "rate_limited" in page.inner_text("#denials")
    assert key not in page.content()  # the key was shown once
    page.click("tr[data-key=browser] button.danger")
    page.wait_for_selector("#keys")
    assert page.locator("tr[data-key=browser] td").nth(5).inner_text() != ""  # revoked_at
    eventually(lambda: through_envoy(stack, key), lambda status: status == 401, timeout=APPLIED_SECONDS,
               message="the key revoked in the browser to get 401 through Envoy")  # fmt: skip
    entries = api(stack, "/api/audit").json()["entries"]
    assert [(e["actor"], e["action"]) for e in entries if e["tenant"] == "webco"] == [
        ("ops", "tenant.create"),
        ("ops", "key.create"),
        ("ops", "key.revoke"),
    ]
    page.context.close()


def test_a_read_token_sees_no_forms_and_cannot_post_one(stack: LocalStack, browser: Any) -> None:
    page = signed_in(browser, stack, VIEWER_TOKEN)
    assert page.locator("#create-tenant").count() == 0
    page.goto(f"{stack.meshtoll_admin_url}/tenants/webco")
    assert page.locator("#issue-key").count() == 0
    csrf = page.input_value("header input[name=csrf]")  # the sign-out form's: a valid one
    answer = page.request.post(
        f"{stack.meshtoll_admin_url}/tenants/webco/status",
        form={"csrf": csrf, "status": "suspended"},
        max_redirects=0,
    )
    assert answer.status == 403
    assert api(stack, "/api/tenants/webco").json()["status"] == "active"
    page.context.close()


def test_a_form_with_another_csrf_token_is_refused_and_markup_stays_text(
    stack: LocalStack, browser: Any
) -> None:
    page = signed_in(browser, stack, OPS_TOKEN)
    page.evaluate("document.querySelector('#create-tenant input[name=csrf]').value = '0'.repeat(64)")
    page.fill("#create-tenant input[name=name]", "forged")
    page.select_option("#create-tenant select[name=plan]", "free")
    page.click("#create-tenant button")
    assert "CSRF" in page.inner_text("main")
    assert api(stack, "/api/tenants/forged").status == 404

    page.goto(f"{stack.meshtoll_admin_url}/")
    page.fill(
        "#create-tenant input[name=name]", "<img src=x onerror=window.pwned=1><script>window.pwned=1</script>"
    )
    page.select_option("#create-tenant select[name=plan]", "free")
    page.click("#create-tenant button")
    assert "<script>window.pwned=1</script>" in page.inner_text(".refusal")  # shown as text
    assert page.evaluate("window.pwned") is None
    page.context.close()


def test_the_policy_page_shows_the_last_rejected_version_with_its_located_problems(
    stack: LocalStack, browser: Any, files: tuple[Path, Path]
) -> None:
    policy, _ = files
    good = policy.read_text()
    policy.write_text(
        good.replace("tenants:\n", 'tenants:\n  "<script>window.pwned=1</script>": {plan: gold}\n')
    )
    eventually(lambda: api(stack, "/api/policy").json()["rejected_versions"], timeout=APPLIED_SECONDS,
               message="the bad policy version to be rejected")  # fmt: skip
    page = signed_in(browser, stack, VIEWER_TOKEN)
    page.click("nav a:text-is('Policy')")
    problems = page.locator("#rejection tbody tr").all_inner_texts()
    assert any("<script>window.pwned=1</script>" in problem for problem in problems), problems
    assert all(problem.split("\t")[1].isdigit() for problem in problems), "each problem has its line"
    assert page.evaluate("window.pwned") is None
    assert page.inner_text("#policy-version") == "1"  # the good version stayed
    shoot(page, "policy")
    page.context.close()
    policy.write_text(good)
