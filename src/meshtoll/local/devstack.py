"""The local stack: Envoy in front of the demo upstream and meshtoll, plus Redis.

Shared by `meshtoll dev`, the integration tests and the benchmark, so that all three run
the same processes with the same Envoy configuration (envoy/local.yaml). Every process
listens on 127.0.0.1 only, on ports of its own choice unless the caller fixes some, read
back once it has bound them (local/processes.py says how each child gets its ports).

    with RedisServer() as redis, LocalStack(StackConfig(policy=path, redis_url=redis.url)) as stack:
        ...  # stack.url("listen_http_authz_port") is Envoy with HTTP ext_authz
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import yaml

from meshtoll.errors import ProcessStartError
from meshtoll.local.envoy_config import (
    EnvoyPorts,
    MeshtollTlsFiles,
    MtlsFiles,
    StubPorts,
    render_authz_stub,
    render_bootstrap,
)
from meshtoll.local.envoy_process import EnvoyProcess
from meshtoll.local.processes import (
    Child,
    Probe,
    announced_ports,
    free_ports,
    http_ok,
    listens,
    read_ports,
    retrying_lost_ports,
)
from meshtoll.settings import Settings
from meshtoll.storage.urls import parse_redis_url

# A bound on a process becoming ready, not a wait: a `meshtoll serve --workers 2` starting on
# a 2-core machine at a load of 15 took longer than 30 s.
START_TIMEOUT_SECONDS = 60.0
# Where Envoy's clusters point when their server is not running (no meshtoll, no stub): a
# privileged port nothing here listens on, so that a call is refused at once.
NOTHING_LISTENS = 1
# envoy/authz-stub.yaml's one listener.
STUB_LISTENER = "allow_all"


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    return None if found is None else Path(found)


def rls_environment(
    runtime_root: Path, redis_url: str, grpc_port: int = 0, port: int = 0, debug_port: int = 0
) -> dict[str, str]:
    """The environment of a local `meshtoll ratelimit` (envoyproxy/ratelimit's variables):
    its configuration under `runtime_root`/ratelimit/config, every port on loopback (0: its
    own choice, announced in MESHTOLL_PORTS_FILE)."""
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
    """A throwaway redis-server on loopback, persisting nothing; with `unix_socket`,
    listening on redis.sock in its work directory as well. redis-server cannot choose its
    own port and tell it, so without `port` it gets one from free_ports, and another if a
    process elsewhere bound that one first."""

    def __init__(
        self,
        work_dir: Path | None = None,
        binary: Path | None = None,
        port: int | None = None,
        *,
        unix_socket: bool = False,
        arguments: Sequence[str] = (),
    ) -> None:
        """`arguments`: more redis-server flags (never a secret: every local user can read
        a process's arguments)."""
        self._binary = binary or find_redis_server()
        self._arguments = tuple(arguments)
        self._work_dir = work_dir
        self._unix_socket = unix_socket
        self._cleanup = ExitStack()
        self._fixed_port = port
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
        binary = self._binary
        if binary is None:
            raise ProcessStartError("redis-server is not installed (e.g. apt-get install redis-server)")
        with self._cleanup:
            directory = _make_work_dir(self._work_dir, "meshtoll-redis-", self._cleanup)
            if self._unix_socket:
                self.socket_path = directory / "redis.sock"

            def start() -> tuple[Child, Probe]:
                self.port = self._fixed_port or free_ports(1)[0]
                argv = [str(binary), "--bind", "127.0.0.1", "--port", str(self.port)]
                argv += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
                if self.socket_path is not None:
                    argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
                child = Child("redis-server", [*argv, *self._arguments], directory / "redis.log")
                self._cleanup.callback(child.stop)
                return child, listens(child, self.port)

            if self._fixed_port:
                child, probe = start()
                child.wait_ready(probe, START_TIMEOUT_SECONDS)
            else:
                retrying_lost_ports(start, START_TIMEOUT_SECONDS)
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
    # By EnvoyPorts field, "meshtoll_admin_port" or "stub_admin_port": ports the caller chose
    # (a port of 0, or one not named: the process's own choice).
    fixed_ports: dict[str, int] = field(default_factory=dict)
    envoy_log_level: str = "warn"
    envoy_concurrency: int = 1  # worker threads; one makes benchmark rows comparable
    serve_args: tuple[str, ...] = ()  # more `meshtoll serve` flags
    # The policy's auth.api_key_query_param: Envoy removes it after HTTP ext_authz.
    api_key_query_param: str | None = None
    # Envoy reaches meshtoll through the Unix sockets `meshtoll serve --uds-dir` makes here.
    meshtoll_sockets: Path | None = None
    # An OTLP/HTTP collector on 127.0.0.1: Envoy sends its spans there (so does meshtoll,
    # when `meshtoll_environment` names it with OTEL_EXPORTER_OTLP_ENDPOINT).
    traces_port: int | None = None
    meshtoll_environment: tuple[tuple[str, str], ...] = ()  # more variables for meshtoll serve
    # The last change to Envoy's bootstrap before it starts (each time it starts): the tests
    # give their calls to meshtoll more time than the shipped timeouts (tests/envoy_harness.py).
    edit_envoy_bootstrap: Callable[[dict[str, Any]], dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class StackPorts:
    """Every port of a running stack, as its processes bound them."""

    envoy: EnvoyPorts
    meshtoll_admin_port: int
    stub_admin_port: int


_PORT_NAMES = frozenset({f.name for f in fields(EnvoyPorts)} | {"meshtoll_admin_port", "stub_admin_port"})
_MESHTOLL_PORTS = ("authz_grpc_port", "authz_http_port", "meshtoll_admin_port")


class LocalStack:
    """Starts the configured processes, waits until each is ready, stops them in reverse.

    The upstream, meshtoll and the authz stub start together; Envoy, whose clusters point at
    them, starts once they have said which ports they bound. meshtoll's ports come from
    free_ports rather than port 0, because `restart("meshtoll")` must bind the same ones
    again while Envoy keeps pointing at them: below the ephemeral range, no outgoing
    connection can take one in between."""

    def __init__(self, config: StackConfig) -> None:
        unknown = set(config.fixed_ports) - _PORT_NAMES
        if unknown:
            raise ValueError(f"unknown port names: {sorted(unknown)}")
        self.config = config
        self.work_dir = Path()
        self.children: dict[str, Child] = {}
        self._cleanup = ExitStack()
        self._ports: StackPorts | None = None
        self._meshtoll_ports: dict[str, int] = {}
        self._targets: dict[str, int] = {}  # the EnvoyPorts fields Envoy's clusters connect to

    @property
    def ports(self) -> StackPorts:
        if self._ports is None:
            raise ProcessStartError("the local stack has not started")
        return self._ports

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
            fixed = self.config.fixed_ports
            upstream, upstream_ports = self._start_upstream()
            meshtoll = None if self.config.policy is None else self._start_meshtoll(self.config.policy)
            stub = self._start_authz_stub() if self.config.authz_stub else None
            upstream.wait_ready(announced_ports(upstream_ports), START_TIMEOUT_SECONDS)
            self._targets = {
                "upstream_port": read_ports(upstream_ports)["port"],
                "authz_grpc_port": self._meshtoll_ports.get("authz_grpc_port", NOTHING_LISTENS),
                "authz_http_port": self._meshtoll_ports.get("authz_http_port", NOTHING_LISTENS),
                "stub_authz_port": fixed.get("stub_authz_port") or NOTHING_LISTENS,
            }
            stub_admin_port = 0
            if stub is not None:
                stub.wait_ready(START_TIMEOUT_SECONDS)
                self._targets["stub_authz_port"] = stub.listener_ports()[STUB_LISTENER]
                stub_admin_port = int(stub.admin_url.rsplit(":", 1)[1])
            # Envoy last, so that it stops first: it holds meshtoll's access-log stream,
            # which meshtoll would otherwise wait out for its whole shutdown grace.
            envoy_ports = self._start_envoy()
            self._ports = StackPorts(
                envoy_ports,
                self._meshtoll_ports.get("meshtoll_admin_port", NOTHING_LISTENS),
                stub_admin_port,
            )
            if meshtoll is not None:
                meshtoll.wait_ready(http_ok(f"{self.meshtoll_admin_url}/readyz"), START_TIMEOUT_SECONDS)
            self._cleanup = self._cleanup.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._cleanup.close()

    def restart(self, name: str) -> None:
        """Stop one child ("meshtoll" or "envoy") and start it again: meshtoll on the same
        ports (Envoy's clusters point at them), Envoy on listener ports of its own choice
        again (`ports` then has them)."""
        policy = self.config.policy
        if name == "meshtoll" and policy is None:
            raise ProcessStartError("this stack runs no meshtoll")
        self.children[name].stop()
        if name == "envoy" or policy is None:
            envoy = self._start_envoy()
            self._ports = dataclasses.replace(self.ports, envoy=envoy)
            return
        child = self._spawn_meshtoll(policy, self._meshtoll_ports)
        child.wait_ready(announced_ports(self._meshtoll_ports_file), START_TIMEOUT_SECONDS)
        child.wait_ready(http_ok(f"{self.meshtoll_admin_url}/readyz"), START_TIMEOUT_SECONDS)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.work_dir / f"{name}.log", env)
        self._cleanup.callback(child.stop)
        self.children[name] = child
        return child

    def _start_upstream(self) -> tuple[Child, Path]:
        ports_file = self.work_dir / "upstream.ports"
        port = self.config.fixed_ports.get("upstream_port", 0)
        module = "meshtoll.local.demo_upstream"
        argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
        return self._spawn("upstream", [*argv, "--ports-file", str(ports_file)]), ports_file

    @property
    def _meshtoll_ports_file(self) -> Path:
        return self.work_dir / "meshtoll.ports"

    def _start_meshtoll(self, policy: Path) -> Child:
        """meshtoll, once it has bound its ports (its readiness comes later: Envoy can start
        meanwhile)."""
        fixed = self.config.fixed_ports

        def start() -> tuple[Child, Probe]:
            chosen = iter(free_ports(len(_MESHTOLL_PORTS)))
            self._meshtoll_ports = {name: fixed.get(name) or next(chosen) for name in _MESHTOLL_PORTS}
            child = self._spawn_meshtoll(policy, self._meshtoll_ports)
            return child, announced_ports(self._meshtoll_ports_file)

        return retrying_lost_ports(start, START_TIMEOUT_SECONDS)

    def _spawn_meshtoll(self, policy: Path, ports: dict[str, int]) -> Child:
        # The file the last run wrote must not pass for this run's.
        self._meshtoll_ports_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(policy), "--host", "127.0.0.1"]
        argv += ["--grpc-port", str(ports["authz_grpc_port"])]
        argv += ["--http-authz-port", str(ports["authz_http_port"])]
        argv += ["--admin-port", str(ports["meshtoll_admin_port"]), "--workers", str(self.config.workers)]
        argv += ["--ports-file", str(self._meshtoll_ports_file)]
        # The Redis URL may carry a password: the environment, not argv (see Child).
        # An empty value: no Redis, even if this process's environment names one.
        env = {
            Settings.env_name("redis_url"): self.config.redis_url or "",
            **dict(self.config.meshtoll_environment),
        }
        argv += _serve_tls_args(self.config.meshtoll_tls)
        if self.config.meshtoll_sockets is not None:
            argv += ["--uds-dir", str(self.config.meshtoll_sockets)]
        argv += self.config.serve_args
        return self._spawn("meshtoll", argv, env)

    def _start_envoy(self) -> EnvoyPorts:
        """Envoy on the listener ports fixed, or of its own choice; ready, its ports read."""
        config = self.config
        requested = {
            name: config.fixed_ports.get(name, 0) for name in _PORT_NAMES if name.startswith("listen_")
        }
        asked = EnvoyPorts(admin_port=config.fixed_ports.get("admin_port", 0), **requested, **self._targets)
        bootstrap = render_bootstrap(
            asked,
            config.mtls,
            config.meshtoll_tls,
            config.meshtoll_sockets,
            config.api_key_query_param,
            config.traces_port,
        )
        if config.edit_envoy_bootstrap is not None:
            edited = config.edit_envoy_bootstrap(yaml.safe_load(bootstrap))
            bootstrap = yaml.safe_dump(edited, sort_keys=False)
        envoy = self._envoy("envoy", bootstrap)
        envoy.wait_ready(START_TIMEOUT_SECONDS)
        bound = {f"listen_{name}_port": port for name, port in envoy.listener_ports().items()}
        return dataclasses.replace(asked, admin_port=int(envoy.admin_url.rsplit(":", 1)[1]), **bound)

    def _start_authz_stub(self) -> EnvoyProcess:
        stub = StubPorts(self.config.fixed_ports.get("stub_admin_port", 0), 0)
        return self._envoy("authz-stub", render_authz_stub(stub))

    def _envoy(self, name: str, bootstrap: str) -> EnvoyProcess:
        envoy = EnvoyProcess(
            name,
            bootstrap,
            self.work_dir,
            binary=self.config.envoy_binary,
            concurrency=self.config.envoy_concurrency,
            log_level=self.config.envoy_log_level,
        )
        self._cleanup.callback(envoy.stop)
        self.children[name] = envoy.child
        return envoy


def _serve_tls_args(files: MeshtollTlsFiles | None) -> list[str]:
    if files is None:
        return []
    argv = ["--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key)]
    # Mutual TLS exactly when Envoy has a certificate to present.
    return argv if files.client_cert is None else [*argv, "--tls-client-ca", str(files.ca_cert)]
