"""What istiod would build from deploy/istio for the ingress gateway (tests/istiod_gateway.py
assembles it), checked by a real Envoy and then carrying real traffic to meshtoll: the
provider's ext_authz, the EnvoyFilters in priority order, HTTP/2 to the gRPC port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.local.dev import DEMO_ACME_KEY, EXAMPLE_POLICY
from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.envoy_harness import envoy_process
from tests.envoy_validate import assert_envoy_accepts
from tests.istiod_gateway import cluster_name, gateway_bootstrap, provider
from tests.waiting import eventually

pytestmark = pytest.mark.integration

ORDER = [
    "envoy.filters.http.ext_authz",
    "meshtoll.hooks",
    "envoy.filters.http.ratelimit",
    "envoy.filters.http.router",
]


def http_filters(bootstrap: dict[str, Any]) -> list[str]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [item["name"] for item in manager["http_filters"]]


def meshtoll_ports(stack: LocalStack) -> dict[int, int]:
    """meshtoll's Service ports -> where the stack's meshtoll listens."""
    http = provider("meshtoll-http")["envoyExtAuthzHttp"]["port"]
    grpc = provider("meshtoll-grpc")["envoyExtAuthzGrpc"]["port"]
    admin = 8090
    return {
        http: stack.ports.envoy.authz_http_port,
        grpc: stack.ports.envoy.authz_grpc_port,
        admin: stack.ports.meshtoll_admin_port,
    }


@pytest.fixture(scope="module")
def stack(start_stack: StartStack) -> LocalStack:
    return start_stack(EXAMPLE_POLICY)


@pytest.fixture(scope="module")
def gateway(stack: LocalStack, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Admin and listener on ports of Envoy's own choice, read back once it runs.
    bootstrap = gateway_bootstrap(0, 0, stack.ports.envoy.upstream_port, meshtoll_ports(stack))
    work = tmp_path_factory.mktemp("gateway")
    envoy = envoy_process("gateway-envoy", bootstrap, work, binary=envoy_binary)
    try:
        envoy.wait_ready(timeout=30)
        (listen,) = envoy.listener_ports().values()
        yield f"http://127.0.0.1:{listen}"
    finally:
        envoy.stop()


def test_the_assembled_gateway_passes_envoy_validation(envoy_binary: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_bootstrap(1, 2, 3, {8081: 4, 8082: 5, 8090: 6})))
    assert_envoy_accepts(envoy_binary, config)


def test_filters_run_authz_then_hooks_then_ratelimit_then_the_router() -> None:
    assert http_filters(gateway_bootstrap(1, 2, 3, {8081: 4, 8082: 5, 8090: 6})) == ORDER


def test_only_the_grpc_port_cluster_speaks_http2() -> None:
    bootstrap = gateway_bootstrap(1, 2, 3, {8081: 4, 8082: 5, 8090: 6})
    service = provider("meshtoll-http")["envoyExtAuthzHttp"]["service"]
    clusters = {item["name"]: item for item in bootstrap["static_resources"]["clusters"]}
    assert "typed_extension_protocol_options" in clusters[cluster_name(8081, service)]
    assert "typed_extension_protocol_options" not in clusters[cluster_name(8082, service)]


def test_a_tenant_request_passes_every_filter_to_the_upstream(gateway: str) -> None:
    reply = fetch(f"{gateway}/v1/search?q=istio", headers={"x-api-key": DEMO_ACME_KEY})
    assert reply.status == 200, reply
    seen = reply.json()["headers"]
    assert seen["x-meshtoll-tenant"] == "acme"
    # Istio's HTTP provider leaves x-envoy-auth-headers-to-remove to Envoy: the key stops here.
    assert "x-api-key" not in seen


def test_a_hooked_route_reaches_meshtoll_over_ext_proc(gateway: str) -> None:
    reply = fetch(f"{gateway}/v1/chat/completions?tokens=25", headers={"x-api-key": DEMO_ACME_KEY})
    assert reply.status == 200, reply
    assert reply.json()["headers"]["x-tenant-id"] == "acme"  # set by the hook, over HTTP/2


def test_denials_reach_the_client_as_json_and_spoofed_identity_is_removed(gateway: str) -> None:
    missing = fetch(f"{gateway}/v1/search", headers={"x-meshtoll-tenant": "acme"})
    assert missing.status == 401
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["error"] == "missing_credentials"
    escaped = fetch(f"{gateway}/v1/a%2Fb", headers={"x-api-key": DEMO_ACME_KEY})
    assert escaped.status == 400


def metered(stack: LocalStack) -> float:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("meshtoll_meter_records_total{") and 'outcome="billed"' in line
    )


def test_the_meter_provider_bills_gateway_traffic(stack: LocalStack, gateway: str) -> None:
    before = metered(stack)
    assert fetch(f"{gateway}/v1/items", headers={"x-api-key": DEMO_ACME_KEY}).status == 200
    # Istio's envoyOtelAls sets no buffer options: Envoy flushes every second by default.
    eventually(
        lambda: metered(stack),
        lambda billed: billed > before,
        timeout=10,
        interval=0.2,
        message="no access-log record was billed",
    )
