"""`meshtoll serve` owns its ports: a second instance on them exits with an error naming
the port instead of silently taking half the traffic, while the workers of one instance
share them; and its admin port answers while its HTTP authz port is flooded. Real
processes on loopback ports of their own choice, with examples/policy.yaml."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.local.processes import Child, announced_ports, http_ok, listening_inodes, read_ports
from tests.waiting import eventually

pytestmark = pytest.mark.integration

POLICY = Path(__file__).parent.parent / "examples" / "policy.yaml"
# *flags -> a ready meshtoll serve on ports of its own choice, and them (gRPC, HTTP authz, admin)
Serve = Callable[..., tuple[Child, list[int]]]
ANY_PORTS = [0, 0, 0]


def serve_argv(ports: list[int], *flags: str) -> list[str]:
    grpc_port, http_port, admin_port = ports
    return [
        sys.executable,
        "-m",
        "meshtoll",
        "serve",
        "--policy",
        str(POLICY),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-authz-port",
        str(http_port),
        "--admin-port",
        str(admin_port),
        *flags,
    ]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    started: list[Child] = []

    def start(*flags: str) -> tuple[Child, list[int]]:
        ports_file = tmp_path / f"serve-{len(started)}.ports"
        argv = serve_argv(ANY_PORTS, "--ports-file", str(ports_file), *flags)
        child = Child("meshtoll", argv, tmp_path / f"serve-{len(started)}.log")
        started.append(child)
        child.wait_ready(announced_ports(ports_file), timeout=30)
        bound = read_ports(ports_file)
        ports = [bound["grpc_port"], bound["http_authz_port"], bound["admin_port"]]
        child.wait_ready(http_ok(f"http://127.0.0.1:{ports[2]}/readyz"), timeout=30)
        return child, ports

    yield start
    for child in started:
        child.stop()


def second_serve(ports: list[int], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(serve_argv(ports, *flags), capture_output=True, text=True, timeout=30)


def grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_status(port: int, path: str = "/healthz") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        return sock.recv(65536).split(b"\r\n", 1)[0]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("clash", ["grpc_port", "http_authz_port", "admin_port"])
def test_a_second_serve_on_a_taken_port_exits_naming_the_port(
    serve: Serve,
    clash: str,
    workers: str,
) -> None:
    first, ports = serve("--workers", workers)
    # The second instance has ports of its own but for the one that clashes.
    mine = list(ANY_PORTS)
    index = ("grpc_port", "http_authz_port", "admin_port").index(clash)
    mine[index] = ports[index]
    second = second_serve(mine, "--workers", workers)
    assert second.returncode != 0
    assert f"{clash}: 127.0.0.1:{ports[index]} is already in use" in second.stderr
    assert first.returncode is None
    assert grpc_serving(ports[0])
    assert http_status(ports[2]) == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_socket_joins_a_port_even_with_so_reuseport(serve: Serve, workers: str) -> None:
    """Each port is bound once, without SO_REUSEPORT, by the process that serves (the
    supervisor, with workers): a stranger that asks for SO_REUSEPORT cannot take part of its
    connections, the gRPC port's included (grpcio's needed a SO_REUSEPORT group)."""
    _, ports = serve("--workers", workers)
    for port in ports:
        joining = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        joining.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with joining, pytest.raises(OSError, match="in use"):
            joining.bind(("127.0.0.1", port))
    assert grpc_serving(ports[0])


def test_two_workers_share_every_port_and_survive_the_loss_of_one(
    serve: Serve,
) -> None:
    supervisor, ports = serve("--workers", "2")
    workers = eventually(
        lambda: _children(supervisor.pid),
        lambda found: len(found) >= 2,
        timeout=20,
        message="the supervisor never started its two workers",
    )
    assert len(workers) == 2
    # Every worker has every port: the sockets the supervisor bound, inherited.
    eventually(
        lambda: [_listening_ports(worker) for worker in workers],
        lambda listening: all(found >= set(ports) for found in listening),
        timeout=20,
        message=f"the workers never all listened on {ports}",
    )
    assert grpc_serving(ports[0])
    assert http_status(ports[1], "/v1/x") != b""
    # The supervisor is held still, so that the other worker serves alone: no restart can
    # stand in for it however slowly this runs.
    os.kill(supervisor.pid, signal.SIGSTOP)
    try:
        os.kill(workers[0], signal.SIGKILL)
        # One gRPC listener, as for the HTTP ports: the one socket the workers inherited (when
        # each worker's grpcio had its own SO_REUSEPORT socket, a new connection handed to
        # the dead worker's closing one would be reset, seen on loaded runs).
        eventually(
            lambda: len(listening_inodes(ports[0])),
            lambda listeners: listeners == 1,
            timeout=10,
            interval=0.01,
            message="the killed worker's gRPC listener never closed",
        )
        for _ in range(5):
            assert http_status(ports[2]) == b"HTTP/1.1 200 OK"
            assert http_status(ports[1], "/v1/x") != b""
            assert grpc_serving(ports[0])
    finally:
        os.kill(supervisor.pid, signal.SIGCONT)
    eventually(
        lambda: [worker for worker in _children(supervisor.pid) if worker != workers[0]],
        lambda found: len(found) == 2,
        timeout=20,
        message="the supervisor never started a worker in place of the killed one",
    )


def test_admin_answers_healthz_while_the_authz_port_is_flooded(
    serve: Serve,
) -> None:
    _, ports = serve("--http-max-connections", "100", "--http-header-timeout-seconds", "30")
    flood = [socket.create_connection(("127.0.0.1", ports[1])) for _ in range(300)]
    try:
        refused = flood[-1].recv(65536)  # the last one's answer: the whole flood has landed
        assert http_status(ports[2]) == b"HTTP/1.1 200 OK"
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert json.loads(refused.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
    finally:
        for sock in flood:
            sock.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    # multiprocessing's spawn also starts a resource tracker; the workers are the others.
    return [child for child in found if "resource_tracker" not in _cmdline(child)]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on; none once it has exited."""
    proc = Path("/proc") / str(pid)
    try:
        descriptors = list((proc / "fd").iterdir())
        # grpcio listens on IPv4-mapped IPv6 sockets, so both tables.
        lines = [
            line for table in ("tcp", "tcp6") for line in (proc / "net" / table).read_text().splitlines()[1:]
        ]
    except OSError:
        return set()
    inodes = set()
    for fd in descriptors:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
