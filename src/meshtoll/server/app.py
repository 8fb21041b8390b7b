"""The composition root: builds the policy, stores, services and servers of `meshtoll serve`
from Settings, and runs them until told to stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import AuthorizationServicer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.extproc.service import ExternalProcessorServicer
from meshtoll.meter.als import AccessLogServicer
from meshtoll.meter.reconcile import Reconciler
from meshtoll.meter.settle import Settlement
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.descriptor_config import DescriptorConfigHolder
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.peer_stats import DescriptorStats
from meshtoll.ratelimit.rls import RateLimitServicer
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.ratelimit.strict import StrictLimiter
from meshtoll.server.admin import AdminHandler
from meshtoll.server.admin_access import is_loopback
from meshtoll.server.lifecycle import keep_running, serve_until_signalled, stop_serving
from meshtoll.server.listeners import UDS_GRPC, Listeners, bind_listeners, port_limits
from meshtoll.server.tls import ServiceTls, load_service_tls
from meshtoll.settings import Settings
from meshtoll.storage import CounterStore, open_counter_store, open_usage_store
from meshtoll.telemetry.metrics import DecisionCounts
from meshtoll.transport.http_listener import HttpListener
from meshtoll.transport.http_server import StartingHandler, serve_http
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll")

REDIS_PROBE_SECONDS = 2.0
SERVICES = (
    "envoy.service.auth.v3.Authorization",
    "envoy.service.ratelimit.v3.RateLimitService",
    "ratelimit",  # the name envoyproxy/ratelimit's health service answers to
    "envoy.service.accesslog.v3.AccessLogService",
    "envoy.service.ext_proc.v3.ExternalProcessor",
)


class App:
    def __init__(self, settings: Settings, listeners: Listeners) -> None:
        self.settings = settings
        self.listeners = listeners
        self.decisions = DecisionCounts()
        self.admin = AdminHandler(self.decisions, settings.admin_token)
        self._servers: list[HttpListener] = []
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._store: CounterStore | None = None
        self._usage: UsageStore | None = None
        self._authorizers: list[Authorizer] = []
        self.restarts: Counter[str] = Counter()  # background work started again, by name

    async def start(self) -> None:
        settings = self.settings
        tls = load_service_tls(settings)
        authz_limits, admin_limits = port_limits(settings)
        # Every HTTP port answers from the start, so that probes and Envoy get a clean 503
        # while a large policy compiles rather than a connection left in the queue.
        self._servers.append(await serve_http(self.admin, self.listeners.admin, limits=admin_limits))
        http_authz_port = StartingHandler()
        self._servers.append(
            await serve_http(
                http_authz_port,
                self.listeners.http_authz,
                None if tls is None else tls.context,
                limits=authz_limits,
            )
        )
        if self.listeners.http_authz_unix is not None:
            self._servers.append(
                await serve_http(http_authz_port, self.listeners.http_authz_unix, limits=authz_limits)
            )
        holder = await asyncio.to_thread(PolicyHolder.from_file, settings.policy)
        configs = None
        if settings.ratelimit_config is not None:
            configs = await asyncio.to_thread(DescriptorConfigHolder, settings.ratelimit_config)
            self._background(
                "rate-limit config watcher",
                lambda: configs.watch(settings.policy_poll_seconds),
            )
            self.admin.metrics.count_rejected_ratelimit_configs(configs)
        self._store = store = open_counter_store(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
        limiter = Limiter(
            store,
            failure_mode=settings.ratelimit_failure_mode,  # type: ignore[arg-type]
            shadow=settings.ratelimit_shadow_mode,
        )
        jwks = JwksCache()
        holder.on_change(jwks.policy_changed)
        self._background("policy watcher", lambda: holder.watch(settings.policy_poll_seconds))
        self._background("JWKS refresher", lambda: jwks.refresh_forever(lambda: holder.current))
        self._usage = usage = open_usage_store(
            settings.redis_url, ledger_retention_seconds=settings.ledger_retention_days * 86400
        )
        recorder = AdmissionRecorder(usage)
        self._background("admission recorder", recorder.flush_forever)
        reconciler = Reconciler(usage, settings.reconcile_grace_seconds, time.time)
        self._background("reconciler", reconciler.run_forever)
        settlement = Settlement(usage, clock=time.time)
        self._background("meter settlement", settlement.retry_forever)
        self._count_metering(reconciler, settlement, recorder)
        authorizer_for = partial(
            Authorizer, holder, jwks, counts=self.decisions, limiter=limiter, recorder=recorder
        )
        self._authorizers = [authorizer_for(transport="http"), authorizer_for(transport="grpc")]
        http_authz = HttpAuthzHandler(self._authorizers[0])
        http_authz_port.ready(http_authz)
        stats = DescriptorStats()
        ratelimit = RateLimitService(
            holder,
            limiter,
            lambda: None if configs is None else configs.current,
            compat=settings.ratelimit_compat,  # type: ignore[arg-type]
            strict=StrictLimiter(limiter, stats=stats),
            compat_domains=dict(settings.ratelimit_compat_domains),  # type: ignore[arg-type]
        )
        if configs is not None:
            self.admin.descriptor_stats = stats
        meter = AccessLogServicer(settlement)
        authz = AuthorizationServicer(self._authorizers[1])
        hooks = ExternalProcessorServicer(lambda: holder.current, limiter, recorder)
        self.admin.metrics.count_outcomes(
            "meshtoll_extproc_outcomes",
            "ext_proc hook streams and how their units were found",
            hooks.outcomes,
        )
        self._grpc = await self._start_grpc(authz, ratelimit, meter, hooks, tls)
        if settings.redis_url is not None:
            self._background("Redis probe", lambda: self._probe_redis(store))
        self.admin.store = store
        self.admin.usage = self._usage
        self.admin.policy = holder
        log.info(
            "meshtoll serving: gRPC %s:%d, HTTP authz %s:%d, admin %s:%d; policy %s (%d tenants); %s",
            settings.host,
            settings.grpc_port,
            settings.host,
            settings.http_authz_port,
            settings.host,
            settings.admin_port,
            settings.policy,
            len(holder.current.tenants),
            "counters in Redis" if settings.redis_url else "counters in memory (no --redis-url)",
        )
        log.info(
            "authz ports: %s; admin /api/*: %s (probes and /metrics open)",
            "plain text" if tls is None else "mutual TLS" if tls.mutual else "TLS",
            "bearer token" if self.admin.access.needs_token else "loopback clients only",
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

    def _count_metering(
        self, reconciler: Reconciler, settlement: Settlement, recorder: AdmissionRecorder
    ) -> None:
        metrics = self.admin.metrics
        metrics.count_outcomes(
            "meshtoll_background_restarts",
            "background work (watchers, the meter's flushes, reconciliation) started again after a failure",
            self.restarts,
        )
        metrics.gauge(
            "meshtoll_admissions_dropped",
            "admissions and unit reports lost because a million were already waiting for the store",
            lambda: recorder.dropped,
        )
        metrics.count_outcomes(
            "meshtoll_meter_records",
            "access-log entries by outcome: billed, unmatched (no admission: never billed), "
            "anonymous (no tenant), replayed, waited, overflow, unavailable",
            settlement.outcomes,
        )
        metrics.gauge(
            "meshtoll_meter_waiting_records",
            "access-log entries waiting for their admission or units",
            lambda: settlement.waiting,
        )
        metrics.gauge(
            "meshtoll_reconcile_backlog",
            "admissions awaiting their access-log record (all tenants, as last counted)",
            lambda: reconciler.backlog,
        )

    def _background(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append(asyncio.create_task(keep_running(name, work, self.restarts)))

    async def _start_grpc(
        self,
        authz: AuthorizationServicer,
        ratelimit: RateLimitService,
        meter: AccessLogServicer,
        hooks: ExternalProcessorServicer,
        tls: ServiceTls | None,
    ) -> grpc.aio.Server:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authz, server)
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(ratelimit), server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(meter, server)
        ext_proc_pb2_grpc.add_ExternalProcessorServicer_to_server(hooks, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # SO_REUSEPORT joins the port the owner holds (see server/listeners.py), and nobody else's.
        address = f"{self.settings.host}:{self.listeners.grpc_port}"
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.grpc_credentials())
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        if self.settings.uds_dir is not None:
            # Plain: the socket file's permissions, not TLS, keep others out of a pod.
            unix = f"unix:{self.settings.uds_dir / UDS_GRPC}"
            if server.add_insecure_port(unix) == 0:
                raise OSError(f"cannot listen for gRPC on {unix}")
        await server.start()
        for service in ("", *SERVICES):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        return server

    async def _probe_redis(self, store: CounterStore) -> None:
        """Keep the admin port's view of Redis current; readiness does not depend on it,
        since what a dead Redis means is the configured failure policy."""
        while True:
            self.admin.redis_reachable = await store.ping()
            await asyncio.sleep(REDIS_PROBE_SECONDS)

    async def stop(self) -> None:
        # Refuse first, then stop serving, then let the background work (the last flush of
        # admissions among it) finish: every admitted request reaches the store.
        for authorizer in self._authorizers:
            authorizer.stop_admitting()
        await stop_serving(self._grpc, self._servers, self._tasks)
        if self._store is not None:
            await self._store.close()
        if self._usage is not None:
            await self._usage.close()


async def run(settings: Settings, listeners: Listeners | None = None) -> None:
    """Serve until SIGINT or SIGTERM, on the supervisor's listeners or on ports bound here."""
    if listeners is None:
        listeners = bind_listeners(settings)
    app = App(settings, listeners)

    async def stop() -> None:
        await app.stop()
        listeners.close()

    await serve_until_signalled(app.start, stop)
