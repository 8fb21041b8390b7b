"""`build_rls(settings)`: the rate-limit service of `meshtoll ratelimit`, wired from
envoyproxy/ratelimit's environment variables (envoyproxy_ratelimit/environment.py) and
complete: its configuration and store, the RLS servicer, the HTTP `/json`, `/healthcheck`
and debug handlers, health, and the background work each needs. No socket is opened and no
task started; serving them is rls_app.py's job, so this wiring can be exercised in-process.

Health is envoyproxy/ratelimit's: SERVING once Redis answers (and, with
HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED, while the active configuration has a domain, at
start and after each reload), NOT_SERVING from SIGTERM on, so that Kubernetes stops sending
before the pod goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial

from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigHolder, DescriptorConfigs
from meshtoll.envoyproxy_ratelimit.domains import ConfiguredDomains
from meshtoll.envoyproxy_ratelimit.environment import RlsSettings
from meshtoll.envoyproxy_ratelimit.json_endpoint import JsonEndpoint
from meshtoll.envoyproxy_ratelimit.response_extras import HeaderNames
from meshtoll.envoyproxy_ratelimit.stats import DescriptorStats
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter, StrictOptions
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.rls import RateLimitServicer
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.server.grpc_health import NOT_SERVING, SERVING, requested_service
from meshtoll.server.lifecycle import Work
from meshtoll.storage import CounterStore, open_counter_store
from meshtoll.telemetry.metrics import Metrics
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode
from meshtoll.transport.http_server import response

log = logging.getLogger("meshtoll.ratelimit")

# envoyproxy/ratelimit's gRPC health service name; "" (the whole server) answers the same.
HEALTH_SERVICES = ("", "ratelimit", "envoy.service.ratelimit.v3.RateLimitService")
REDIS_PROBE_SECONDS = 1.0
CONFIG_POLL_SECONDS = 1.0
_OK = response(200, "OK", (("content-type", "text/plain"),), b"OK")
_FAILING = response(500, "Internal Server Error", (("content-type", "text/plain"),), b"")
_NOT_FOUND = response(404, "Not Found", (("content-type", "text/plain"),), b"404 page not found\n")


class Health:
    """envoyproxy/ratelimit's HealthChecker: healthy when every component is. Answers
    grpc.health.v1.Health/Check on the gRPC port (Watch is not served: UNIMPLEMENTED)."""

    def __init__(self, components: dict[str, bool]) -> None:
        self.components = components

    @property
    def ok(self) -> bool:
        return all(self.components.values())

    async def set(self, component: str, healthy: bool) -> None:
        self.components[component] = healthy

    def check(self, request: bytes, context: CallContext) -> bytes:
        """Health/Check on the request's bytes: SERVING or NOT_SERVING for the services in
        HEALTH_SERVICES, NOT_FOUND for any other (as grpcio's health servicer answers)."""
        service = requested_service(request)
        if service not in HEALTH_SERVICES:
            raise CallAborted(StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return SERVING if self.ok else NOT_SERVING

    async def config_loaded(self, configs: DescriptorConfigs) -> None:
        """As envoyproxy/ratelimit's SetConfig: a configuration without any domain fails
        health (a rejected reload never gets here, and changes nothing)."""
        await self.set("config", bool(configs.domains))

    async def follow_redis(self, store: CounterStore) -> None:
        """Health follows Redis: envoyproxy/ratelimit marks itself unhealthy when its Redis
        connection fails."""
        while True:
            await asyncio.sleep(REDIS_PROBE_SECONDS)
            reachable = await store.ping()
            if reachable != self.components["redis"]:
                log.warning("Redis %s", "reachable again" if reachable else "unreachable: health NOT_SERVING")
                await self.set("redis", reachable)


@dataclass(frozen=True, slots=True)
class RlsServices:
    configs: DescriptorConfigHolder
    store: CounterStore
    ratelimit: RateLimitServicer
    json: JsonEndpoint
    stats: DescriptorStats
    metrics: Metrics  # the debug port's /metrics: the per-limit statistics
    health: Health  # Redis starts unhealthy: serving asks it once before announcing itself
    background: dict[str, Work]  # by name: what runs beside the servers, restarted if it fails
    restarts: Counter[str]  # background work started again, by name

    def http(
        self, method: str, target: str, headers: dict[str, str], peer: str, body: bytes
    ) -> bytes | Awaitable[bytes]:
        """The HTTP port: `/json` (any method, as envoyproxy/ratelimit's router takes any)
        and `/healthcheck`."""
        path = target.partition("?")[0]
        if path == "/json":
            return self.json.answer(body)
        return self._healthcheck(path)

    def debug(self, method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
        """The debug port: `/rlconfig` (the active domains), `/metrics` (the per-limit
        statistics) and `/healthcheck`."""
        path = target.partition("?")[0]
        if path == "/rlconfig":
            body = "\n".join(sorted(self.configs.current.domains)).encode() + b"\n"
            return response(200, "OK", (("content-type", "text/plain"),), body)
        if path == "/metrics":
            body, content_type = self.metrics.exposition(headers.get("accept", ""))
            return response(200, "OK", (("content-type", content_type),), body)
        return self._healthcheck(path)

    def _healthcheck(self, path: str) -> bytes:
        if path == "/healthcheck":
            return _OK if self.health.ok else _FAILING
        return _NOT_FOUND

    async def close(self) -> None:
        await self.store.close()


async def build_rls(settings: RlsSettings) -> RlsServices:
    """Raises PolicyError (file, line, field path) for an invalid initial configuration,
    loaded in a thread."""
    configs = await asyncio.to_thread(
        partial(
            DescriptorConfigHolder,
            settings.config_directory,
            merge_domains=settings.merge_domain_config,
            ignore_dot_files=settings.ignore_dot_files,
        )
    )
    store = open_counter_store(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
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
    stats = DescriptorStats(settings.near_limit_ratio)
    metrics = Metrics()
    stats.export(metrics)
    strict = StrictLimiter(limiter, options, stats=stats)
    service = RateLimitService(None, limiter, ConfiguredDomains(lambda: configs.current, strict))
    components = {"redis": False, "sigterm": True}
    if settings.healthy_with_at_least_one_config_loaded:
        components["config"] = bool(configs.current.domains)
    health_state = Health(components)
    if settings.healthy_with_at_least_one_config_loaded:
        configs.on_change(health_state.config_loaded)
    background: dict[str, Work] = {
        "rate-limit config watcher": lambda: configs.watch(CONFIG_POLL_SECONDS),
        "Redis probe": lambda: health_state.follow_redis(store),
    }
    return RlsServices(
        configs=configs,
        store=store,
        ratelimit=RateLimitServicer(service),
        json=JsonEndpoint(service),
        stats=stats,
        metrics=metrics,
        health=health_state,
        background=background,
        restarts=Counter(),
    )
