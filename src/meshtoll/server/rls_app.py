"""Serving `meshtoll ratelimit`: the rate-limit service alone, as envoyproxy/ratelimit runs,
wired by `build_rls(settings)` (rls_services.py) and put behind its ports.

Ports as envoyproxy/ratelimit's: gRPC (RLS and health), HTTP `/healthcheck` and `/json`,
and a debug port with `/rlconfig` and `/metrics` (the per-limit statistics under the names
envoyproxy/ratelimit's Prometheus mapping gives them). An invalid initial configuration
refuses to start (envoyproxy/ratelimit starts and fails every call): a pod that cannot
answer correctly should not pass its readiness probe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from meshtoll.envoyproxy_ratelimit.environment import RlsSettings
from meshtoll.errors import ConfigError
from meshtoll.ratelimit.rls import RLS_METHOD
from meshtoll.server.event_loop import running_loop_name
from meshtoll.server.grpc_health import HEALTH_CHECK
from meshtoll.server.lifecycle import (
    Listener,
    announce_ports,
    keep_running,
    serve_until_signalled,
    stop_serving,
)
from meshtoll.server.rls_services import RlsServices, build_rls
from meshtoll.transport.h2_server import UnaryHandler, serve_grpc
from meshtoll.transport.http_listener import listening_socket
from meshtoll.transport.http_server import serve_http, serve_http_reading_bodies

log = logging.getLogger("meshtoll.ratelimit")


class RlsApp:
    def __init__(self, settings: RlsSettings) -> None:
        self.settings = settings
        self.services: RlsServices | None = None
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.ports: dict[str, int] = {}  # as bound, once started (a port of 0: the kernel's choice)

    async def start(self) -> None:
        settings = self.settings
        self.services = services = await build_rls(settings)
        for name, work in services.background.items():
            self._tasks.append(asyncio.create_task(keep_running(name, work, services.restarts)))
        grpc_port = self._start_grpc(services)
        await services.health.set("redis", await services.store.ping())
        http = _listening(settings.host, settings.port)
        debug = _listening(settings.debug_host, settings.debug_port)
        self._listeners.append(await serve_http_reading_bodies(services.http, http))
        self._listeners.append(await serve_http(services.debug, debug))
        self.ports = ports = {
            "grpc_port": grpc_port,
            "port": http.getsockname()[1],
            "debug_port": debug.getsockname()[1],
        }
        announce_ports(settings.ports_file, ports)
        log.warning(
            "meshtoll ratelimit serving on %s: gRPC %s:%d, HTTP %s:%d, debug %s:%d; "
            "configuration %s (%d domains)",
            running_loop_name(),
            settings.grpc_host,
            ports["grpc_port"],
            settings.host,
            ports["port"],
            settings.debug_host,
            ports["debug_port"],
            settings.config_directory,
            len(services.configs.current.domains),
        )

    def _start_grpc(self, services: RlsServices) -> int:
        """The gRPC port on meshtoll's own h2c server (transport/h2_server.py): unary
        ShouldRateLimit and Health/Check. Its socket has no SO_REUSEPORT, so this process owns
        the port alone (no other process, a `meshtoll serve` among them, can join it), or fails
        to start."""
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            sock = listening_socket(self.settings.grpc_host, self.settings.grpc_port)
        except OSError as exc:
            raise ConfigError(f"GRPC_PORT: cannot listen on {address} ({exc.strerror})") from None
        methods: dict[str, UnaryHandler] = {
            RLS_METHOD: services.ratelimit.should_rate_limit,
            HEALTH_CHECK: services.health.check,
        }
        self._listeners.append(serve_grpc(methods, sock))
        port: int = sock.getsockname()[1]
        return port

    async def draining(self) -> None:
        """SIGTERM: fail health first, so that load balancers stop sending."""
        if self.services is not None:
            await self.services.health.set("sigterm", False)

    async def stop(self) -> None:
        await stop_serving(self._listeners, self._tasks)
        if self.services is not None:
            await self.services.close()


class _JsonFormatter(logging.Formatter):
    """envoyproxy/ratelimit's LOG_FORMAT=json fields: @timestamp, @message, level."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "@timestamp": self.formatTime(record),
                "@message": record.getMessage(),
                "level": record.levelname.lower(),
            }
        )


def configure_logging(settings: RlsSettings) -> None:
    """LOG_LEVEL (envoyproxy/ratelimit's names: debug, info, warn, error) and LOG_FORMAT (text, json)."""
    root = logging.getLogger()
    root.setLevel(
        {"WARN": "WARNING", "FATAL": "CRITICAL", "PANIC": "CRITICAL"}.get(
            settings.log_level, settings.log_level
        )
    )
    if settings.log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(_JsonFormatter())


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    return sock


async def run(settings: RlsSettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    app = RlsApp(settings)
    await serve_until_signalled(app.start, app.stop, app.draining)
