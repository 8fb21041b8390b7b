"""`build(settings)`: the policy, stores and services of `meshtoll serve`, wired together and
complete, with the background work each needs; no socket is opened and no task started.
Serving them is server/app.py's job, so this wiring can be built and exercised in-process."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import AuthorizationServicer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.counting.store import CounterStore
from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigHolder
from meshtoll.envoyproxy_ratelimit.domains import ConfiguredDomains
from meshtoll.envoyproxy_ratelimit.stats import DescriptorStats
from meshtoll.envoyproxy_ratelimit.strict import StrictLimiter
from meshtoll.extproc.service import ExternalProcessorServicer
from meshtoll.meter.als import AccessLogServicer
from meshtoll.meter.otlp import OtlpLogsReceiver
from meshtoll.meter.reconcile import Reconciler
from meshtoll.meter.settle import Settlement
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.rls import RateLimitServicer
from meshtoll.ratelimit.service import RateLimitService
from meshtoll.registry.store import TenantRegistry
from meshtoll.server.admin import AdminHandler, StoreProbe
from meshtoll.server.admin_access import AdminAccess
from meshtoll.server.admin_tokens import AdminTokensHolder
from meshtoll.server.dashboard import Dashboard
from meshtoll.server.dashboard_data import DashboardData
from meshtoll.server.dashboard_session import Sessions
from meshtoll.server.exported import (
    DECISION_SECONDS,
    Latencies,
    export_extproc,
    export_limits,
    export_meter,
    export_policy,
    export_process,
    export_ratelimit_config,
    export_redis,
    export_tenant_api,
    export_tenants,
)
from meshtoll.server.lifecycle import Work
from meshtoll.server.long_lived import building, keep_built
from meshtoll.server.tenant_api import TenantApi
from meshtoll.server.traffic import Traffic, metrics_reading
from meshtoll.server.usage_sinks import UsageSinks, build_usage_sinks
from meshtoll.settings import Settings
from meshtoll.storage import open_counter_store, open_tenant_registry, open_usage_store
from meshtoll.storage.redis import RedisCounterStore
from meshtoll.telemetry.metrics import DecisionCounts, Metrics
from meshtoll.telemetry.recent_denials import RecentDenials
from meshtoll.telemetry.tenant_labels import parse_tenant_labels
from meshtoll.telemetry.tracing import Tracing, tracing_from_environment
from meshtoll.tenants.follower import RegistryFollower
from meshtoll.tenants.installed import InstalledTenants
from meshtoll.tenants.instances import InstanceReporter
from meshtoll.tenants.key_use import KeyUse
from meshtoll.tenants.service import TenantService
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.store import UsageStore


@dataclass(frozen=True, slots=True)
class Services:
    policy: PolicyHolder
    configs: DescriptorConfigHolder | None  # envoyproxy/ratelimit's directory, if given
    store: CounterStore
    usage: UsageStore
    limiter: Limiter
    http_authorizer: Authorizer
    grpc_authorizer: Authorizer
    http_authz: HttpAuthzHandler
    grpc_authz: AuthorizationServicer
    ratelimit: RateLimitServicer
    meter: AccessLogServicer  # Envoy's gRPC access log
    otlp_meter: OtlpLogsReceiver  # Envoy's OpenTelemetry access logger (the default)
    hooks: ExternalProcessorServicer
    admin: AdminHandler
    background: dict[str, Work]  # by name: what runs beside the servers, restarted if it fails
    restarts: Counter[str]  # background work started again, by name
    usage_sinks: UsageSinks  # the billing sinks (--usage-sink) and their state store
    tenants: RuntimeTenants | None  # the tenant registry and this instance's view of it
    metrics: Metrics
    tracing: Tracing | None  # None: off (no OTLP endpoint in the environment)

    def stop_admitting(self) -> None:
        for authorizer in (self.http_authorizer, self.grpc_authorizer):
            authorizer.stop_admitting()

    async def close(self) -> None:
        """After the servers stopped: no decision runs any more, so what the token leases
        did not spend goes back to Redis before the store closes."""
        await self.limiter.release_leases()
        await self.usage_sinks.close()
        await self.store.close()
        await self.usage.close()
        if self.tenants is not None:
            await self.tenants.registry.close()
        if self.tracing is not None:
            self.tracing.shutdown()


@dataclass(frozen=True, slots=True)
class RuntimeTenants:
    registry: TenantRegistry
    installed: InstalledTenants
    follower: RegistryFollower
    reporter: InstanceReporter
    service: TenantService


async def runtime_tenants(settings: Settings, holder: PolicyHolder) -> RuntimeTenants | None:
    """The tenant registry (Redis; in memory for one process without it) and this instance's
    view of it, its first snapshot loaded. None for several workers without Redis: each
    would keep a registry of its own."""
    if settings.redis_url is None and settings.workers > 1:
        return None
    registry = open_tenant_registry(settings.redis_url)
    installed = InstalledTenants(holder)
    # A snapshot loaded later (a reload, or the first one when Redis was not reachable at
    # start) is frozen like the start's.
    follower = RegistryFollower(registry, installed, loaded_all=keep_built, building=building)
    await follower.load_first()
    reporter = InstanceReporter(registry, installed)
    service = TenantService(registry, lambda: holder.current, committed=installed.apply_own)
    return RuntimeTenants(registry, installed, follower, reporter, service)


async def build(settings: Settings) -> Services:
    """Raises PolicyError (every problem located) for an invalid policy or rate-limit
    directory. Both are loaded in a thread: a large policy takes seconds to compile."""
    holder = await asyncio.to_thread(PolicyHolder.from_file, settings.policy)
    holder.on_change(lambda _: keep_built())  # a new version of the file, run-time tenants installed
    holder.while_building(building)
    configs = None
    if settings.ratelimit_config is not None:
        configs = await asyncio.to_thread(DescriptorConfigHolder, settings.ratelimit_config)
    store = open_counter_store(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
    retention = settings.ledger_retention_days * 86400
    usage = open_usage_store(settings.redis_url, ledger_retention_seconds=retention)
    limiter = Limiter(
        store,
        failure_mode=settings.ratelimit_failure_mode,
        shadow=settings.ratelimit_shadow_mode,
        # Leases save Redis round trips; one process with its counters in memory has none.
        lease_max=settings.lease_max if settings.redis_url else 1,
    )
    tracing = tracing_from_environment()
    metrics = Metrics(tenant_labels=parse_tenant_labels(settings.metrics_tenant_labels))
    latencies = Latencies.on(metrics)
    jwks = JwksCache()
    holder.on_change(jwks.policy_changed)
    tenants = await runtime_tenants(settings, holder)
    recorder = AdmissionRecorder(usage)
    if tenants is not None:
        tenants.installed.on_change(jwks.policy_changed)
        recorder.on_stored(KeyUse(tenants.registry, tenants.installed).admitted)
    reconciler = Reconciler(usage, settings.reconcile_grace_seconds, time.time)
    settlement = Settlement(
        usage,
        clock=time.time,
        latency=latencies.meter,
        ledger_writes=latencies.ledger_writes,
        tracing=tracing,
        recorder=recorder,
    )
    decisions = DecisionCounts()
    denials = RecentDenials()
    metrics.count_by(
        "meshtoll_authz_decisions",
        "authz decisions by transport and outcome",
        decisions.counts,
        "transport",
        "outcome",
    )
    tenant_counts: defaultdict[tuple[str, str], int] | None = None
    if metrics.tenant_labels.enabled:
        tenant_counts = defaultdict(int)
        metrics.count_by(
            "meshtoll_tenant_decisions",
            "authz decisions by tenant (those --metrics-tenant-labels selects) and outcome: allow, "
            "rate_limited, quota_exceeded",
            tenant_counts,
            "tenant",
            "outcome",
        )
    authorizer_for = partial(
        Authorizer,
        holder,
        jwks,
        counts=decisions,
        tenant_counts=tenant_counts,
        limiter=limiter,
        recorder=recorder,
        denials=denials,
    )
    http_authorizer, grpc_authorizer = authorizer_for(transport="http"), authorizer_for(transport="grpc")
    stats = DescriptorStats()
    configured_domains = ConfiguredDomains(
        lambda: None if configs is None else configs.current,
        StrictLimiter(limiter, stats=stats),
        compat=settings.ratelimit_compat,
        compat_domains=dict(settings.ratelimit_compat_domains),
    )
    ratelimit = RateLimitService(holder, limiter, configured_domains)
    rls = RateLimitServicer(ratelimit, latency=latencies.ratelimit, tracing=tracing)
    hooks = ExternalProcessorServicer(
        lambda: holder.current, limiter, recorder, latency=latencies.extproc, tracing=tracing
    )
    probe = StoreProbe(store if settings.redis_url is not None else None)
    restarts: Counter[str] = Counter()
    export_policy(metrics, holder)
    export_limits(metrics, limiter, rls)
    if isinstance(store, RedisCounterStore):
        export_redis(metrics, store, probe)
    export_meter(metrics, settlement, reconciler, recorder)
    export_extproc(metrics, hooks)
    export_process(metrics, restarts)
    background: dict[str, Work] = {
        "policy watcher": lambda: holder.watch(settings.policy_poll_seconds),
        "JWKS refresher": lambda: jwks.refresh_forever(lambda: holder.current),
        "admission recorder": recorder.flush_forever,
        "reconciler": reconciler.run_forever,
        "meter settlement": settlement.retry_forever,
    }
    export_ratelimit_config(metrics, configs)
    if configs is not None:
        background["rate-limit config watcher"] = lambda: configs.watch(settings.policy_poll_seconds)
        stats.export(metrics)
    if settings.redis_url is not None:
        background["Redis probe"] = probe.run_forever
    usage_sinks = build_usage_sinks(settings, holder, usage, metrics)
    for follower in usage_sinks.followers:
        background[f"{follower.name} usage sink"] = follower.run_forever
    tokens = None
    if settings.admin_tokens_file is not None:
        tokens = await asyncio.to_thread(AdminTokensHolder.from_file, settings.admin_tokens_file)
        background["admin tokens watcher"] = lambda: tokens.watch(settings.policy_poll_seconds)
    if tenants is not None:
        background["tenant registry follower"] = tenants.follower.run_forever
        background["instance heartbeat"] = tenants.reporter.run_forever
        export_tenants(metrics, tenants.installed, tenants.follower)
    restarts.update(dict.fromkeys(background, 0))  # every work's series there from the start
    access = AdminAccess(settings.admin_token, None if tokens is None else lambda: tokens.current)
    tenant_api = TenantApi(
        holder,
        None if tenants is None else tenants.installed,
        None if tenants is None else tenants.service,
    )
    export_tenant_api(metrics, tenant_api)
    dashboard_data = DashboardData(
        holder,
        store,
        usage,
        tenant_api,
        denials,
        Traffic(metrics_reading(metrics, DECISION_SECONDS)),
        lambda: probe.reachable,
    )
    secret = (settings.dashboard_secret or secrets.token_hex(32)).encode()
    admin = AdminHandler(
        access,
        metrics,
        holder,
        store,
        usage,
        probe,
        tenants=tenant_api,
        tenants_loaded=(lambda: True) if tenants is None else tenants.follower.loaded.is_set,
        sink_state=usage_sinks.state,
        dashboard=Dashboard(Sessions(access, secret), dashboard_data, tenant_api),
    )
    keep_built(at_start=True)  # the policy and the run-time tenants, before any decision
    return Services(
        policy=holder,
        configs=configs,
        store=store,
        usage=usage,
        limiter=limiter,
        http_authorizer=http_authorizer,
        grpc_authorizer=grpc_authorizer,
        http_authz=HttpAuthzHandler(http_authorizer, latency=latencies.authz_http, tracing=tracing),
        grpc_authz=AuthorizationServicer(grpc_authorizer, latency=latencies.authz_grpc, tracing=tracing),
        ratelimit=rls,
        meter=AccessLogServicer(settlement),
        otlp_meter=OtlpLogsReceiver(settlement),
        hooks=hooks,
        admin=admin,
        background=background,
        restarts=restarts,
        usage_sinks=usage_sinks,
        tenants=tenants,
        metrics=metrics,
        tracing=tracing,
    )
