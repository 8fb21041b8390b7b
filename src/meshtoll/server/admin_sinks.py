"""The admin API of the billing sinks' quarantine: list what a target refused, and send it
again once fixed (into the replay queue, which the running sink delivers first).

    GET  /api/usage/sinks/{target}/quarantine
    POST /api/usage/sinks/{target}/quarantine/replay[?key=<tenant>:<request id>...]  (none: all)
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from meshtoll.errors import StorageError
from meshtoll.meter.quarantine_report import quarantine_document
from meshtoll.sinks.names import TARGETS
from meshtoll.sinks.state import SinkStateStore
from meshtoll.transport.http_server import response

PREFIX = "/api/usage/sinks/"
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def is_sink_path(path: str) -> bool:
    return path.startswith(PREFIX)


async def answer_sink_path(state: SinkStateStore, method: str, target: str) -> bytes:
    path, _, query = target.partition("?")
    sink, _, rest = path.removeprefix(PREFIX).partition("/")
    if sink not in TARGETS or rest not in ("quarantine", "quarantine/replay"):
        known = ", ".join(TARGETS)
        return _json(404, {"error": "not_found", "message": f"no such sink endpoint (sinks: {known})"})
    wanted = "GET" if rest == "quarantine" else "POST"
    if method != wanted:
        return _json(405, {"error": "method_not_allowed", "message": f"{path} takes {wanted}"})
    try:
        if rest == "quarantine":
            return _json(200, quarantine_document(sink, await state.quarantined(sink)))
        keys = parse_qs(query).get("key")
        return _json(200, {"sink": sink, "replayed": await state.replay(sink, keys)})
    except StorageError as exc:
        return _json(503, {"error": "store_unavailable", "message": str(exc)})


def _json(status: int, document: dict[str, object]) -> bytes:
    body = json.dumps(document).encode()
    return response(status, _REASONS[status], (("content-type", "application/json"),), body)
