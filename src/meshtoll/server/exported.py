"""Every family `meshtoll serve` exports on /metrics, registered once in `build`: each read
from where its service keeps it. The names are the ones the Grafana dashboard and the alert
rules query (render/monitoring.py), and the README's "Observe" lists.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshtoll.telemetry.families import Labels
from meshtoll.telemetry.histogram import Histogram
from meshtoll.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigHolder
    from meshtoll.extproc.service import ExternalProcessorServicer
    from meshtoll.meter.reconcile import Reconciler
    from meshtoll.meter.settle import Settlement
    from meshtoll.policy.reload import PolicyHolder
    from meshtoll.ratelimit.limiter import Limiter
    from meshtoll.ratelimit.rls import RateLimitServicer
    from meshtoll.server.admin import StoreProbe
    from meshtoll.server.tenant_api import TenantApi
    from meshtoll.storage.redis import RedisCounterStore
    from meshtoll.tenants.follower import RegistryFollower
    from meshtoll.tenants.installed import InstalledTenants
    from meshtoll.usage.recorder import AdmissionRecorder

DECISION_SECONDS = "meshtoll_decision_duration_seconds"


@dataclass(frozen=True, slots=True)
class Latencies:
    """The decision latency histograms, one per service and transport, handed to each."""

    authz_http: Histogram
    authz_grpc: Histogram
    ratelimit: Histogram
    extproc: Histogram
    meter: Histogram
    ledger_writes: Histogram

    @classmethod
    def on(cls, metrics: Metrics) -> Latencies:
        help = (
            "time from a request to meshtoll's answer, by service (authz, ratelimit, extproc, meter) "
            "and transport"
        )

        def decision(service: str, transport: str) -> Histogram:
            return metrics.histogram(DECISION_SECONDS, help, service=service, transport=transport)

        return cls(
            authz_http=decision("authz", "http"),
            authz_grpc=decision("authz", "grpc"),
            ratelimit=decision("ratelimit", "grpc"),
            extproc=decision("extproc", "grpc"),
            meter=decision("meter", "grpc"),
            ledger_writes=metrics.histogram(
                "meshtoll_meter_ledger_write_seconds",
                "each write of a batch of billed records to the usage store",
            ),
        )


def export_policy(metrics: Metrics, policy: PolicyHolder) -> None:
    # Every worker watches the same files: their versions and rejections agree, never add up.
    metrics.gauge(
        "meshtoll_policy_version",
        "active policy version (1 at start, +1 per reload)",
        lambda: policy.version,
        combine="max",
    )
    metrics.gauge(
        "meshtoll_policy_tenants",
        "tenants the active policy serves: the file's and the run-time tenants installed into it",
        lambda: len(policy.current.tenants),
        combine="max",
    )
    metrics.counter(
        "meshtoll_policy_rejected_reloads",
        "policy file versions rejected since start (each logged with its problems)",
        lambda: {(): policy.rejected_versions},
        combine="max",
    )


def export_ratelimit_config(metrics: Metrics, configs: DescriptorConfigHolder | None) -> None:
    """Served without --ratelimit-config too (version 0), so that queries always find them."""
    metrics.gauge(
        "meshtoll_ratelimit_config_version",
        "active envoyproxy/ratelimit configuration version (1 at start, +1 per reload; 0: none given)",
        lambda: 0 if configs is None else configs.version,
        combine="max",
    )
    metrics.counter(
        "meshtoll_ratelimit_config_rejected_reloads",
        "rate-limit configuration versions rejected since start (each logged)",
        lambda: {(): 0 if configs is None else configs.rejected_versions},
        combine="max",
    )


def export_tenants(metrics: Metrics, installed: InstalledTenants, follower: RegistryFollower) -> None:
    # Every worker follows the same registry: their counts agree, never add up; of their
    # staleness, the most stale worker's is the instance's.
    metrics.gauge(
        "meshtoll_runtime_tenants",
        "run-time tenants in the registry, as applied (meshtoll_policy_tenants counts them too)",
        lambda: len(installed.records),
        combine="max",
    )
    metrics.gauge(
        "meshtoll_runtime_tenants_skipped",
        "run-time tenants this instance does not serve (they conflict with its policy file)",
        lambda: len(installed.skipped),
        combine="max",
    )
    metrics.gauge(
        "meshtoll_runtime_registry_version",
        "the tenant registry version this instance has applied",
        lambda: installed.version,
        combine="max",
    )
    metrics.counter(
        "meshtoll_runtime_registry_changes_applied",
        "run-time tenant changes read from the registry's change log and installed",
        lambda: {(): follower.changes_applied},
        combine="max",
    )
    metrics.counter(
        "meshtoll_runtime_registry_reloads",
        "snapshots of every run-time tenant loaded again after the first (a gap in the change log, "
        "a registry started anew)",
        lambda: {(): follower.reloads},
        combine="max",
    )
    metrics.gauge(
        "meshtoll_runtime_registry_staleness_seconds",
        "seconds since this instance last read the registry's change log up to its end: about 1 "
        "while it follows, growing while the registry cannot be read (its propagation lag's bound)",
        follower.staleness,
        combine="max",
    )


def export_tenant_api(metrics: Metrics, api: TenantApi) -> None:
    metrics.count_by(
        "meshtoll_tenant_api_writes",
        "run-time tenant and key changes asked of this instance's admin API, by outcome: committed, "
        "unavailable (no registry), or the refusal's error code",
        api.writes,
        "outcome",
    )


def export_limits(metrics: Metrics, limiter: Limiter, rls: RateLimitServicer) -> None:
    metrics.count_outcomes(
        "meshtoll_limit_decisions",
        "limit decisions (fused authz, RLS) by outcome: admitted, rate_limited, quota_exceeded, "
        "refused_from_cache, store_unavailable_open|closed; admitted_from_lease is the part of "
        "admitted this process's token leases served without a Redis round trip",
        limiter.outcomes,
    )
    metrics.count_by(
        "meshtoll_lease_hits",
        "hits token leases were granted by Redis, and returned to it by a stopping process",
        limiter.lease_hits,
        "event",
    )
    metrics.count_outcomes(
        "meshtoll_ratelimit_requests",
        "RLS calls (ShouldRateLimit) by outcome: ok, over_limit, unavailable, invalid, failed",
        rls.outcomes,
    )


def export_redis(metrics: Metrics, store: RedisCounterStore, probe: StoreProbe) -> None:
    metrics.histogram_of(
        "meshtoll_redis_round_trip_seconds",
        "each answered call of the counter store to Redis (a decision, a lease grant, a return)",
        store.round_trips,
    )
    metrics.count_by(
        "meshtoll_redis_errors",
        "failed calls of the counter store by kind: timeout, connection, refused, breaker_open, other",
        store.errors,
        "kind",
    )
    metrics.gauge(
        "meshtoll_redis_breaker_open",
        "1 while the circuit breaker stops calls to a failing Redis (every worker's: the most open)",
        lambda: int(store.breaker.is_open),
        combine="max",
    )
    metrics.gauge(
        "meshtoll_redis_up",
        "1 when Redis answered the last probe (every 2 s), 0 when it did not",
        lambda: int(bool(probe.reachable)),
        combine="max",
    )


def export_meter(
    metrics: Metrics, settlement: Settlement, reconciler: Reconciler, recorder: AdmissionRecorder
) -> None:
    metrics.counter(
        "meshtoll_meter_entries_received",
        "access-log entries Envoy sent the meter",
        lambda: {(): settlement.received},
    )
    metrics.count_outcomes(
        "meshtoll_meter_records",
        "access-log entries by outcome: billed, unmatched (no admission: never billed), "
        "anonymous (no tenant, and no admission of its request id), resolved (no tenant, its "
        "admission found by request id), malformed (not a meter line), replayed, waited, overflow, "
        "unavailable, buffered (settled from admissions this instance had not flushed yet: part "
        "of billed and replayed)",
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
        combine="max",
    )
    metrics.counter(
        "meshtoll_reconcile_billed",
        "admissions billed from authz's records because no access-log record came (unreconciled)",
        lambda: {(): reconciler.billed},
    )
    metrics.counter(
        "meshtoll_admissions_dropped",
        "admissions and unit reports lost because a million were already waiting for the store",
        lambda: {(): recorder.dropped},
    )


def export_extproc(metrics: Metrics, hooks: ExternalProcessorServicer) -> None:
    metrics.count_outcomes(
        "meshtoll_extproc_outcomes", "ext_proc hook streams and how their units were found", hooks.outcomes
    )
    metrics.counter(
        "meshtoll_extproc_body_bytes",
        "response body bytes ext_proc read for units",
        lambda: {(): hooks.body_bytes},
    )


def export_process(metrics: Metrics, restarts: Counter[str]) -> None:
    metrics.gauge(
        "meshtoll_workers",
        "worker processes of this meshtoll serve that are running and report metrics",
        lambda: metrics.workers(),
        combine="max",
    )
    metrics.count_by(
        "meshtoll_background_restarts",
        "background work (watchers, the meter's flushes, reconciliation) started again after a failure",
        restarts,
        "work",
    )
    # The usual process families, so that CPU per request can be read next to the decisions.
    metrics.counter("process_cpu_seconds", "CPU time of meshtoll's processes, user and system", _cpu)
    metrics.gauge("process_resident_memory_bytes", "resident memory of meshtoll's processes", _resident_bytes)


def _cpu() -> dict[Labels, float]:
    return {(): time.process_time()}


def _resident_bytes() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        return 0.0  # not Linux: no /proc (nor os.sysconf on Windows)
