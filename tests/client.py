"""A small blocking HTTP(S) client for tests that talk to the local stack through Envoy."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.certs import ClientCert


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    client_cert: ClientCert | None = None,
    ca_file: str | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One request on a fresh connection; a non-2xx status is a Reply, not an exception."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca_file)
        if client_cert is not None:
            context.load_cert_chain(*client_cert.pair)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            return Reply(answer.status, _lower(answer.headers.items()), answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, _lower(error.headers.items()), error.read())


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}
