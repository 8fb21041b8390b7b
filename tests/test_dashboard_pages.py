"""The dashboard in-process: signing in with an admin token for a session cookie, what a read
token may do, CSRF on every form, escaping of everything a name, a route or a policy error
could inject, and pages rendered from the documents the JSON API serves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from meshtoll.server.admin import AdminHandler
from meshtoll.server.services import Services, build
from meshtoll.settings import Settings
from tests.serve import EXAMPLE_POLICY

WRITE_TOKEN = "dash-write-5b1e0c9d7a3f42e8"
READ_TOKEN = "dash-read-0f9e8d7c6b5a4321"
SECRET = "s" * 40
PEER = "10.2.3.4"  # not loopback: tokens are what lets it in


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    lines = ["tokens:"]
    for name, scope, token in (("ops", "write", WRITE_TOKEN), ("viewer", "read", READ_TOKEN)):
        digest = hashlib.sha256(token.encode()).hexdigest()
        lines.append(f"  - {{name: {name}, scope: {scope}, sha256: {digest}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Browser:
    """A cookie jar over the admin handler, on one event loop."""

    def __init__(self, services: Services, loop: asyncio.AbstractEventLoop, peer: str = PEER) -> None:
        self.admin: AdminHandler = services.admin
        self.loop = loop
        self.peer = peer
        self.cookie = ""

    def request(
        self, method: str, target: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        sent.setdefault("host", "admin.test")
        if self.cookie:
            sent["cookie"] = self.cookie
        body = urlencode(form or {}).encode()
        reply = self.admin(method, target, sent, self.peer, body)
        raw = reply if isinstance(reply, bytes) else self.loop.run_until_complete(_wait(reply))
        head, _, content = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        answer_headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            answer_headers[name.lower()] = value
        if "set-cookie" in answer_headers:
            self.cookie = answer_headers["set-cookie"].partition(";")[0]
        return int(lines[0].split(" ")[1]), answer_headers, content.decode()

    def csrf(self, page: str) -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert found is not None, page
        return found.group(1)

    def sign_in(self, token: str) -> None:
        status, headers, _ = self.request(
            "POST", "/login", {"token": token, "next": "/"}, origin="http://admin.test"
        )
        assert status == 303, headers


async def _wait(reply: Awaitable[bytes]) -> bytes:
    return await reply


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Services, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    settings = Settings(
        policy=EXAMPLE_POLICY, admin_tokens_file=tokens_file(tmp_path), dashboard_secret=SECRET
    )
    services = loop.run_until_complete(build(settings))
    yield services, loop
    loop.run_until_complete(services.close())
    loop.close()


def test_a_page_without_a_session_sends_the_browser_to_sign_in(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    browser = Browser(*served)
    status, headers, _ = browser.request("GET", "/tenants/acme")
    assert status == 303
    assert headers["location"] == "/login?next=%2Ftenants%2Facme"
    status, _, page = browser.request("GET", "/login")
    assert status == 200
    assert 'type="password" name="token"' in page


def test_a_wrong_token_gets_no_session(served: tuple[Services, asyncio.AbstractEventLoop]) -> None:
    browser = Browser(*served)
    status, headers, page = browser.request("POST", "/login", {"token": WRITE_TOKEN + "x"})
    assert status == 401
    assert "set-cookie" not in headers
    assert "not an admin token" in page


def test_signing_in_gives_an_http_only_same_site_cookie_that_holds_no_token(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    browser = Browser(*served)
    status, headers, _ = browser.request("POST", "/login", {"token": READ_TOKEN, "next": "/policy"})
    assert status == 303
    assert headers["location"] == "/policy"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # plain HTTP; behind a TLS proxy it is added:
    assert READ_TOKEN not in cookie
    assert READ_TOKEN not in headers["location"]
    status, _, page = browser.request("GET", "/policy")
    assert status == 200
    assert "viewer (read)" in page
    _, headers, _ = Browser(*served).request(
        "POST", "/login", {"token": READ_TOKEN}, x_forwarded_proto="https"
    )
    assert "; Secure" in headers["set-cookie"]


def test_after_sign_in_only_a_local_path_is_followed(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        _, headers, _ = Browser(*served).request("POST", "/login", {"token": READ_TOKEN, "next": target})
        assert headers["location"] == "/", target


def test_a_forged_or_altered_cookie_is_no_session(served: tuple[Services, asyncio.AbstractEventLoop]) -> None:
    browser = Browser(*served)
    browser.sign_in(READ_TOKEN)
    name, _, rest = browser.cookie.partition("=")
    encoded, expiry, nonce, mac = rest.split(".")
    for forged in (
        f"{name}=b3Bz.{expiry}.{nonce}.{mac}",  # "ops", the write token's name, under the read session's MAC
        f"{name}={encoded}.{int(expiry) + 10**6}.{nonce}.{mac}",  # a later expiry
        f"{name}={encoded}.{expiry}.{nonce}.{mac[:-2]}AA",
        f"{name}={encoded}.{expiry}.{nonce}",
        f"{name}=",
    ):
        browser.cookie = forged
        assert browser.request("GET", "/")[0] == 303, forged


def test_a_read_token_may_look_but_not_act(served: tuple[Services, asyncio.AbstractEventLoop]) -> None:
    browser = Browser(*served)
    browser.sign_in(READ_TOKEN)
    status, _, page = browser.request("GET", "/")
    assert status == 200
    assert 'id="create-tenant"' not in page  # no forms offered
    csrf = browser.csrf(page)  # the sign-out form's
    status, _, page = browser.request(
        "POST", "/tenants", {"csrf": csrf, "name": "viewer-made", "plan": "free"}, origin="http://admin.test"
    )
    assert status == 403
    assert "may read, not change" in page
    _, _, page = browser.request("GET", "/")
    assert "viewer-made" not in page


def test_every_form_needs_the_sessions_csrf_token_and_this_origin(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    browser = Browser(*served)
    browser.sign_in(WRITE_TOKEN)
    _, _, page = browser.request("GET", "/")
    csrf = browser.csrf(page)
    form = {"name": "csrf-made", "plan": "free"}
    refused = [
        browser.request("POST", "/tenants", form),
        browser.request("POST", "/tenants", {**form, "csrf": "0" * 64}),
        browser.request("POST", "/tenants", {**form, "csrf": csrf}, origin="http://evil.example"),
        browser.request("POST", "/tenants", {**form, "csrf": csrf}, sec_fetch_site="cross-site"),
    ]
    assert [status for status, _, _ in refused] == [403, 403, 403, 403]
    other = Browser(*served)
    other.sign_in(WRITE_TOKEN)
    assert other.request("POST", "/tenants", {**form, "csrf": csrf})[0] == 403  # another session's
    _, _, page = browser.request("GET", "/")
    assert "csrf-made" not in page
    status, headers, _ = browser.request(
        "POST", "/tenants", {**form, "csrf": csrf}, origin="http://admin.test"
    )
    assert status == 303
    assert headers["location"] == "/tenants/csrf-made"


def test_a_change_made_in_the_dashboard_is_audited_under_the_tokens_name(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    browser = Browser(*served)
    browser.sign_in(WRITE_TOKEN)
    csrf = browser.csrf(browser.request("GET", "/")[2])
    browser.request("POST", "/tenants", {"csrf": csrf, "name": "audited", "plan": "free"})
    status, _, page = browser.request("POST", "/tenants/audited/keys", {"csrf": csrf, "id": "ci"})
    assert status == 201
    key = re.search(r'id="issued-key" class="key">([^<]+)<', page)
    assert key is not None
    assert key.group(1).startswith("mt_live_")
    status, _, page = browser.request("GET", "/tenants/audited")
    assert key.group(1) not in page  # shown once
    services, loop = served
    reply = services.admin("GET", "/api/audit", {"authorization": f"Bearer {READ_TOKEN}"}, PEER, b"")
    raw = reply if isinstance(reply, bytes) else loop.run_until_complete(_wait(reply))
    entries = json.loads(raw.partition(b"\r\n\r\n")[2])["entries"]
    assert [(e["actor"], e["action"], e["tenant"]) for e in entries] == [
        ("ops", "tenant.create", "audited"),
        ("ops", "key.create", "audited"),
    ]


def test_a_name_that_is_markup_is_shown_as_text(served: tuple[Services, asyncio.AbstractEventLoop]) -> None:
    browser = Browser(*served)
    browser.sign_in(WRITE_TOKEN)
    csrf = browser.csrf(browser.request("GET", "/")[2])
    status, _, page = browser.request(
        "POST", "/tenants", {"csrf": csrf, "name": "<script>alert(1)</script>", "plan": "free"}
    )
    assert status == 400
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    status, _, page = browser.request("GET", "/tenants/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert status == 404
    assert "&lt;script&gt;" in page
    assert "<script>alert" not in page


def test_a_rejected_policy_shows_its_located_problems_as_text(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(EXAMPLE_POLICY.read_text())

    async def scenario() -> str:
        services = await build(Settings(policy=policy, dashboard_secret=SECRET))
        bad_tenant = 'tenants:\n  "<img src=x onerror=alert(1)>":\n    plan: free\n'
        policy.write_text(EXAMPLE_POLICY.read_text().replace("tenants:\n", bad_tenant, 1))
        watcher = asyncio.create_task(services.policy.watch(0.01))
        try:
            async with asyncio.timeout(30):
                while services.policy.last_rejection is None:
                    await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
        reply = services.admin("GET", "/policy", {"host": "a"}, "127.0.0.1", b"")
        page = reply if isinstance(reply, bytes) else await reply
        await services.close()
        return page.decode()

    page = asyncio.run(scenario())
    assert "HTTP/1.1 200 " in page
    assert re.search(r"<td>\d+</td>", page), "the problem's line"
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<img src=x" not in page


def test_without_tokens_only_loopback_browsers_get_a_session(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    services = loop.run_until_complete(build(Settings(policy=EXAMPLE_POLICY)))
    try:
        assert Browser(services, loop, peer="10.2.3.4").request("GET", "/")[0] == 403
        local = Browser(services, loop, peer="127.0.0.1")
        status, _, page = local.request("GET", "/")
        assert status == 200
        assert "loopback (write)" in page
        assert local.cookie
        # A page on another site can post to 127.0.0.1: the loopback session's forms carry CSRF too.
        assert local.request("POST", "/tenants", {"name": "x1", "plan": "free"})[0] == 403
        form = {"name": "x1", "plan": "free", "csrf": local.csrf(page)}
        assert local.request("POST", "/tenants", form)[0] == 303
    finally:
        loop.run_until_complete(services.close())
        loop.close()


def test_the_pages_and_the_json_api_show_the_same_numbers(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    services, loop = served
    browser = Browser(services, loop)
    browser.sign_in(READ_TOKEN)
    reply = services.admin(
        "GET", "/api/dashboard/tenants/acme", {"authorization": f"Bearer {READ_TOKEN}"}, PEER, b""
    )
    raw = reply if isinstance(reply, bytes) else loop.run_until_complete(_wait(reply))
    document = json.loads(raw.partition(b"\r\n\r\n")[2])
    _, _, page = browser.request("GET", "/tenants/acme")
    assert f'id="invoice-total">{document["invoice"]["total"]}<' in page
    assert f'id="requests">{document["usage"]["requests"]:,}<' in page
    assert len(document["daily"]) == 30
    assert page.count("<rect ") == 30
    assert document["quota"]["name"] == "monthly_units"
    # The JSON API stays behind the bearer token: the session cookie is not a credential there.
    reply = services.admin("GET", "/api/dashboard/tenants/acme", {"cookie": browser.cookie}, PEER, b"")
    raw = reply if isinstance(reply, bytes) else loop.run_until_complete(_wait(reply))
    assert raw.startswith(b"HTTP/1.1 401 ")


def test_the_overview_pages_through_the_tenants_fifty_at_a_time(
    served: tuple[Services, asyncio.AbstractEventLoop],
) -> None:
    services, loop = served
    write = {"authorization": f"Bearer {WRITE_TOKEN}"}
    for number in range(60):
        body = json.dumps({"name": f"t{number:03d}", "plan": "free"}).encode()
        reply = services.admin("POST", "/api/tenants", write, PEER, body)
        raw = reply if isinstance(reply, bytes) else loop.run_until_complete(_wait(reply))
        assert raw.startswith(b"HTTP/1.1 201 ")
    browser = Browser(services, loop)
    browser.sign_in(READ_TOKEN)
    seen: list[str] = []
    target = "/"
    while target:
        status, _, page = browser.request("GET", target)
        assert status == 200
        names = re.findall(r'<a href="/tenants/[^"]+">([^<]+)</a>', page)
        assert len(names) <= 50
        seen += names
        following = re.search(r'id="next-page" href="([^"]+)"', page)
        target = following.group(1).replace("&amp;", "&") if following else ""
    assert seen == sorted(["acme", "globex", "initech", *(f"t{n:03d}" for n in range(60))])


def test_a_session_is_good_on_every_instance_given_the_same_secret_and_no_other(tmp_path: Path) -> None:
    tokens = tokens_file(tmp_path)
    loop = asyncio.new_event_loop()
    built = [
        loop.run_until_complete(
            build(Settings(policy=EXAMPLE_POLICY, admin_tokens_file=tokens, dashboard_secret=secret))
        )
        for secret in (SECRET, SECRET, "t" * 40)
    ]
    try:
        first, same, other = (Browser(services, loop) for services in built)
        first.sign_in(READ_TOKEN)
        same.cookie = other.cookie = first.cookie
        assert same.request("GET", "/policy")[0] == 200
        assert other.request("GET", "/policy")[0] == 303
    finally:
        for services in built:
            loop.run_until_complete(services.close())
        loop.close()
