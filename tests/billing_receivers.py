"""Local stand-ins for OpenMeter, Lago and Stripe: real HTTP servers on free loopback ports
(bound to port 0, so no port is raced for) that validate every body against the target's
published schema (tests/billing_schemas.py), hold events the way the target does (OpenMeter
and Stripe deduplicate by id, Lago refuses a batch holding a known transaction_id with its
422) and answer with scripted failures: `script` is the answers to give, in order, before
behaving normally again.

What a test reads: `held`, the ids the target counts (once each, whatever arrived how
often), `arrivals`, how often each id reached it, and `problems`, the bodies that broke a
schema (a test asserts there are none).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import jsonschema

from tests.billing_schemas import LAGO_BATCH, STRIPE_V1_FORM, STRIPE_V2_STREAM, check_cloudevent, stripe_form

SESSION_SECONDS = 15 * 60
STREAM = "/v2/billing/meter_event_stream"


@dataclass(frozen=True)
class Scripted:
    """One scripted answer. `status`: the HTTP status to answer instead of the usual one;
    `retry_after`: its Retry-After; `hang`: seconds to wait before answering (longer than
    the client's timeout: no answer at all); `hold`: take the events anyway (the answer is
    what gets lost); `expire_session`: Stripe's session token is no longer good."""

    status: int | None = None
    retry_after: str | None = None
    hang: float = 0.0
    hold: bool = False
    expire_session: bool = False


@dataclass
class Receiver:
    target: str
    token: str = "secret-token"  # the credential it expects
    script: deque[Scripted] = field(default_factory=deque)
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> the event as held
    arrivals: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)  # by path
    sessions: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # ids it refuses for good, as if invalid
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    busy: int = 0  # requests being answered (a hanging one among them)

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.requests[path] += 1
            self.busy += 1
            scripted = self.script.popleft() if self.script else Scripted()
        try:
            return self._answer(path, headers, body, scripted)
        finally:
            with self.lock:
                self.busy -= 1

    def _answer(
        self, path: str, headers: dict[str, str], body: bytes, scripted: Scripted
    ) -> tuple[int, dict[str, str], bytes]:
        if scripted.hang:
            time.sleep(scripted.hang)
        with self.lock:
            if path == "/v2/billing/meter_event_session":
                return self._session(headers)
            if path != STREAM and not self._authorised(headers, path):
                return 401, {}, b'{"error": "unauthorised"}'
            try:
                events = self._events(path, headers, body)
            except (ValueError, jsonschema.ValidationError) as exc:
                self.problems.append(f"{path}: {exc}")
                return 400, {}, json.dumps({"error": f"invalid body: {exc}"[:300]}).encode()
            if scripted.expire_session and self.sessions:
                self.sessions.pop()
            if path == STREAM and not self._authorised(headers, path):
                error = {"type": "temporary_session_expired", "code": "billing_meter_event_session_expired"}
                return 401, {}, json.dumps({"error": error}).encode()
            for event_id, _ in events:
                self.arrivals[event_id] += 1
            refused = [index for index, (event_id, _) in enumerate(events) if event_id in self.refuse]
            if refused:
                return self._refused(refused)
            if scripted.status is not None and not scripted.hold:
                return self._scripted(scripted)
            answer = self._hold(path, events)
            return self._scripted(scripted) if scripted.status is not None else answer

    def _refused(self, indexes: list[int]) -> tuple[int, dict[str, str], bytes]:
        """What each target answers a batch holding events it will never take."""
        if self.target == "lago":
            details = {
                str(index): {"external_subscription_id": ["subscription_not_found"]} for index in indexes
            }
            document = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
            return 422, {}, json.dumps({**document, "error_details": details}).encode()
        if self.target == "openmeter":
            problem = {
                "type": "about:blank",
                "title": "Bad Request",
                "status": 400,
                "detail": "invalid event",
            }
            return 400, {"content-type": "application/problem+json"}, json.dumps(problem).encode()
        error = {"type": "invalid_request_error", "message": "No such customer"}
        return 400, {}, json.dumps({"error": error}).encode()

    def _scripted(self, scripted: Scripted) -> tuple[int, dict[str, str], bytes]:
        assert scripted.status is not None
        headers = {} if scripted.retry_after is None else {"retry-after": scripted.retry_after}
        return scripted.status, headers, b'{"error": "scripted"}'

    def _authorised(self, headers: dict[str, str], path: str) -> bool:
        given = headers.get("authorization", "")
        if path == STREAM:
            return given.removeprefix("Bearer ") in self.sessions
        return given == f"Bearer {self.token}"

    def _session(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {}, b'{"error": {"type": "invalid_request_error"}}'
        token = f"ek_test_{len(self.sessions)}_{time.monotonic_ns()}"
        self.sessions.append(token)
        expires = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + SESSION_SECONDS))
        document = {
            "id": f"mes_{len(self.sessions)}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "expires_at": expires,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "livemode": False,
        }
        return 200, {}, json.dumps(document).encode()

    def _events(self, path: str, headers: dict[str, str], body: bytes) -> list[tuple[str, dict[str, Any]]]:
        """(id, event) of each event of a valid body; raises for an invalid one."""
        kind = headers.get("content-type", "")
        if self.target == "openmeter" and path == "/api/v1/events":
            if kind != "application/cloudevents-batch+json":
                raise ValueError(f"content-type {kind!r}")
            batch = json.loads(body)
            if not isinstance(batch, list):
                raise ValueError("not a JSON array")
            for event in batch:
                check_cloudevent(event)
            return [(f"{event['source']}/{event['id']}", event) for event in batch]
        if self.target == "lago" and path == "/api/v1/events/batch":
            document = json.loads(body)
            LAGO_BATCH.validate(document)
            if len(document["events"]) > 100:
                raise ValueError("more than 100 events")
            return [(event["transaction_id"], event) for event in document["events"]]
        if self.target == "stripe" and path == STREAM:
            document = json.loads(body)
            STRIPE_V2_STREAM.validate(document)
            return [(event["identifier"], event) for event in document["events"]]
        if self.target == "stripe" and path == "/v1/billing/meter_events":
            form = stripe_form(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True))
            STRIPE_V1_FORM.validate(form)
            return [(form["identifier"], form)]
        raise ValueError(f"no such endpoint {path}")

    def _hold(self, path: str, events: list[tuple[str, dict[str, Any]]]) -> tuple[int, dict[str, str], bytes]:
        known = [index for index, (event_id, _) in enumerate(events) if event_id in self.held]
        if self.target == "lago" and known:  # Lago validates the whole batch and writes none of it
            details = {str(index): {"transaction_id": ["value_already_exist"]} for index in known}
            document = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
            return 422, {}, json.dumps({**document, "error_details": details}).encode()
        if path == "/v1/billing/meter_events" and known:  # v1 refuses an identifier it holds
            message = f"An event already exists with identifier {events[0][0]}."
            return (
                400,
                {},
                json.dumps({"error": {"type": "invalid_request_error", "message": message}}).encode(),
            )
        for event_id, event in events:
            self.held.setdefault(event_id, event)  # OpenMeter and the v2 stream drop duplicates
        if self.target == "openmeter":
            return 204, {}, b""
        return 200, {}, b"{}"


class _Handler(BaseHTTPRequestHandler):
    receiver: Receiver
    protocol_version = "HTTP/1.1"  # keep-alive, as the real services answer

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, extra, answer = self.server.receiver.answer(self.path, headers, body)  # type: ignore[attr-defined]
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has gone before a hanging answer: nothing to report.
        return None


@contextmanager
def running_receiver(target: str) -> Iterator[Receiver]:
    receiver = Receiver(target)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.receiver = receiver  # type: ignore[attr-defined]
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name=f"{target} receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
