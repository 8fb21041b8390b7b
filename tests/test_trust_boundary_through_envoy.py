"""The edge's trust boundary, through a real Envoy: what a client sends in meshtoll's own
headers (x-meshtoll-*) and in x-request-id is gone before any filter, the upstream or an
access logger sees the request, on every listener of envoy/local.yaml, whether authz
allowed the request or refused it.

What an access logger receives is read from a second Envoy running the same bootstrap
with a file access logger added to every listener: loggers all see one request header map,
so the file logger sees what the meter's gRPC access logger is sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.local.devstack import LocalStack
from meshtoll.local.envoy_config import EnvoyPorts, render_bootstrap
from tests.certs import BOT_SPIFFE_ID, ClientCert, TestPki
from tests.client import Reply, fetch
from tests.conftest import StartStack
from tests.envoy_harness import envoy_process
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-trust-boundary"
SPOOFED = {
    "x-meshtoll-tenant": "victim",
    "x-meshtoll-plan": "enterprise",
    "x-meshtoll-consumer": "admin",
    "x-meshtoll-route": "free-stuff",
    "x-meshtoll-extproc": "open",
    "x-meshtoll-anything": "1",
    "x-request-id": "client-chosen-id",
}
# Listeners where authz refuses a request without credentials; the others serve everything.
AUTHZ_LISTENERS = (
    "http_authz", "grpc_authz", "rls", "rls_http_authz", "full", "mtls_grpc_authz", "mtls_http_authz"
)  # fmt: skip
OPEN_LISTENERS = ("stub_authz", "direct", "metered_direct")
PROXYING = {*AUTHZ_LISTENERS, "stub_authz"}
_probes = itertools.count()


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    policy = tmp_path_factory.mktemp("trust") / "policy.yaml"
    policy.write_text(f"""
plans:
  metered: {{price: {{currency: USD, tiers: [{{up_to: null, unit_price: "0.001"}}]}}}}
tenants:
  payer:
    plan: metered
    api_keys: [{{id: app, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]
    mtls: {{spiffe_ids: ["{BOT_SPIFFE_ID}"]}}
  victim:
    plan: metered
routes:
  - {{prefix: /v1/items, name: items}}
""")
    return start_stack(policy, authz_stub=True)


class LoggedEnvoy:
    """The stack's Envoy bootstrap again, on ports of its own, with every listener also
    writing each request's headers of interest to one JSON-lines file."""

    def __init__(self, ports: dict[str, int], log: Path) -> None:
        self.ports = ports  # by listener name
        self.log = log

    def url(self, listener: str, path: str) -> str:
        port = self.ports[listener]
        scheme = "https" if listener.startswith("mtls_") else "http"
        return f"{scheme}://127.0.0.1:{port}{path}"

    def record(self, probe: str) -> dict[str, Any]:
        """The access-log record of the request whose path carried `probe`."""

        def logged() -> dict[str, Any] | None:
            if self.log.exists():
                for line in self.log.read_text().splitlines():
                    entry: dict[str, Any] = json.loads(line)
                    if probe in (entry["path"] or ""):
                        return entry
            return None

        found = eventually(logged, timeout=30, interval=0.05, message=f"no access-log record for {probe}")
        assert found is not None
        return found


LOGGED_HEADERS = sorted(SPOOFED)


def with_file_access_logs(document: dict[str, Any], log: Path) -> dict[str, Any]:
    for listener in document["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        record = {"listener": listener["name"], "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%"}
        record |= {name: f"%REQ({name})%" for name in LOGGED_HEADERS}
        file_logger = {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(log),
                "log_format": {"json_format": record},
            },
        }
        manager["access_log"] = [*manager.get("access_log", []), file_logger]
    return document


@pytest.fixture(scope="module")
def logged(
    stack: LocalStack, pki: TestPki, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedEnvoy]:
    work = tmp_path_factory.mktemp("logged-envoy")
    own = [name for name in (f.name for f in dataclasses.fields(EnvoyPorts)) if name.startswith("listen_")]
    # Its admin and listeners on ports of Envoy's own choice, read back once it runs.
    ports = dataclasses.replace(stack.ports.envoy, admin_port=0, **dict.fromkeys(own, 0))
    bootstrap = yaml.safe_load(render_bootstrap(ports, pki.server))
    log = work / "access.log"
    process = envoy_process(
        "logged-envoy",
        with_file_access_logs(bootstrap, log),
        work,
        binary=envoy_binary,
        more_args=("--file-flush-interval-msec", "20"),
    )
    try:
        process.wait_ready(30)
        yield LoggedEnvoy(process.listener_ports(), log)
    finally:
        process.stop()


def send(envoy: LoggedEnvoy, pki: TestPki, listener: str, *, allowed: bool) -> tuple[Reply, dict[str, Any]]:
    probe = f"probe-{next(_probes)}"
    headers = dict(SPOOFED)
    cert: ClientCert | None = None
    if listener.startswith("mtls_"):
        cert = pki.bot if allowed else pki.other
    elif allowed:
        headers["x-api-key"] = KEY
    url = envoy.url(listener, f"/v1/items?{probe}")
    reply = fetch(url, headers=headers, client_cert=cert, ca_file=str(pki.server.ca_cert))
    return reply, envoy.record(probe)


def assert_nothing_client_sent(seen: dict[str, Any], tenant: str | None) -> None:
    """`seen`: header name -> value (None or absent when the header was not there); the
    x-meshtoll-* headers present are authz's (for `tenant`), never the client's."""
    assert seen.get("x-meshtoll-tenant") == tenant
    for name, value in SPOOFED.items():
        assert seen.get(name) != value, name
    assert seen.get("x-meshtoll-anything") is None
    assert seen.get("x-meshtoll-extproc") is None  # no route of this policy has hooks
    if tenant is None:
        assert seen.get("x-meshtoll-plan") is seen.get("x-meshtoll-route") is None
    assert seen.get("x-request-id")  # Envoy's own, not absent


@pytest.mark.parametrize("listener", AUTHZ_LISTENERS)
def test_a_refused_request_logs_none_of_the_clients_meshtoll_headers(
    logged: LoggedEnvoy, pki: TestPki, listener: str
) -> None:
    reply, record = send(logged, pki, listener, allowed=False)
    assert reply.status == 401, reply
    assert record["listener"] == listener
    assert_nothing_client_sent(record, tenant=None)


@pytest.mark.parametrize("listener", AUTHZ_LISTENERS + OPEN_LISTENERS)
def test_an_allowed_request_carries_only_what_authz_set_to_the_upstream_and_the_log(
    logged: LoggedEnvoy, pki: TestPki, listener: str
) -> None:
    reply, record = send(logged, pki, listener, allowed=True)
    assert reply.status == 200, reply
    tenant = "payer" if listener in AUTHZ_LISTENERS else None
    assert_nothing_client_sent(record, tenant)
    if listener in PROXYING:
        upstream: dict[str, str] = reply.json()["headers"]
        assert_nothing_client_sent(upstream, tenant)
        assert upstream["x-request-id"] == record["x-request-id"]


def test_a_reused_client_request_id_becomes_five_ids_of_envoys_own(stack: LocalStack) -> None:
    # The meter bills each request id once: a client that could choose the id would pay
    # for the first of these five requests only.
    seen = set()
    for _ in range(5):
        reply = fetch(
            stack.url("listen_full_port", "/v1/items"),
            headers={"x-api-key": KEY, "x-request-id": SPOOFED["x-request-id"]},
        )
        assert reply.status == 200, reply
        seen.add(reply.json()["headers"]["x-request-id"])
    assert len(seen) == 5
    assert SPOOFED["x-request-id"] not in seen
