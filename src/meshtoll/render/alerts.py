"""The Prometheus alert rules for meshtoll: one list, written out as a plain rules file
(deploy/monitoring/alerts.yaml) and as the prometheus-operator's PrometheusRule
(deploy/k8s/monitoring). Every expression names series meshtoll's /metrics serves
(tests/test_monitoring.py holds them against a live one, and promtool checks and unit-tests
the rules)."""

from __future__ import annotations

from typing import Any

GROUP = "meshtoll"


def _rule(
    name: str, expr: str, duration: str, severity: str, summary: str, description: str
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


RULES: tuple[dict[str, Any], ...] = (
    _rule(
        "MeshtollDecisionLatencyHigh",
        "histogram_quantile(0.99, sum by (job, service, le) "
        '(rate(meshtoll_decision_duration_seconds_bucket{service=~"authz|ratelimit"}[5m]))) > 0.1',
        "10m",
        "warning",
        "meshtoll's {{ $labels.service }} decisions are slow (p99 {{ $value | humanizeDuration }})",
        "Envoy fails a decision that takes longer than its timeout (0.25 s for HTTP ext_authz): look at "
        "Redis round trips (meshtoll_redis_round_trip_seconds) and CPU (process_cpu_seconds_total).",
    ),
    _rule(
        "MeshtollDecisionsFailing",
        "sum by (job) "
        '(rate(meshtoll_authz_decisions_total{outcome=~"ratelimit_unavailable|jwks_unavailable"}[5m])) '
        '+ sum by (job) (rate(meshtoll_ratelimit_requests_total{outcome=~"unavailable|failed"}[5m])) > 0',
        "5m",
        "critical",
        "meshtoll answers 503: limits or JWKS cannot be checked",
        "Requests are refused because Redis (failure policy closed) or an issuer's JWKS cannot be reached.",
    ),
    _rule(
        "MeshtollFailureModeAdmissions",
        'sum by (job) (rate(meshtoll_limit_decisions_total{outcome="store_unavailable_open"}[5m])) > 0',
        "2m",
        "warning",
        "meshtoll admits requests without checking their limits (Redis unavailable, failure policy open)",
        "Limits and quotas are not enforced while this fires: restore Redis.",
    ),
    _rule(
        "MeshtollRedisDown",
        "min by (job) (meshtoll_redis_up) == 0",
        "1m",
        "critical",
        "meshtoll cannot reach Redis",
        "Decisions follow the failure policy (--ratelimit-failure-mode); admissions wait in memory.",
    ),
    _rule(
        "MeshtollRedisBreakerOpen",
        "max by (job) (meshtoll_redis_breaker_open) == 1",
        "1m",
        "critical",
        "meshtoll's circuit breaker stops its calls to Redis",
        "Redis kept failing (meshtoll_redis_errors_total by kind says how).",
    ),
    _rule(
        "MeshtollReconcileBacklogGrowing",
        "deriv(max by (job) (meshtoll_reconcile_backlog)[15m:1m]) > 0 "
        "and max by (job) (meshtoll_reconcile_backlog) > 10000",
        "15m",
        "warning",
        "admissions waiting for their access-log record keep piling up",
        "Envoy's access log may not reach meshtoll's meter; reconciliation bills them from authz's records.",
    ),
    _rule(
        "MeshtollUnreconciledUsage",
        "sum by (job) (increase(meshtoll_reconcile_billed_total[1h])) > 0",
        "15m",
        "warning",
        "requests billed without their access-log record (unreconciled)",
        "They are billed from authz's data at the route's cost; check the access logger's delivery.",
    ),
    _rule(
        "MeshtollUsageQuarantined",
        'sum by (job, sink) (increase(meshtoll_usage_sink_records_total{outcome="quarantined"}[1h])) > 0',
        "0m",
        "warning",
        "usage records quarantined by the {{ $labels.sink }} sink",
        "The billing system refused them for good: `meshtoll usage quarantine list`, fix, then replay.",
    ),
    _rule(
        "MeshtollUsageSinkLagging",
        "max by (job, sink) (meshtoll_usage_sink_lag_seconds) > 900",
        "15m",
        "warning",
        "the {{ $labels.sink }} sink is more than 15 minutes behind the ledger",
        'The billing system is slow or failing (meshtoll_usage_sink_records_total{outcome="retried"}).',
    ),
    _rule(
        "MeshtollAdmissionsDropped",
        "sum by (job) (increase(meshtoll_admissions_dropped_total[5m])) > 0",
        "0m",
        "critical",
        "meshtoll dropped admissions: billable requests are lost",
        "A million admissions were waiting for the usage store; restore Redis.",
    ),
    _rule(
        "MeshtollPolicyRejected",
        "max by (job) (increase(meshtoll_policy_rejected_reloads_total[10m])) > 0 "
        "or max by (job) (increase(meshtoll_ratelimit_config_rejected_reloads_total[10m])) > 0",
        "0m",
        "warning",
        "a new policy or rate-limit configuration was rejected; the last good one stays active",
        "meshtoll's log names each problem with its file, line and field path.",
    ),
    _rule(
        "MeshtollTenantRegistryStale",
        "max by (job, instance) (meshtoll_runtime_registry_staleness_seconds) > 30",
        "2m",
        "critical",
        "meshtoll at {{ $labels.instance }} has not read the tenant registry for "
        "{{ $value | humanizeDuration }}",
        "It serves the run-time tenants it knew: keys revoked and tenants suspended since still pass "
        "there. Check its Redis (meshtoll_redis_up) and its log.",
    ),
    _rule(
        "MeshtollRuntimeTenantsSkipped",
        "max by (job, instance) (meshtoll_runtime_tenants_skipped) > 0",
        "10m",
        "warning",
        "meshtoll at {{ $labels.instance }} does not serve {{ $value }} run-time tenants",
        "They conflict with its policy file (a tenant name or key the file has, an unknown plan): its "
        "log names each; GET /api/tenants/{tenant} shows why (not_served).",
    ),
    _rule(
        "MeshtollBackgroundWorkRestarting",
        "sum by (job, work) (increase(meshtoll_background_restarts_total[10m])) > 0",
        "0m",
        "warning",
        "meshtoll's {{ $labels.work }} failed and was started again",
        "meshtoll's log has the exception.",
    ),
)


def rule_groups() -> dict[str, Any]:
    return {"groups": [{"name": GROUP, "rules": list(RULES)}]}
