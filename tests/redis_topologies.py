"""Real Redis Cluster and Sentinel deployments on loopback, for the topology tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from meshtoll.local.devstack import find_redis_server
from meshtoll.local.processes import Child, Probe, free_ports, listens, retrying_lost_ports
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
    ports: list[int] = []
    with ExitStack() as cleanup:
        for _ in range(masters):
            ports.append(_cluster_node(cleanup, directory))
        nodes = [f"127.0.0.1:{port}" for port in ports]
        _cli(ports[0], "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes")
        eventually(
            lambda: all("cluster_state:ok" in _cli(port, "cluster", "info") for port in ports),
            timeout=START_SECONDS,
            message="the Redis Cluster never reached cluster_state:ok",
        )
        yield ports


def _cluster_node(cleanup: ExitStack, directory: Path) -> int:
    """One cluster node, started; its port. The cluster bus port is chosen too: the default
    (port + 10000) may be taken, or beyond 65535."""
    port = 0

    def start() -> tuple[Child, Probe]:
        nonlocal port
        port, bus_port = free_ports(2)
        node = directory / f"node-{port}"
        child = _redis(
            cleanup, node, f"redis-{port}",
            "--port", str(port), "--cluster-port", str(bus_port),
            "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node),
            "--save", "", "--appendonly", "no",
        )  # fmt: skip
        return child, listens(child, port)

    retrying_lost_ports(start, START_SECONDS)
    return port


@contextmanager
def redis_sentinel(directory: Path, service: str = "meshtoll") -> Iterator[tuple[int, int]]:
    """A master and one Sentinel monitoring it; yields (master port, sentinel port)."""
    master = sentinel = 0
    with ExitStack() as cleanup:

        def start_master() -> tuple[Child, Probe]:
            nonlocal master
            (master,) = free_ports(1)
            child = _redis(
                cleanup, directory / "master", "redis-master",
                "--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(directory / "master"),
            )  # fmt: skip
            return child, listens(child, master)

        def start_sentinel() -> tuple[Child, Probe]:
            nonlocal sentinel
            (sentinel,) = free_ports(1)
            config = directory / "sentinel.conf"  # written anew: Sentinel rewrites its own
            config.write_text(
                f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor {service} 127.0.0.1 {master} 1\n"
                f"sentinel down-after-milliseconds {service} 5000\n"
            )
            child = _redis(cleanup, directory, "redis-sentinel", str(config), "--sentinel")
            return child, listens(child, sentinel)

        retrying_lost_ports(start_master, START_SECONDS)
        retrying_lost_ports(start_sentinel, START_SECONDS)
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
