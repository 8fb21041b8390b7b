"""The dashboard on the admin port: server-rendered pages (overview, tenant, policy, sign-in)
and the forms that change tenants and keys, each answered through the tenant API with the
signed-in token's name as the audit log's actor. Pages are rendered from the documents of
dashboard_data.py, which the JSON API (`/api/dashboard/...`) serves unchanged.

    GET  /                      overview (?cursor= pages through the tenants)
    GET  /tenants/{t}           a tenant
    GET  /policy                the policy
    GET  /login, POST /login    an admin token for a session cookie; POST /logout
    POST /tenants                                  create a tenant (name, plan)
    POST /tenants/{t}/keys                         issue a key (shown once, in the answer)
    POST /tenants/{t}/keys/{id}/roll               roll a key (overlap_seconds)
    POST /tenants/{t}/keys/{id}/revoke             revoke a key
    POST /tenants/{t}/status, /tenants/{t}/plan    suspend / resume, change plan
    GET  /static/{file}         the stylesheet and the script (no data: open)

Every form carries the session's CSRF token and is refused without it (403 `csrf`), as is a
post whose Origin is another site's; a read token's session may look, not act (403
`insufficient_scope`). Every page is sent with a Content-Security-Policy that allows only
meshtoll's own script and stylesheet, on top of templates that escape everything they show.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

import orjson
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from meshtoll.server.admin_access import Caller
from meshtoll.server.dashboard_chart import bar_chart
from meshtoll.server.dashboard_data import DashboardData, api_document
from meshtoll.server.dashboard_session import Session, Sessions, set_cookie
from meshtoll.server.tenant_api import TenantApi
from meshtoll.transport.http_server import response

PAGE_PATHS = ("/", "/login", "/logout", "/policy", "/tenants")
_SECURITY_HEADERS = (
    ("cache-control", "no-store"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    # Not no-referrer: with it, a browser sends `Origin: null` on this dashboard's own forms,
    # which the Origin check would then have to accept. same-origin: no other site sees a URL.
    ("referrer-policy", "same-origin"),
)
_STATIC_TYPES = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
REFRESH_SECONDS = 5


def serves(path: str) -> bool:
    """Whether a path is the dashboard's (the rest of the admin port is its API and probes)."""
    return path in PAGE_PATHS or path.startswith(("/tenants/", "/static/"))


def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("meshtoll.server", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = lambda value: "—" if value is None else f"{value:,}"
    environment.filters["url_part"] = lambda value: quote(str(value), safe="")
    environment.filters["duration"] = _duration
    return environment


class Dashboard:
    def __init__(
        self, sessions: Sessions, data: DashboardData, api: TenantApi, clock: Callable[[], float] = time.time
    ) -> None:
        self._sessions = sessions
        self._data = data
        self._api = api
        self._clock = clock
        self._templates = _templates()
        self._static = {
            name: (importlib.resources.files("meshtoll.server") / "static" / name).read_bytes()
            for name in _STATIC_TYPES
        }

    # The JSON API (behind AdminAccess, like the rest of /api)

    def api(self, method: str, path: str, query: str, caller: Caller) -> Awaitable[bytes] | bytes | None:
        """The answer for one of the dashboard's JSON endpoints, or None for another path."""
        parts = [unquote(part) for part in path.removeprefix("/api/").split("/")]
        match parts:
            case ["dashboard", "overview"]:
                return _only_get(method) or self._json_overview(_first(query, "cursor"), caller)
            case ["dashboard", "tenants", tenant]:
                return _only_get(method) or self._json_tenant(tenant, caller)
            case ["dashboard", "policy"]:
                return _only_get(method) or _json(200, self._data.policy())
            case ["tenants", tenant, "denials"]:
                return _only_get(method) or _json(200, self._data.denials(tenant))
            case ["tenants", tenant, "daily-usage"]:
                return _only_get(method) or self._json_daily(tenant, _first(query, "days"))
        return None

    async def _json_overview(self, cursor: str, caller: Caller) -> bytes:
        try:
            return _json(200, await self._data.overview(cursor, caller))
        except ValueError as exc:
            return _json(400, {"error": "bad_query", "message": str(exc)})

    async def _json_tenant(self, tenant: str, caller: Caller) -> bytes:
        document = await self._data.tenant(tenant, caller)
        if document is None:
            return _json(404, {"error": "unknown_tenant", "message": f"no tenant {tenant!r}"})
        return _json(200, document)

    async def _json_daily(self, tenant: str, days: str) -> bytes:
        if not days.isdigit() or not 1 <= int(days or 0) <= 400:
            return _json(400, {"error": "bad_query", "message": "days must be 1 to 400"})
        return _json(200, await self._data.daily_usage(tenant, int(days)))

    # The pages

    def __call__(
        self, method: str, target: str, headers: dict[str, str], peer: str, body: bytes
    ) -> bytes | Awaitable[bytes]:
        path, _, query = target.partition("?")
        if path.startswith("/static/"):
            return self._static_file(path.removeprefix("/static/"))
        if path == "/login":
            return self._login(method, query, headers, peer, body)
        session = self._sessions.current(headers, peer)
        fresh = None
        if session is None:
            session = fresh = self._sessions.loopback(peer)
        if session is None and not self._sessions.needs_login:
            text = "without admin tokens the dashboard answers loopback clients only (--admin-tokens-file)"
            return self._page(403, "message.html", None, headers, title="Loopback only", text=text)
        if session is None:
            if method != "GET":
                text = "Sign in again."
                return self._page(401, "message.html", None, headers, title="Signed out", text=text)
            return _redirect("/login?" + urlencode({"next": target}))
        if method == "GET":
            return self._with_cookie(self._get(path, query, session, headers), fresh, headers)
        if method != "POST":
            return self._page(405, "message.html", session, headers, title="Not allowed", text=f"{method}")
        refused = self._refused_post(session, headers, body)
        if refused is not None:
            return refused
        return self._post(path, session, headers, _form(body))

    async def _get(self, path: str, query: str, session: Session, headers: dict[str, str]) -> bytes:
        if path == "/":
            try:
                overview = await self._data.overview(_first(query, "cursor"), session.caller)
            except ValueError as exc:
                return self._page(400, "message.html", session, headers, title="Bad page", text=str(exc))
            refresh = REFRESH_SECONDS
            plans = sorted(self._data.plans())
            values = {"overview": overview, "refresh": refresh, "plans": plans}
            return self._page(200, "overview.html", session, headers, **values)
        if path == "/policy":
            return self._page(200, "policy.html", session, headers, policy=self._data.policy())
        if path.startswith("/tenants/") and path.count("/") == 2:
            return await self._tenant_page(200, unquote(path.removeprefix("/tenants/")), session, headers)
        return self._page(404, "message.html", session, headers, title="Not found", text=path)

    async def _tenant_page(
        self, status: int, name: str, session: Session, headers: dict[str, str], **extra: Any
    ) -> bytes:
        tenant = await self._data.tenant(name, session.caller)
        if tenant is None:
            return self._page(404, "message.html", session, headers, title="No such tenant", text=name)
        plans = sorted(self._data.plans())
        days = tenant["daily"]
        chart = bar_chart([day["requests"] for day in days], [day["date"] for day in days])
        values = {"t": tenant, "chart": chart, "plans": plans, **extra}
        return self._page(status, "tenant.html", session, headers, **values)

    async def _post(
        self, path: str, session: Session, headers: dict[str, str], form: dict[str, str]
    ) -> bytes:
        if path == "/logout":
            return _redirect("/login", set_cookie(None, _secure(headers)))
        if not session.may_change:
            text = "this admin token may read, not change: changes need a token of scope write"
            return self._page(403, "message.html", session, headers, title="Read only", text=text)
        parts = [unquote(part) for part in path.split("/")[1:]]
        change = _api_change(parts, form)
        if change is None:
            return self._page(404, "message.html", session, headers, title="Not found", text=path)
        tenant = form.get("name", "") if parts == ["tenants"] else parts[1]
        method, api_path, fields = change
        reply = self._api.handle(method, api_path, "", {}, orjson.dumps(fields), session.caller)
        status, document = await api_document(reply)
        if status >= 400:
            return await self._answer_refusal(status, document, tenant, parts, session, headers)
        if "key" in document:  # a new key: shown on this answer only, never again
            return await self._tenant_page(status, tenant, session, headers, issued=document)
        return _redirect(f"/tenants/{quote(tenant, safe='')}")

    async def _answer_refusal(
        self,
        status: int,
        document: dict[str, Any],
        tenant: str,
        parts: list[str],
        session: Session,
        headers: dict[str, str],
    ) -> bytes:
        if parts == ["tenants"] or status == 404:
            return self._page(status, "message.html", session, headers, title="Refused", refusal=document)
        return await self._tenant_page(status, tenant, session, headers, refusal=document)

    def _login(self, method: str, query: str, headers: dict[str, str], peer: str, body: bytes) -> bytes:
        target = _local_path(_first(query, "next"))
        if not self._sessions.needs_login:
            return _redirect(target)  # loopback only: no token to give
        if method == "GET":
            return self._page(200, "login.html", None, headers, next=target, error=None)
        if method != "POST":
            return self._page(405, "message.html", None, headers, title="Not allowed", text=method)
        if _cross_site(headers):
            return self._page(403, "message.html", None, headers, title="Refused", text="cross-site sign-in")
        form = _form(body)
        target = _local_path(form.get("next", ""))
        session = self._sessions.login(form.get("token", ""))
        if session is None:
            error = "That is not an admin token."
            return self._page(401, "login.html", None, headers, next=target, error=error)
        return _redirect(target, set_cookie(session, _secure(headers)))

    def _refused_post(self, session: Session, headers: dict[str, str], body: bytes) -> bytes | None:
        if _cross_site(headers) or not self._sessions.csrf_ok(session, _form(body).get("csrf", "")):
            text = "the form did not come from this dashboard (CSRF check): reload the page and try again"
            return self._page(403, "message.html", session, headers, title="Refused", text=text)
        return None

    def _page(
        self, status: int, template: str, session: Session | None, headers: dict[str, str], **values: Any
    ) -> bytes:
        body = (
            self._templates.get_template(template)
            .render(
                session=session,
                csrf="" if session is None else self._sessions.csrf_token(session),
                login=self._sessions.needs_login,
                **{"refresh": None, "issued": None, "refusal": None, "title": None, "text": None, **values},
            )
            .encode()
        )
        content = (("content-type", "text/html; charset=utf-8"), *_SECURITY_HEADERS)
        return response(status, HTTPStatus(status).phrase, content, body)

    async def _with_cookie(
        self, page: Awaitable[bytes], fresh: Session | None, headers: dict[str, str]
    ) -> bytes:
        answer = await page
        if fresh is None:
            return answer
        line = f"set-cookie: {set_cookie(fresh, _secure(headers))}\r\n".encode("latin-1")
        status_line, _, rest = answer.partition(b"\r\n")
        return status_line + b"\r\n" + line + rest

    def _static_file(self, name: str) -> bytes:
        kind = _STATIC_TYPES.get(name)
        if kind is None:
            return response(404, "Not Found", (("content-type", "text/plain"),), b"not found")
        cached = (("content-type", kind), ("cache-control", "max-age=300"), _SECURITY_HEADERS[2])
        return response(200, "OK", cached, self._static[name])


def _api_change(parts: list[str], form: dict[str, str]) -> tuple[str, str, dict[str, object]] | None:
    """The tenant API call (method, path, body) a dashboard form stands for."""
    match parts:
        case ["tenants"]:
            return "POST", "/api/tenants", {"name": form.get("name", ""), "plan": form.get("plan", "")}
        case ["tenants", tenant, "keys"]:
            fields = {key: form[key] for key in ("id", "expires_at") if form.get(key)}
            return "POST", _api_path(tenant, "keys"), dict(fields)
        case ["tenants", tenant, "keys", key_id, "roll"]:
            overlap = form.get("overlap_seconds", "")
            # A number when it reads as one; anything else goes as typed, for the API to refuse.
            return (
                "POST",
                _api_path(tenant, "keys", key_id, "roll"),
                {"overlap_seconds": int(overlap) if overlap.isdigit() else overlap},
            )
        case ["tenants", tenant, "keys", key_id, "revoke"]:
            return "DELETE", _api_path(tenant, "keys", key_id), {}
        case ["tenants", tenant, ("status" | "plan") as field]:
            return "PATCH", _api_path(tenant), {field: form.get(field, "")}
    return None


def _api_path(tenant: str, *more: str) -> str:
    return "/".join(["/api/tenants", *(quote(part, safe="") for part in (tenant, *more))])


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _form(body: bytes) -> dict[str, str]:
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=50)
    return {name: values[0].strip() for name, values in fields.items()}


def _first(query: str, name: str) -> str:
    return parse_qs(query).get(name, [""])[0]


def _local_path(target: str) -> str:
    """Where to go after signing in: a path of this dashboard only, never another site
    (`//evil.example` and `/\\evil.example` are other sites to a browser)."""
    if not target.startswith("/") or target.startswith(("//", "/\\")) or any(c < " " for c in target):
        return "/"
    return target


def _cross_site(headers: dict[str, str]) -> bool:
    """A post another site's page made: its Origin is not this host, or the browser says so."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    host = headers.get("host", "")
    return origin not in (f"http://{host}", f"https://{host}")


def _secure(headers: dict[str, str]) -> bool:
    return headers.get("x-forwarded-proto", "").lower() == "https"


def _redirect(location: str, cookie: str | None = None) -> bytes:
    extra = () if cookie is None else (("set-cookie", cookie),)
    return response(303, "See Other", (("location", location), ("cache-control", "no-store"), *extra))


def _only_get(method: str) -> bytes | None:
    if method in ("GET", "HEAD"):
        return None
    return _json(405, {"error": "method_not_allowed", "message": "use GET"})


def _json(status: int, document: dict[str, Any]) -> bytes:
    content = (("content-type", "application/json"),)
    return response(status, HTTPStatus(status).phrase, content, orjson.dumps(document))
