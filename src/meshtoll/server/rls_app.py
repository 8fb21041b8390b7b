"""The composition root of `meshtoll ratelimit`: the rate-limit service alone, as
envoyproxy/ratelimit runs, from its environment variables (envoyproxy_ratelimit/environment.py).

Ports as envoyproxy/ratelimit's: gRPC (RLS and health), HTTP `/healthcheck` and `/json`, and a debug port with
`/rlconfig` and `/metrics` (the per-limit statistics under the names envoyproxy/ratelimit's
Prometheus mapping gives them). Health is envoyproxy/ratelimit's: SERVING once Redis answers (and, with
HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED, while the active configuration has a domain, at
start and after each reload),
NOT_SERVING from SIGTERM on, so that Kubernetes stops sending before the pod goes.
An invalid initial configuration refuses to start (envoyproxy/ratelimit starts and fails every call):
a pod that cannot answer correctly should not pass its readiness probe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshtoll.envoyproxy_ratelimit.config_files import (
    DescriptorConfigHolder,
    DescriptorConfigs,
)
from meshtoll.envoyproxy_ratelimit.domains import ConfiguredDomains
from meshtoll.envoyproxy_ratelimit.environment import RlsSettings
from meshtoll.envoyproxy_ratelimit.json_endpoint import JsonEndpoint
from meshtoll.envoyproxy_ratelimit.response_extras import HeaderNames
from meshtoll.envoyproxy_ratelimit.stats import DescriptorStats
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter, StrictOptions
from meshtoll.errors import ConfigError
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.rls import RateLimitServicer
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.server.event_loop import running_loop_name
from meshtoll.server.lifecycle import Listener, keep_running, serve_until_signalled, stop_serving
from meshtoll.storage import CounterStore, open_counter_store
from meshtoll.transport.http_server import response, serve_http, serve_http_reading_bodies

log = logging.getLogger("meshtoll.ratelimit")

# envoyproxy/ratelimit's gRPC health service name; "" (the whole server) answers the same.
HEALTH_SERVICES = ("", "ratelimit", "envoy.service.ratelimit.v3.RateLimitService")
REDIS_PROBE_SECONDS = 1.0
CONFIG_POLL_SECONDS = 1.0
_OK = response(200, "OK", (("content-type", "text/plain"),), b"OK")
_FAILING = response(500, "Internal Server Error", (("content-type", "text/plain"),), b"")
_NOT_FOUND = response(404, "Not Found", (("content-type", "text/plain"),), b"404 page not found\n")


class Health:
    """envoyproxy/ratelimit's HealthChecker: healthy when every component is."""

    def __init__(self, servicer: health.aio.HealthServicer, components: dict[str, bool]) -> None:
        self._servicer = servicer
        self.components = components

    @property
    def ok(self) -> bool:
        return all(self.components.values())

    async def set(self, component: str, healthy: bool) -> None:
        self.components[component] = healthy
        status = (
            health_pb2.HealthCheckResponse.SERVING if self.ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            await self._servicer.set(service, status)


class RlsApp:
    def __init__(self, settings: RlsSettings) -> None:
        self.settings = settings
        self._grpc: grpc.aio.Server | None = None
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.restarts: Counter[str] = Counter()  # background work started again, by name
        self._store: CounterStore | None = None
        self.health: Health | None = None
        self.configs: DescriptorConfigHolder | None = None
        self.stats = DescriptorStats()
        self._json: JsonEndpoint | None = None

    async def start(self) -> None:
        settings = self.settings
        # Raises PolicyError (file, line, field path) for an invalid initial configuration.
        self.configs = configs = await asyncio.to_thread(
            partial(
                DescriptorConfigHolder,
                settings.config_directory,
                merge_domains=settings.merge_domain_config,
                ignore_dot_files=settings.ignore_dot_files,
            )
        )
        self._background("rate-limit config watcher", lambda: configs.watch(CONFIG_POLL_SECONDS))
        self._store = store = open_counter_store(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
        # "closed": a store that cannot answer is a gRPC error, as envoyproxy/ratelimit's Redis errors are.
        limiter = Limiter(store, failure_mode="closed", shadow=settings.shadow_mode)
        options = StrictOptions(
            key_prefix=settings.cache_key_prefix,
            stop_when_over=settings.stop_cache_key_increment_when_overlimit,
            local_cache=settings.local_cache,
            expiration_jitter_seconds=settings.expiration_jitter_seconds,
            quota_mode=settings.quota_mode,
            headers=None if settings.response_headers is None else HeaderNames(*settings.response_headers),
            dynamic_metadata=settings.response_dynamic_metadata,
        )
        self.stats = DescriptorStats(settings.near_limit_ratio)
        strict = StrictLimiter(limiter, options, stats=self.stats)
        service = RateLimitService(None, limiter, ConfiguredDomains(lambda: configs.current, strict))
        self._json = JsonEndpoint(service)
        servicer = health.aio.HealthServicer()
        components = {"redis": False, "sigterm": True}
        if settings.healthy_with_at_least_one_config_loaded:
            components["config"] = bool(configs.current.domains)
            configs.on_change(self._config_loaded)
        self.health = Health(servicer, components)
        self._grpc = await self._start_grpc(service, servicer)
        await self.health.set("redis", await store.ping())
        self._background("Redis probe", lambda: self._probe_redis(store))
        self._listeners.append(
            await serve_http_reading_bodies(self._http, _listening(settings.host, settings.port))
        )
        self._listeners.append(
            await serve_http(self._debug, _listening(settings.debug_host, settings.debug_port))
        )
        log.warning(
            "meshtoll ratelimit serving on %s: gRPC %s:%d, HTTP %s:%d, debug %s:%d; "
            "configuration %s (%d domains)",
            running_loop_name(),
            settings.grpc_host,
            settings.grpc_port,
            settings.host,
            settings.port,
            settings.debug_host,
            settings.debug_port,
            settings.config_directory,
            len(configs.current.domains),
        )

    def _http(
        self, method: str, target: str, headers: dict[str, str], peer: str, body: bytes
    ) -> bytes | Awaitable[bytes]:
        path = target.partition("?")[0]
        if path == "/json" and self._json is not None:
            return self._json.answer(body)  # any method, as envoyproxy/ratelimit's router takes any
        return self._healthcheck(path)

    def _healthcheck(self, path: str) -> bytes:
        if path == "/healthcheck":
            return _OK if self.health is not None and self.health.ok else _FAILING
        return _NOT_FOUND

    def _debug(self, method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
        path = target.partition("?")[0]
        if path == "/rlconfig" and self.configs is not None:
            body = "\n".join(sorted(self.configs.current.domains)).encode() + b"\n"
            return response(200, "OK", (("content-type", "text/plain"),), body)
        if path == "/metrics":
            body = self.stats.prometheus_text().encode()
            return response(200, "OK", (("content-type", "text/plain; version=0.0.4"),), body)
        return self._healthcheck(path)

    async def _start_grpc(
        self, service: RateLimitService, servicer: health.aio.HealthServicer
    ) -> grpc.aio.Server:
        # grpcio sets SO_REUSEPORT by default, which would let this server join a port that
        # another process (a `meshtoll serve`) holds and take part of its calls: this one
        # owns its port alone, or fails to start.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(service), server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises where older ones return 0
            bound = 0
        if bound == 0:
            raise ConfigError(f"GRPC_PORT: cannot listen on {address} (in use, or not an address here)")
        await server.start()
        return server

    async def _config_loaded(self, configs: DescriptorConfigs) -> None:
        """As envoyproxy/ratelimit's SetConfig: a configuration without any domain fails health (a
        rejected reload never gets here, and changes nothing)."""
        if self.health is not None:
            await self.health.set("config", bool(configs.domains))

    async def _probe_redis(self, store: CounterStore) -> None:
        """Health follows Redis: envoyproxy/ratelimit marks itself unhealthy when its Redis
        connection fails."""
        assert self.health is not None
        while True:
            await asyncio.sleep(REDIS_PROBE_SECONDS)
            reachable = await store.ping()
            if reachable != self.health.components["redis"]:
                log.warning("Redis %s", "reachable again" if reachable else "unreachable: health NOT_SERVING")
                await self.health.set("redis", reachable)

    def _background(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append(asyncio.create_task(keep_running(name, work, self.restarts)))

    async def draining(self) -> None:
        """SIGTERM: fail health first, so that load balancers stop sending."""
        if self.health is not None:
            await self.health.set("sigterm", False)

    async def stop(self) -> None:
        await stop_serving(self._grpc, self._listeners, self._tasks)
        if self._store is not None:
            await self._store.close()


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
