"""How long a revocation or a suspension takes to be refused everywhere: two `meshtoll serve`
processes on one Redis, a change made through the first one's admin API, then both
processes' HTTP authz ports asked again and again (as Envoy would ask them) until each
refuses. Each sample is "change committed (the API answered) -> refused by both instances";
the report gives the distribution (p50, p99, max) per kind of change.

    python bench/propagation.py [--samples N] [--tenants N]

--tenants seeds that many run-time tenants first (bench/runtime_tenants.py), so that the
registry an instance follows has the size of a real one; the samples use tenants of their own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime_tenants import seed_runtime_tenants

from meshtoll.local.devstack import RedisServer
from meshtoll.local.processes import Child, announced_ports, http_ok, read_ports

POLICY = "plans: {pro: {}}\nroutes: [{prefix: /v1/, name: v1}]\n"
READY_SECONDS = 120.0
# A sample not refused by both within this long is reported as a failure, not waited on.
GIVE_UP_SECONDS = 30.0


@dataclass
class Instance:
    name: str
    admin_port: int
    authz_port: int
    connection: http.client.HTTPConnection | None = None

    def admin(self, method: str, path: str, body: object = None) -> dict[str, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"content-type": "application/json"})
            reply = connection.getresponse()
            document: dict[str, object] = json.loads(reply.read())
            if reply.status >= 300:
                raise RuntimeError(f"{method} {path}: {reply.status} {document}")
            return document
        finally:
            connection.close()

    def decision(self, key: str) -> int:
        """The HTTP authz port's status for a request with `key`, on a kept-alive connection."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.authz_port, timeout=10)
        self.connection.request("GET", "/v1/items", headers={"x-api-key": key, "x-request-id": "bench"})
        reply = self.connection.getresponse()
        reply.read()
        return reply.status


@contextmanager
def instances(directory: Path, redis_url: str) -> Iterator[list[Instance]]:
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    with ExitStack() as running:
        started = []
        for name in ("a", "b"):
            # Port 0 everywhere: each instance binds ports of the kernel's choice and says which.
            ports_file = directory / f"meshtoll-{name}.ports"
            argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(policy), "--host", "127.0.0.1"]
            argv += ["--grpc-port", "0", "--http-authz-port", "0", "--admin-port", "0"]
            argv += ["--ports-file", str(ports_file)]
            child = Child(
                f"meshtoll-{name}",
                argv,
                directory / f"meshtoll-{name}.log",
                {"MESHTOLL_REDIS_URL": redis_url},
            )
            running.callback(child.stop)
            started.append((child, name, ports_file))
        ready = []
        for child, name, ports_file in started:
            child.wait_ready(announced_ports(ports_file), READY_SECONDS)
            ports = read_ports(ports_file)
            instance = Instance(name, ports["admin_port"], ports["http_authz_port"])
            child.wait_ready(http_ok(f"http://127.0.0.1:{instance.admin_port}/readyz"), READY_SECONDS)
            ready.append(instance)
        yield ready


def refused_by_both(both: list[Instance], key: str, committed: float) -> float:
    """Seconds from `committed` until every instance refuses `key`."""
    pending = list(both)
    while pending:
        if time.monotonic() - committed > GIVE_UP_SECONDS:
            raise RuntimeError(f"not refused by {[i.name for i in pending]} after {GIVE_UP_SECONDS:g} s")
        pending = [instance for instance in pending if instance.decision(key) == 200]
    return time.monotonic() - committed


def sample(both: list[Instance], n: int, kind: str) -> float:
    a = both[0]
    tenant = f"prop-{kind}-{n}"
    a.admin("POST", "/api/tenants", {"name": tenant, "plan": "pro"})
    key = str(a.admin("POST", f"/api/tenants/{tenant}/keys", {"id": "k"})["key"])
    while any(instance.decision(key) != 200 for instance in both):
        time.sleep(0.01)  # not measured: waiting for the new tenant to be everywhere
    if kind == "revocation":
        a.admin("DELETE", f"/api/tenants/{tenant}/keys/k")
    else:
        a.admin("PATCH", f"/api/tenants/{tenant}", {"status": "suspended"})
    return refused_by_both(both, key, time.monotonic())


def report(kind: str, seconds: list[float]) -> str:
    ms = sorted(value * 1000 for value in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{kind}: {len(ms)} samples, change committed -> refused by both instances: "
        f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100, help="changes of each kind")
    parser.add_argument("--tenants", type=int, default=0, help="run-time tenants seeded first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshtoll-propagation-") as directory, RedisServer() as redis:
        if args.tenants:
            seeded = seed_runtime_tenants(redis.url, args.tenants)
            print(f"{args.tenants:,} run-time tenants seeded in {seeded:.1f} s", file=sys.stderr)
        with instances(Path(directory), redis.url) as both:
            for kind in ("revocation", "suspension"):
                print(report(kind, [sample(both, n, kind) for n in range(args.samples)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
