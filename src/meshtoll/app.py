"""The composition root: builds the policy, services and servers of `meshtoll serve` from
Settings, and runs them until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from functools import partial

import grpc
import redis.asyncio
import redis.exceptions
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshtoll.admin import AdminHandler
from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import AuthorizationServicer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.httpserver import reuse_port_socket, serve_http
from meshtoll.policy.reload import PolicyHolder, watch_policy
from meshtoll.settings import Settings
from meshtoll.telemetry.metrics import DecisionCounts

log = logging.getLogger("meshtoll")

GRPC_STOP_GRACE_SECONDS = 5.0
REDIS_PROBE_SECONDS = 2.0


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.decisions = DecisionCounts()
        self.admin = AdminHandler(self.decisions)
        self._servers: list[asyncio.Server] = []
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        # Admin first, so that probes get a clean 503 while a large policy compiles.
        self._servers.append(
            await serve_http(self.admin, reuse_port_socket(settings.host, settings.admin_port))
        )
        holder = await asyncio.to_thread(PolicyHolder.from_file, settings.policy)
        policy = holder.current
        jwks = JwksCache()
        holder.on_change(jwks.policy_changed)
        authorizer_for = partial(Authorizer, holder, jwks, counts=self.decisions)
        self._tasks += [
            asyncio.create_task(watch_policy(holder, settings.policy_poll_seconds)),
            asyncio.create_task(jwks.refresh_forever(lambda: holder.current)),
        ]
        self._servers.append(
            await serve_http(
                HttpAuthzHandler(authorizer_for(transport="http")),
                reuse_port_socket(settings.host, settings.http_authz_port),
            )
        )
        self._grpc = await self._start_grpc(authorizer_for(transport="grpc"))
        if settings.redis_url is not None:
            self._tasks.append(asyncio.create_task(self._probe_redis(settings.redis_url)))
        self.admin.policy = holder
        log.info(
            "meshtoll serving: gRPC %s:%d, HTTP authz %s:%d, admin %s:%d; policy %s (%d tenants)",
            settings.host,
            settings.grpc_port,
            settings.host,
            settings.http_authz_port,
            settings.host,
            settings.admin_port,
            settings.policy,
            len(policy.tenants),
        )

    async def _start_grpc(self, authorizer: Authorizer) -> grpc.aio.Server:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(authorizer), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        if server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(
            "envoy.service.auth.v3.Authorization", health_pb2.HealthCheckResponse.SERVING
        )
        return server

    async def _probe_redis(self, url: str) -> None:
        """Keep the admin port's view of Redis current; readiness does not depend on it,
        since what a dead Redis means is each service's configured failure policy."""
        client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    self.admin.redis_reachable = bool(await client.ping())
                except (redis.exceptions.RedisError, OSError):
                    self.admin.redis_reachable = False
                await asyncio.sleep(REDIS_PROBE_SECONDS)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._grpc is not None:
            await self._grpc.stop(GRPC_STOP_GRACE_SECONDS)
        for server in self._servers:
            server.close()
            await server.wait_closed()


async def run(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await app.start()
        await stop.wait()
    finally:
        await app.stop()
