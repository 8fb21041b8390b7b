"""Real Redis Cluster and Sentinel deployments on loopback, for the topology tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from meshtoll.local.devstack import find_redis_server
from meshtoll.local.processes import Child, free_ports, tcp_accepts
from tests.waiting import eventually

START_SECONDS = 15.0


def _redis(cleanup: ExitStack, directory: Path, name: str, *arguments: str) -> Child:
    directory.mkdir(parents=True, exist_ok=True)
    binary = str(find_redis_server())
    child = Child(name, [binary, *arguments], directory / f"{name}.log")
    cleanup.callback(child.stop)
    return child


def _cli(port: int, *arguments: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *arguments], check=True, capture_output=True, text=True, timeout=30
    ).stdout


@contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[list[int]]:
    """A cluster of `masters` masters and no replicas; yields their ports."""
    # The cluster bus ports are chosen too: the default (port + 10000) may be taken, or
    # beyond 65535 for a high ephemeral port.
    chosen = free_ports(2 * masters)
    ports, bus_ports = chosen[:masters], chosen[masters:]
    with ExitStack() as cleanup:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            node = directory / f"node-{port}"
            child = _redis(
                cleanup, node, f"redis-{port}",
                "--port", str(port), "--cluster-port", str(bus_port),
                "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node),
                "--save", "", "--appendonly", "no",
            )  # fmt: skip
            child.wait_ready(tcp_accepts(port), START_SECONDS)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        _cli(ports[0], "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes")
        eventually(
            lambda: all("cluster_state:ok" in _cli(port, "cluster", "info") for port in ports),
            timeout=START_SECONDS,
            message="the Redis Cluster never reached cluster_state:ok",
        )
        yield ports


@contextmanager
def redis_sentinel(directory: Path, service: str = "meshtoll") -> Iterator[tuple[int, int]]:
    """A master and one Sentinel monitoring it; yields (master port, sentinel port)."""
    master, sentinel = free_ports(2)
    with ExitStack() as cleanup:
        _redis(
            cleanup, directory / "master", "redis-master",
            "--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory / "master"),
        ).wait_ready(tcp_accepts(master), START_SECONDS)  # fmt: skip
        config = directory / "sentinel.conf"
        config.write_text(
            f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor {service} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {service} 5000\n"
        )
        _redis(cleanup, directory, "redis-sentinel", str(config), "--sentinel").wait_ready(
            tcp_accepts(sentinel), START_SECONDS
        )
        yield master, sentinel


def slot_owner(ports: list[int], slot: int) -> int:
    """The port of the master serving `slot`."""
    for line in _cli(ports[0], "cluster", "nodes").splitlines():
        fields = line.split()
        address, ranges = fields[1].split("@")[0], fields[8:]
        for item in ranges:
            low, _, high = item.partition("-")
            if int(low) <= slot <= int(high or low):
                return int(address.rsplit(":", 1)[1])
    raise LookupError(f"no master serves slot {slot}")


def counters_in_slot(port: int, slot: int) -> list[str]:
    """The counter keys a node holds in `slot` (not the decisions' short-lived markers)."""
    names = _cli(port, "cluster", "getkeysinslot", str(slot), "1000").split()
    return sorted(name for name in names if "_decision_" not in name)
