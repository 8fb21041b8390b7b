"""The ports of `meshtoll serve`, bound once by the process that owns them, and what each
HTTP port accepts.

Two `meshtoll serve` on the same ports must not share them silently: each would take part
of Envoy's connections and answer them with its own policy. So no stranger can join a port:
every port (gRPC, HTTP authz, admin, and the Unix sockets of --uds-dir) is bound once,
without SO_REUSEPORT, by the process that starts serving (the supervisor, when there are
workers); workers inherit the listening sockets and accept from them. Anyone else's bind
fails with EADDRINUSE, with or without SO_REUSEPORT (Linux joins a port only when every
socket on it asked for SO_REUSEPORT). The gRPC port is served by meshtoll's own HTTP/2
server (transport/h2_server.py), which takes a bound socket as the HTTP server does;
grpcio could not, and needed a SO_REUSEPORT group and a guard socket to keep it closed.
"""

from __future__ import annotations

import errno
import socket
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
    grpc: socket.socket
    http_authz_unix: socket.socket | None = None  # in Settings.uds_dir, when given
    grpc_unix: socket.socket | None = None  # likewise

    def ports(self) -> dict[str, int]:
        """The TCP ports as bound, by setting name (a port of 0 became the kernel's choice)."""
        return {
            "grpc_port": self.grpc.getsockname()[1],
            "http_authz_port": self.http_authz.getsockname()[1],
            "admin_port": self.admin.getsockname()[1],
        }

    def close(self) -> None:
        for sock in (self.admin, self.http_authz, self.grpc, self.http_authz_unix, self.grpc_unix):
            if sock is not None:
                sock.close()


def bind_listeners(settings: Settings) -> Listeners:
    """Bind every port of `settings`; a ConfigError naming the port if one is taken."""
    bound: list[socket.socket] = []
    try:
        for name in ("admin_port", "http_authz_port", "grpc_port"):
            bound.append(_bind(settings.host, name, getattr(settings, name)))
        if settings.uds_dir is not None:
            for name in (UDS_HTTP_AUTHZ, UDS_GRPC):
                bound.append(unix_listening_socket(settings.uds_dir / name))
    except ConfigError:
        for sock in bound:
            sock.close()
        raise
    admin, http_authz, grpc, *unix = bound
    return Listeners(admin, http_authz, grpc, *unix)


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


def _bind(host: str, setting: str, port: int) -> socket.socket:
    try:
        return listening_socket(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{setting}: {host}:{port} is already in use (another meshtoll serve?)"
            ) from None
        raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})") from None
