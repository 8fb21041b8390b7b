"""`meshtoll serve` alone as a real process on ports of its own choice, for tests of its own
ports (TLS, admin access) that need no Envoy in front."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshtoll.local.processes import Child, announced_ports, http_ok, read_ports

EXAMPLE_POLICY = Path(__file__).parent.parent / "examples" / "policy.yaml"


@dataclass(frozen=True, slots=True)
class Serving:
    child: Child
    grpc_port: int
    http_authz_port: int
    admin_port: int

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def start_serve(
    work_dir: Path,
    *flags: str,
    policy: Path = EXAMPLE_POLICY,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    name: str = "meshtoll",
) -> Serving:
    """`meshtoll serve` with in-memory state on ports of its own choice, once it has bound
    them (not yet ready: its policy may still load). The caller stops `child`."""
    ports_file = work_dir / f"{name}.ports"
    argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(policy), "--host", host]
    argv += ["--grpc-port", "0", "--http-authz-port", "0", "--admin-port", "0"]
    argv += ["--ports-file", str(ports_file), *flags]
    # No Redis, whatever the environment of the test run says.
    child = Child(name, argv, work_dir / f"{name}.log", {"MESHTOLL_REDIS_URL": "", **(env or {})})
    try:
        child.wait_ready(announced_ports(ports_file), timeout=30)
    except BaseException:
        child.stop()
        raise
    ports = read_ports(ports_file)
    return Serving(child, ports["grpc_port"], ports["http_authz_port"], ports["admin_port"])


@contextmanager
def running_serve(
    work_dir: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Serving]:
    """`meshtoll serve` on examples/policy.yaml with in-memory state, ready; stopped after."""
    serving = start_serve(work_dir, *flags, env=env, host=host)
    try:
        serving.child.wait_ready(http_ok(f"{serving.admin_url}/readyz"), timeout=30)
        yield serving
    finally:
        serving.child.stop()
