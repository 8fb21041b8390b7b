"""Serving `meshtoll serve`: its ports answer at once (503 while the policy loads), then the
services `build(settings)` wires are put behind them and their background work started;
on SIGINT or SIGTERM everything stops in an order that loses no admitted request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

from meshtoll.authz.grpc_transport import CHECK_METHOD
from meshtoll.meter.otlp import EXPORT_METHOD, LOGS_SERVICE
from meshtoll.ratelimit.rls import RLS_METHOD
from meshtoll.server.admin import AdminPort
from meshtoll.server.admin_access import is_loopback
from meshtoll.server.event_loop import running_loop_name
from meshtoll.server.grpc_health import HEALTH_CHECK, HEALTH_WATCH, ServeHealth
from meshtoll.server.lifecycle import announce_ports, keep_running, serve_until_signalled, stop_serving
from meshtoll.server.listeners import Listeners, bind_listeners, port_limits
from meshtoll.server.services import Services, build
from meshtoll.server.tls import ServiceTls, load_service_tls
from meshtoll.settings import Settings
from meshtoll.telemetry.workers import WorkerGroup
from meshtoll.transport.h2_server import (
    CallAborted,
    CallContext,
    StatusCode,
    StreamHandler,
    UnaryHandler,
    serve_grpc,
)
from meshtoll.transport.http_listener import HttpLimits, HttpListener
from meshtoll.transport.http_server import (
    Handler,
    StartingHandler,
    serve_http,
    serve_http_reading_bodies,
)

log = logging.getLogger("meshtoll")

SERVICES = (
    "envoy.service.auth.v3.Authorization",
    "envoy.service.ratelimit.v3.RateLimitService",
    "ratelimit",  # the name envoyproxy/ratelimit's health service answers to
    "envoy.service.accesslog.v3.AccessLogService",
    LOGS_SERVICE,
    "envoy.service.ext_proc.v3.ExternalProcessor",
)
ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
EXTPROC_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
GRPC_UNARY_METHODS = (CHECK_METHOD, RLS_METHOD, EXPORT_METHOD, HEALTH_CHECK)
GRPC_STREAM_METHODS = (ALS_METHOD, EXTPROC_METHOD, HEALTH_WATCH)
STARTING = "meshtoll is starting: its policy is loading"


def _refuse_starting(request: bytes, context: CallContext) -> bytes:
    raise CallAborted(StatusCode.UNAVAILABLE, STARTING)


def _stream_now(
    streams: dict[str, StreamHandler], path: str, requests: AsyncIterator[bytes], context: CallContext
) -> AsyncIterator[bytes]:
    return streams[path](requests, context)


async def _refuse_starting_stream(
    requests: AsyncIterator[bytes], context: CallContext
) -> AsyncIterator[bytes]:
    raise CallAborted(StatusCode.UNAVAILABLE, STARTING)
    yield b""  # a generator, as the server expects a stream handler to be


class App:
    def __init__(self, settings: Settings, listeners: Listeners, metrics_dir: Path | None = None) -> None:
        """`metrics_dir`: where the workers of one process group share their metrics (the
        supervisor's, with --workers N); None for a process serving alone."""
        self.settings = settings
        self.listeners = listeners
        self.metrics_dir = metrics_dir
        self.group: WorkerGroup | None = None
        self.services: Services | None = None
        self._servers: list[HttpListener] = []
        self._health = ServeHealth(SERVICES)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        tls = load_service_tls(settings)
        authz_limits, admin_limits = port_limits(settings)
        # Every HTTP port answers from the start, so that probes and Envoy get a clean 503
        # while a large policy compiles rather than a connection left in the queue.
        admin_port = AdminPort()
        http_authz_port = StartingHandler()
        # The admin port reads request bodies (the tenant API); the authz ports never do.
        self._servers.append(
            await serve_http_reading_bodies(admin_port, self.listeners.admin, limits=admin_limits)
        )
        # A worker shares the authz ports' queue with the group's other workers: until it can
        # decide, it leaves the connections to those already serving (it was restarted, or
        # started a little later) instead of refusing them 503 `not_ready`, as its gRPC port
        # joins only once ready. At the group's first start the kernel holds them until a
        # worker is ready; the pod is not ready before then, so Envoy sends none there.
        starting_alone = self.metrics_dir is None
        # The gRPC port's methods, filled in once the services are built: until then each
        # call is refused UNAVAILABLE at once, for the HTTP authz port's reason (a Check left
        # in the queue would be decided, and admitted, after Envoy had given up on it).
        unary: dict[str, UnaryHandler] = dict.fromkeys(GRPC_UNARY_METHODS, _refuse_starting)
        streams: dict[str, StreamHandler] = dict.fromkeys(GRPC_STREAM_METHODS, _refuse_starting_stream)
        if starting_alone:
            await self._serve_http_authz(http_authz_port, tls, authz_limits)
            # First in the list: on stop the gRPC port closes (its streams' grace) before the others.
            self._servers[:0] = self._serve_grpc(unary, streams, tls)
        self.services = services = await build(settings)
        if self.metrics_dir is not None:
            self.group = WorkerGroup(self.metrics_dir, services.metrics)
            self.group.attach()
            services.background["metrics snapshot"] = self.group.run_forever
        for name, work in services.background.items():
            self._tasks.append(asyncio.create_task(keep_running(name, work, services.restarts)))
        http_authz_port.ready(services.http_authz)
        self._grpc_methods(services, unary, streams)
        if not starting_alone:
            await self._serve_http_authz(services.http_authz, tls, authz_limits)
            self._servers[:0] = self._serve_grpc(unary, streams, tls)
        admin_port.ready(services.admin)
        self._log_started(services, tls)

    async def _serve_http_authz(self, handler: Handler, tls: ServiceTls | None, limits: HttpLimits) -> None:
        context = None if tls is None else tls.context
        self._servers.append(await serve_http(handler, self.listeners.http_authz, context, limits=limits))
        if self.listeners.http_authz_unix is not None:
            self._servers.append(await serve_http(handler, self.listeners.http_authz_unix, limits=limits))

    def _log_started(self, services: Services, tls: ServiceTls | None) -> None:
        settings = self.settings
        ports = self.listeners.ports()
        log.info(
            "meshtoll serving on %s: gRPC %s:%d, HTTP authz %s:%d, admin %s:%d; policy %s (%d tenants); %s",
            running_loop_name(),
            settings.host,
            ports["grpc_port"],
            settings.host,
            ports["http_authz_port"],
            settings.host,
            ports["admin_port"],
            settings.policy,
            len(services.policy.current.tenants),
            "counters in Redis" if settings.redis_url else "counters in memory (no --redis-url)",
        )
        log.info(
            "authz ports: %s; admin /api/*: %s (probes and /metrics open)",
            "plain text" if tls is None else "mutual TLS" if tls.mutual else "TLS",
            "bearer token" if services.admin.access.needs_token else "loopback clients only",
        )
        if not is_loopback(settings.host) and (tls is None or not tls.mutual):
            # Not an error: in Kubernetes a NetworkPolicy or the mesh's mTLS may be the guard.
            log.warning(
                "the decision ports listen on %s without client certificates: whatever reaches "
                "them can settle access-log entries, report ext_proc units, spend tenants' limits "
                "through the RLS and make admissions for keys it holds; let only the gateway reach "
                "them (NetworkPolicy, mesh mTLS) or set --tls-client-ca",
                settings.host,
            )

    def _grpc_methods(
        self, services: Services, unary: dict[str, UnaryHandler], streams: dict[str, StreamHandler]
    ) -> None:
        """Put the services behind the gRPC port's methods, in the mappings it serves from."""
        unary.update(
            {
                CHECK_METHOD: services.grpc_authz.check,
                RLS_METHOD: services.ratelimit.should_rate_limit,
                # The meter listens to both of Envoy's access loggers: OpenTelemetry (the
                # default, cheaper for Envoy and for meshtoll) and the gRPC access log service.
                EXPORT_METHOD: services.otlp_meter.export_bytes,
                HEALTH_CHECK: self._health.check,
            }
        )
        streams.update(
            {
                ALS_METHOD: services.meter.stream_access_logs,
                EXTPROC_METHOD: services.hooks.process_stream,
                HEALTH_WATCH: self._health.watch,
            }
        )

    def _serve_grpc(
        self, unary: dict[str, UnaryHandler], streams: dict[str, StreamHandler], tls: ServiceTls | None
    ) -> list[HttpListener]:
        """Every gRPC service on meshtoll's own HTTP/2 server (transport/h2_server.py), on
        the socket the owner bound (see server/listeners.py) and on the Unix socket."""
        context = None if tls is None else tls.grpc_context
        # The server keeps the unary mapping it is given (so `unary` filled in later is
        # seen) but copies the streams' one: each stream is started through `streams` as
        # it is then.
        current = {path: partial(_stream_now, streams, path) for path in streams}
        servers = [serve_grpc(unary, self.listeners.grpc, streams=current, tls=context)]
        if self.listeners.grpc_unix is not None:
            # Plain: the socket file's permissions, not TLS, keep others out of a pod.
            servers.append(serve_grpc(unary, self.listeners.grpc_unix, streams=current))
        return servers

    async def stop(self) -> None:
        # Refuse first, then stop serving, then let the background work (the last flush of
        # admissions among it) finish: every admitted request reaches the store.
        if self.services is not None:
            self.services.stop_admitting()
        # Health says so while the calls in flight finish.
        self._health.stop()
        await stop_serving(self._servers, self._tasks)
        if self.services is not None:
            await self.services.close()
        if self.group is not None:
            # Once more after closing: the leases given back are counted by then.
            self.group.write(self.group.snapshot())


async def run(
    settings: Settings, listeners: Listeners | None = None, metrics_dir: Path | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, on the supervisor's listeners or on ports bound here."""
    if listeners is None:
        listeners = bind_listeners(settings)
        announce_ports(settings.ports_file, listeners.ports())
    app = App(settings, listeners, metrics_dir)

    async def stop() -> None:
        await app.stop()
        listeners.close()

    await serve_until_signalled(app.start, stop)
