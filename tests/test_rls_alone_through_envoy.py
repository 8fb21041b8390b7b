"""`meshtoll ratelimit` (strict, envoyproxy/ratelimit's configuration) behind a real Envoy's
ratelimit filter, on a real Redis: benchmark row (i)'s setup. Each client's key is a
descriptor value, and each key is counted on its own counter, however often the same request
bytes come back (meshtoll remembers a request's parse by its bytes and a descriptor's match by
its entries): a request never takes another's parse, match or answer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.client import fetch
from tests.conftest import RunningRls, StartRls
from tests.envoy_harness import envoy_process
from tests.test_h2_server import TIMEOUT
from tests.test_rls_grpc_port import HeldRoadToRedis
from tests.waiting import wait_out_a_window_end

pytestmark = pytest.mark.integration

CONFIG = """\
domain: alone
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: api_key
    value: unlimited-key
    rate_limit: {unlimited: true}
"""

# The ratelimit filter acts only on routes to a cluster: the upstream is meshtoll
# ratelimit's own HTTP port, whose /healthcheck answers 200 while it serves.
ENVOY = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: alone
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: alone
          http_filters:
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: alone
              failure_mode_deny: true
              timeout: 5s
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {{envoy_grpc: {{cluster_name: rls}}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: direct
              domains: ["*"]
              routes:
              - match: {{path: /items}}
                route:
                  cluster: upstream
                  prefix_rewrite: /healthcheck
                  rate_limits:
                  - actions:
                    - request_headers: {{header_name: x-api-key, descriptor_key: api_key}}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {http}}}}}}}
  - name: rls
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: rls
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {grpc}}}}}}}
"""


@dataclass(frozen=True)
class Gateway:
    url: str
    rls: RunningRls


@pytest.fixture(scope="module")
def gateway(
    start_rls: StartRls, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("rls-alone")
    (root / "ratelimit" / "config").mkdir(parents=True)
    (root / "ratelimit" / "config" / "alone.yaml").write_text(CONFIG)
    rls = start_rls(root)
    bootstrap = ENVOY.format(http=rls.port, grpc=rls.grpc_port)
    work = tmp_path_factory.mktemp("envoy")
    envoy = envoy_process("rls-alone-envoy", yaml.safe_load(bootstrap), work, binary=envoy_binary)
    try:
        envoy.wait_ready(30)
        yield Gateway(f"http://127.0.0.1:{envoy.listener_ports()['alone']}/items", rls)
    finally:
        envoy.stop()


def statuses(gateway: Gateway, key: str, count: int) -> list[int]:
    return [fetch(gateway.url, headers={"x-api-key": key}).status for _ in range(count)]


def test_each_key_is_counted_on_its_own_however_often_its_request_repeats(gateway: Gateway) -> None:
    # Keys of this run only: the session's Redis keeps other runs' counters for the minute.
    first, second = (f"key-{uuid.uuid4().hex}" for _ in range(2))
    wait_out_a_window_end("minute", margin=15)  # three a minute, counted exactly
    assert statuses(gateway, first, 5) == [200, 200, 200, 429, 429]
    # The same request bytes but for the key: its own counter, from its first hit.
    assert statuses(gateway, second, 4) == [200, 200, 200, 429]
    assert statuses(gateway, first, 1) == [429]


def test_a_configured_value_keeps_its_own_limit_next_to_the_keys_counted(gateway: Gateway) -> None:
    counted = f"key-{uuid.uuid4().hex}"
    wait_out_a_window_end("minute", margin=15)
    assert statuses(gateway, counted, 4) == [200, 200, 200, 429]
    assert statuses(gateway, "unlimited-key", 6) == [200] * 6
    assert statuses(gateway, counted, 1) == [429]


def test_a_request_without_the_key_gets_no_descriptor_and_passes(gateway: Gateway) -> None:
    # Envoy sends no descriptor (no x-api-key): nothing to limit, the filter lets it through.
    assert [fetch(gateway.url).status for _ in range(5)] == [200] * 5


def test_a_call_past_its_grpc_timeout_is_answered_deadline_exceeded_through_envoy(
    start_rls: StartRls, envoy_binary: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Envoy's ratelimit filter sends grpc-timeout on every call. Here the call's metadata
    asks for 200 ms while Envoy's own timeout stays at the test's 5 s, and the call's Redis
    reply is held back: meshtoll answers DEADLINE_EXCEEDED (an answered stream, not one
    Envoy timed out and reset), Envoy applies its failure mode, and the next call, its Redis
    reply released, is decided."""
    root = tmp_path_factory.mktemp("rls-deadline")
    (root / "ratelimit" / "config").mkdir(parents=True)
    (root / "ratelimit" / "config" / "alone.yaml").write_text(CONFIG)
    with HeldRoadToRedis(urlsplit(redis_url).port or 0) as road:
        rls = start_rls(root, REDIS_URL=f"127.0.0.1:{road.port}/0")
        bootstrap = yaml.safe_load(ENVOY.format(http=rls.port, grpc=rls.grpc_port))
        filters = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        ratelimit = filters[0]["typed_config"]["http_filters"][0]["typed_config"]
        ratelimit["rate_limit_service"]["grpc_service"]["initial_metadata"] = [
            {"key": "grpc-timeout", "value": "200m"}
        ]
        envoy = envoy_process(
            "rls-deadline-envoy", bootstrap, tmp_path_factory.mktemp("envoy"), binary=envoy_binary
        )
        try:
            envoy.wait_ready(30)
            url = f"http://127.0.0.1:{envoy.listener_ports()['alone']}/items"
            road.hold(b"EVALSHA")
            key = f"key-{uuid.uuid4().hex}"
            assert (
                fetch(url, headers={"x-api-key": key}, timeout=2 * TIMEOUT).status == 500
            )  # failure_mode_deny
            assert road.held.is_set()
            stats = fetch(f"{envoy.admin_url}/stats?filter=^cluster\\.rls\\.upstream_rq_").body.decode()
            counters = dict(line.split(": ") for line in stats.splitlines())
            assert counters.get("cluster.rls.upstream_rq_timeout", "0") == "0", stats
            assert counters["cluster.rls.upstream_rq_200"] == "1", stats  # answered, with grpc-status 4
            road.release()
            assert fetch(url, headers={"x-api-key": key}).status == 200
        finally:
            envoy.stop()
