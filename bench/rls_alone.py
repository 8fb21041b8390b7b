"""Row (i) of the benchmark: Envoy's ratelimit filter is the only call to meshtoll, which runs
as `meshtoll ratelimit` (the RLS alone, strict compatibility) from envoyproxy/ratelimit's
environment variables, counting in Redis: the setup a team replacing envoyproxy/ratelimit
runs. Each request is one descriptor `(api_key, <key>)` of domain `bench`, never over its
limit, so every call is one Redis round trip and an OK."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from meshtoll.local.devstack import rls_environment
from meshtoll.local.envoy_process import EnvoyProcess
from meshtoll.local.processes import (
    Child,
    Probe,
    announced_ports,
    free_ports,
    http_ok,
    read_ports,
    retrying_lost_ports,
)

CONFIG = """\
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: second, requests_per_unit: 1000000000}
"""

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ENVOY = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: rls_alone
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: rls_alone
          http_filters:
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: bench
              failure_mode_deny: true
              timeout: 0.25s
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
              - match: {{prefix: /}}
                route:
                  cluster: upstream
                  rate_limits:
                  - actions:
                    - request_headers: {{header_name: x-api-key, descriptor_key: api_key}}
  # The ratelimit filter acts only on routes to a cluster: the upstream is a listener of
  # this same Envoy answering 200 itself (on a port chosen before, for the cluster).
  - name: upstream
    address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: upstream
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: direct
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: ok}}}}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
  - name: rls
    type: STATIC
    connect_timeout: 1s
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


@contextmanager
def rls_alone(redis_url: str) -> Iterator[tuple[str, dict[str, int]]]:
    """Start `meshtoll ratelimit` and an Envoy in front of it; yields the URL to drive and
    the pids of "meshtoll" and "envoy" (which is its own upstream here)."""
    with tempfile.TemporaryDirectory(prefix="meshtoll-rls-bench-") as directory, ExitStack() as running:
        work = Path(directory)
        (work / "ratelimit" / "config").mkdir(parents=True)
        (work / "ratelimit" / "config" / "bench.yaml").write_text(CONFIG)
        ports_file = work / "rls.ports"
        rls = Child(
            "meshtoll ratelimit",
            [sys.executable, "-m", "meshtoll", "ratelimit"],
            work / "rls.log",
            {**rls_environment(work, redis_url), "MESHTOLL_PORTS_FILE": str(ports_file)},
        )
        running.callback(rls.stop)
        rls.wait_ready(announced_ports(ports_file), timeout=30)
        ports = read_ports(ports_file)
        rls.wait_ready(http_ok(f"http://127.0.0.1:{ports['port']}/healthcheck"), timeout=30)

        def start_envoy() -> tuple[Child, Probe]:
            (upstream,) = free_ports(1)
            bootstrap = ENVOY.format(upstream=upstream, grpc=ports["grpc_port"], hcm=_HCM)
            envoy = EnvoyProcess("envoy", bootstrap, work)
            running.callback(envoy.stop)
            started.append(envoy)
            return envoy.child, envoy.ready

        started: list[EnvoyProcess] = []
        retrying_lost_ports(start_envoy, timeout=30)
        envoy = started[-1]
        listen = envoy.listener_ports()["rls_alone"]
        yield f"http://127.0.0.1:{listen}/items", {"meshtoll": rls.pid, "envoy": envoy.child.pid}
