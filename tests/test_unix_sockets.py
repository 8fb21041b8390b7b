"""meshtoll as a sidecar: `meshtoll serve --uds-dir` answers every service over Unix
sockets, and the sidecar gateway's Envoy configuration (deploy/k8s/overlays/gateway-sidecar)
carries real traffic to it through them, the hooks and the meter included."""

from __future__ import annotations

import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.errors import ConfigError
from meshtoll.local.dev import DEMO_ACME_KEY, EXAMPLE_POLICY
from meshtoll.local.devstack import StackConfig
from meshtoll.local.processes import Child, announced_ports, http_ok, read_ports
from meshtoll.render.envoy import bootstrap
from meshtoll.render.params import DeployParams
from meshtoll.server.listeners import unix_listening_socket
from tests.client import fetch
from tests.envoy_harness import envoy_process, local_stack
from tests.envoy_validate import assert_envoy_accepts
from tests.serve import start_serve


@pytest.mark.integration
def test_the_workers_share_the_unix_sockets_the_supervisor_bound(tmp_path: Path) -> None:
    """Both sockets are bound once and inherited, as the TCP ports are: with two workers
    each answers on them (grpcio bound a socket path in each worker, which took it over
    from the other, so this needed one worker)."""
    with tempfile.TemporaryDirectory(prefix="mt-uds-") as directory:
        serve = start_serve(tmp_path, "--uds-dir", directory, "--workers", "2")
        try:
            serve.child.wait_ready(http_ok(f"{serve.admin_url}/readyz"), timeout=60)
            for _ in range(20):  # fresh connections: the kernel hands them to either worker
                with grpc.insecure_channel(f"unix:{directory}/grpc.sock") as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=30
                    )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(30)
                    sock.connect(f"{directory}/authz.sock")
                    sock.sendall(b"GET /v1/search HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        finally:
            serve.child.stop()


def test_a_live_socket_is_not_taken_over_but_a_stale_one_is(tmp_path: Path) -> None:
    path = tmp_path / "authz.sock"
    live = unix_listening_socket(path)
    try:
        with pytest.raises(ConfigError, match="already in use"):
            unix_listening_socket(path)
    finally:
        live.close()
    unix_listening_socket(path).close()  # the file a stopped server left behind
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="cannot listen"):
        unix_listening_socket(path)


def refuses(url: str) -> Callable[[], bool]:
    """Ready once Envoy answers and meshtoll, behind it, refuses a request without a key."""

    def probe() -> bool:
        try:
            return fetch(url).status == 401
        except OSError:
            return False

    return probe


@pytest.fixture(scope="module")
def sockets() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: a short directory, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="mt-uds-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def gateway(
    sockets: Path, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(the HTTP ext_authz listener's URL, the gRPC ext_authz listener's)"""
    work = tmp_path_factory.mktemp("sidecar")
    children: list[Child] = []
    try:
        serve = start_serve(work, "--uds-dir", str(sockets), name="serve")
        children.append(serve.child)
        serve.child.wait_ready(http_ok(f"{serve.admin_url}/readyz"), timeout=30)
        upstream_ports = work / "upstream.ports"
        argv = [sys.executable, "-m", "meshtoll.local.demo_upstream", "--host", "127.0.0.1", "--port", "0"]
        upstream = Child("demo upstream", [*argv, "--ports-file", str(upstream_ports)], work / "upstream.log")
        children.append(upstream)
        upstream.wait_ready(announced_ports(upstream_ports), timeout=30)
        upstream_port = read_ports(upstream_ports)["port"]
        params = DeployParams(upstream_host="127.0.0.1", upstream_port=upstream_port)
        config = bootstrap(params, PurePosixPath(sockets))
        # Loopback, on ports of Envoy's own choice (read back once it runs).
        names = []
        for listener in config["static_resources"]["listeners"]:
            listener["address"]["socket_address"] |= {"address": "127.0.0.1", "port_value": 0}
            names.append(listener["name"])
        config["admin"]["address"]["socket_address"] |= {"address": "127.0.0.1", "port_value": 0}
        text = yaml.safe_dump(config, sort_keys=False)
        (work / "checked.yaml").write_text(text)
        assert_envoy_accepts(envoy_binary, work / "checked.yaml")
        envoy = envoy_process("sidecar-envoy", config, work, binary=envoy_binary)
        children.append(envoy.child)
        envoy.wait_ready(timeout=30)
        ports = envoy.listener_ports()
        http_listener, grpc_listener = names
        http = f"http://127.0.0.1:{ports[http_listener]}"
        envoy.child.wait_ready(refuses(f"{http}/"), timeout=30)
        yield http, f"http://127.0.0.1:{ports[grpc_listener]}"
    finally:
        for child in reversed(children):
            child.stop()


@pytest.mark.integration
def test_the_sidecar_gateway_decides_over_the_unix_sockets(gateway: tuple[str, str]) -> None:
    http, _ = gateway
    denied = fetch(f"{http}/v1/search")
    assert denied.status == 401
    assert denied.headers["content-type"] == "application/json"
    allowed = fetch(f"{http}/v1/search?q=uds", headers={"x-api-key": DEMO_ACME_KEY})
    assert allowed.status == 200, allowed
    assert allowed.json()["headers"]["x-meshtoll-tenant"] == "acme"


@pytest.mark.integration
def test_hooks_reach_meshtoll_over_the_grpc_socket(gateway: tuple[str, str]) -> None:
    http, _ = gateway
    reply = fetch(f"{http}/v1/chat/completions?tokens=5", headers={"x-api-key": DEMO_ACME_KEY})
    assert reply.status == 200, reply
    assert reply.json()["headers"]["x-tenant-id"] == "acme"


@pytest.mark.integration
def test_the_grpc_authz_listener_works_over_the_socket(gateway: tuple[str, str]) -> None:
    _, grpc = gateway
    assert fetch(f"{grpc}/v1/items", headers={"x-api-key": DEMO_ACME_KEY}).status == 200


@pytest.mark.integration
def test_the_local_stack_can_reach_meshtoll_through_its_unix_sockets(
    sockets: Path, envoy_binary: Path
) -> None:
    # The benchmark's `--unix-sockets meshtoll`: the local stack's own Envoy configuration,
    # its meshtoll clusters pointed at the sockets.
    directory = sockets / "stack"
    directory.mkdir()
    config = StackConfig(policy=EXAMPLE_POLICY, envoy_binary=envoy_binary, meshtoll_sockets=directory)
    with local_stack(config) as stack:
        for listener in ("listen_http_authz_port", "listen_grpc_authz_port"):
            reply = fetch(stack.url(listener, "/v1/items"), headers={"x-api-key": DEMO_ACME_KEY})
            assert reply.status == 200, (listener, reply)
        clusters = fetch(f"{stack.envoy_admin_url}/clusters").body.decode()
    for cluster, socket_name in (("meshtoll_http", "authz.sock"), ("meshtoll_grpc", "grpc.sock")):
        assert re.search(rf"^{cluster}::{directory / socket_name}::rq_success::[1-9]", clusters, re.M), (
            clusters
        )
