"""`meshtoll serve` alone as a real process on free ports, for tests of its own ports
(TLS, admin access) that need no Envoy in front."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshtoll.local.processes import Child, free_ports, http_ok

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


@contextmanager
def running_serve(
    work_dir: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Serving]:
    """`meshtoll serve` on examples/policy.yaml with in-memory state, ready; stopped after."""
    grpc_port, http_authz_port, admin_port = free_ports(3)
    argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(EXAMPLE_POLICY), "--host", host]
    argv += ["--grpc-port", str(grpc_port), "--http-authz-port", str(http_authz_port)]
    argv += ["--admin-port", str(admin_port), *flags]
    # No Redis, whatever the environment of the test run says.
    child = Child("meshtoll", argv, work_dir / "meshtoll.log", {"MESHTOLL_REDIS_URL": "", **(env or {})})
    try:
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/readyz"), timeout=30)
        yield Serving(child, grpc_port, http_authz_port, admin_port)
    finally:
        child.stop()
