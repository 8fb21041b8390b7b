"""`build(settings)`: the policy, stores and services of `meshtoll serve`, wired together and
complete, with the background work each needs; no socket is opened and no task started.
Serving them is server/app.py's job, so this wiring can be built and exercised in-process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
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
from meshtoll.server.admin import AdminHandler, StoreProbe
from meshtoll.server.admin_access import AdminAccess
from meshtoll.server.lifecycle import Work
from meshtoll.server.usage_sinks import UsageSinks, build_usage_sinks
from meshtoll.settings import Settings
from meshtoll.storage import open_counter_store, open_usage_store
from meshtoll.telemetry.metrics import DecisionCounts, Metrics
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


async def build(settings: Settings) -> Services:
    """Raises PolicyError (every problem located) for an invalid policy or rate-limit
    directory. Both are loaded in a thread: a large policy takes seconds to compile."""
    holder = await asyncio.to_thread(PolicyHolder.from_file, settings.policy)
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
    jwks = JwksCache()
    holder.on_change(jwks.policy_changed)
    recorder = AdmissionRecorder(usage)
    reconciler = Reconciler(usage, settings.reconcile_grace_seconds, time.time)
    settlement = Settlement(usage, clock=time.time)
    decisions = DecisionCounts()
    authorizer_for = partial(Authorizer, holder, jwks, counts=decisions, limiter=limiter, recorder=recorder)
    http_authorizer, grpc_authorizer = authorizer_for(transport="http"), authorizer_for(transport="grpc")
    stats = DescriptorStats()
    configured_domains = ConfiguredDomains(
        lambda: None if configs is None else configs.current,
        StrictLimiter(limiter, stats=stats),
        compat=settings.ratelimit_compat,
        compat_domains=dict(settings.ratelimit_compat_domains),
    )
    ratelimit = RateLimitService(holder, limiter, configured_domains)
    hooks = ExternalProcessorServicer(lambda: holder.current, limiter, recorder)
    probe = StoreProbe(store if settings.redis_url is not None else None)
    restarts: Counter[str] = Counter()
    metrics = Metrics(decisions, lambda: holder)
    _count(metrics, reconciler, settlement, recorder, hooks, restarts)
    metrics.count_outcomes(
        "meshtoll_limit_decisions",
        "limit decisions (fused authz, RLS) by outcome: admitted, rate_limited, quota_exceeded, "
        "refused_from_cache, store_unavailable_open|closed; admitted_from_lease is the part of "
        "admitted this process's token leases served without a Redis round trip",
        limiter.outcomes,
    )
    background: dict[str, Work] = {
        "policy watcher": lambda: holder.watch(settings.policy_poll_seconds),
        "JWKS refresher": lambda: jwks.refresh_forever(lambda: holder.current),
        "admission recorder": recorder.flush_forever,
        "reconciler": reconciler.run_forever,
        "meter settlement": settlement.retry_forever,
    }
    if configs is not None:
        background["rate-limit config watcher"] = lambda: configs.watch(settings.policy_poll_seconds)
        metrics.count_rejected_ratelimit_configs(configs)
    if settings.redis_url is not None:
        background["Redis probe"] = probe.run_forever
    usage_sinks = build_usage_sinks(settings, holder, usage, metrics)
    for follower in usage_sinks.followers:
        background[f"{follower.name} usage sink"] = follower.run_forever
    admin = AdminHandler(
        AdminAccess(settings.admin_token),
        metrics,
        holder,
        store,
        usage,
        probe,
        descriptor_stats=None if configs is None else stats,
        sink_state=usage_sinks.state,
    )
    return Services(
        policy=holder,
        configs=configs,
        store=store,
        usage=usage,
        limiter=limiter,
        http_authorizer=http_authorizer,
        grpc_authorizer=grpc_authorizer,
        http_authz=HttpAuthzHandler(http_authorizer),
        grpc_authz=AuthorizationServicer(grpc_authorizer),
        ratelimit=RateLimitServicer(ratelimit),
        meter=AccessLogServicer(settlement),
        otlp_meter=OtlpLogsReceiver(settlement),
        hooks=hooks,
        admin=admin,
        background=background,
        restarts=restarts,
        usage_sinks=usage_sinks,
    )


def _count(
    metrics: Metrics,
    reconciler: Reconciler,
    settlement: Settlement,
    recorder: AdmissionRecorder,
    hooks: ExternalProcessorServicer,
    restarts: Counter[str],
) -> None:
    metrics.count_outcomes(
        "meshtoll_extproc_outcomes", "ext_proc hook streams and how their units were found", hooks.outcomes
    )
    metrics.count_outcomes(
        "meshtoll_background_restarts",
        "background work (watchers, the meter's flushes, reconciliation) started again after a failure",
        restarts,
    )
    metrics.gauge(
        "meshtoll_admissions_dropped",
        "admissions and unit reports lost because a million were already waiting for the store",
        lambda: recorder.dropped,
    )
    metrics.count_outcomes(
        "meshtoll_meter_records",
        "access-log entries by outcome: billed, unmatched (no admission: never billed), "
        "anonymous (no tenant, and no admission of its request id), resolved (no tenant, its "
        "admission found by request id), malformed (not a meter line), replayed, waited, overflow, "
        "unavailable",
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
