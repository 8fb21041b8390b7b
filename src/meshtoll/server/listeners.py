"""The ports of `meshtoll serve`, bound once by the process that owns them, and what each
HTTP port accepts.

Two `meshtoll serve` on the same ports must not share them silently: each would take part
of Envoy's connections and answer them with its own policy. So no stranger can join a port:

- the HTTP ports (authz, admin) are bound once, without SO_REUSEPORT, by the process that
  starts serving (the supervisor, when there are workers); workers inherit the listening
  sockets and accept from them;
- grpcio binds its port itself and cannot take a bound socket, so each worker's gRPC server
  binds with SO_REUSEPORT. To keep strangers out of that group, the owner first binds the
  port plainly, which fails if anyone holds it, then holds it for as long as it serves with
  a guard socket that has SO_REUSEPORT, not SO_REUSEADDR, and never listens. Linux lets a
  socket bind beside another only when both ask for SO_REUSEPORT (and run as the same user)
  or both ask for SO_REUSEADDR and neither listens, so the guard receives no connections,
  the gRPC servers join it, and anyone's plain bind fails (verified on Linux 6.18).
  A meshtoll older than this, which sets SO_REUSEPORT everywhere, run by the same user,
  could still join the gRPC port.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from meshtoll.errors import ConfigError
from meshtoll.settings import Settings
from meshtoll.transport.http_listener import HttpLimits, connection_cap, listening_socket

# The Unix sockets in Settings.uds_dir: every gRPC service, and the HTTP ext_authz fast path.
UDS_GRPC = "grpc.sock"
UDS_HTTP_AUTHZ = "authz.sock"


@dataclass(slots=True)
class Listeners:
    admin: socket.socket
    http_authz: socket.socket
    grpc_port: int  # as bound: a grpc_port of 0 in the settings becomes the kernel's choice
    grpc_guard: socket.socket | None  # the owner's; a worker gets None
    http_authz_unix: socket.socket | None = None  # in Settings.uds_dir, when given

    def ports(self) -> dict[str, int]:
        """The TCP ports as bound, by setting name (a port of 0 became the kernel's choice)."""
        return {
            "grpc_port": self.grpc_port,
            "http_authz_port": self.http_authz.getsockname()[1],
            "admin_port": self.admin.getsockname()[1],
        }

    def for_worker(self) -> Listeners:
        """What a worker needs: the HTTP sockets to accept from and the gRPC port to join."""
        return Listeners(self.admin, self.http_authz, self.grpc_port, None, self.http_authz_unix)

    def close(self) -> None:
        for sock in (self.admin, self.http_authz, self.grpc_guard, self.http_authz_unix):
            if sock is not None:
                sock.close()


def bind_listeners(settings: Settings) -> Listeners:
    """Bind every port of `settings`; a ConfigError naming the port if one is taken."""
    bound: list[socket.socket] = []
    try:
        for name in ("admin_port", "http_authz_port"):
            bound.append(_bind(settings.host, name, getattr(settings, name), listening_socket))
        guard = _bind(settings.host, "grpc_port", settings.grpc_port, _grpc_guard)
        bound.append(guard)
        unix = None if settings.uds_dir is None else unix_listening_socket(settings.uds_dir / UDS_HTTP_AUTHZ)
    except ConfigError:
        for sock in bound:
            sock.close()
        raise
    return Listeners(bound[0], bound[1], guard.getsockname()[1], guard, unix)


def unix_listening_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`. A socket file a previous run left behind is
    replaced; one that a live server answers on is not (ConfigError), nor any other file."""
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise ConfigError(f"uds_dir: {path} is already in use (another meshtoll serve?)")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"uds_dir: cannot listen on {path} ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


def port_limits(settings: Settings) -> tuple[HttpLimits, HttpLimits]:
    """(HTTP authz, admin): the same timeouts, and a cap each, so that a flood of one port's
    connections cannot keep the other (and its /healthz) from answering."""
    authz = HttpLimits(
        header_timeout_seconds=settings.http_header_timeout_seconds,
        idle_timeout_seconds=settings.http_idle_timeout_seconds,
        max_connections=settings.http_max_connections or connection_cap(),
    )
    return authz, replace(authz, max_connections=settings.admin_max_connections)


def _bind(host: str, setting: str, port: int, bind: Callable[[str, int], socket.socket]) -> socket.socket:
    try:
        return bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{setting}: {host}:{port} is already in use (another meshtoll serve?)"
            ) from None
        raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})") from None


def _grpc_guard(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port != 0:
        # The plain bind that fails if anyone holds the port; closed before the guard binds.
        # (Port 0 needs none: the kernel picks a port nobody holds, for the guard itself.)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    guard = socket.socket(family, socket.SOCK_STREAM)
    guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        guard.bind((host, port))
    except OSError:
        guard.close()
        raise
    return guard
