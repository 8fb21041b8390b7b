"""The Grafana dashboard for the gateway (deploy/monitoring/grafana-dashboard.json): decisions
and denials by reason, latency percentiles, Redis health, limits and leases, the meter and
reconciliation, the billing sinks, run-time tenants, hooks, the policy and the processes.
Every query names series meshtoll's /metrics serves (tests/test_monitoring.py holds each
against a live one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals
UID = "meshtoll-gateway"


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"
    description: str = ""


def _quantiles(selector: str, by: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({selector}[{RATE}])))",
            f"p{int(q * 100)} " + " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")),
        )
        for q in (0.5, 0.99)
    )


SECTIONS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Decisions",
        (
            Panel(
                "Requests per second by outcome",
                "reqps",
                ((f"sum by (outcome) (rate(meshtoll_authz_decisions_total[{RATE}]))", "{{outcome}}"),),
                description="authz decisions: allow, or the denial's error code",
            ),
            Panel(
                "Denials by reason",
                "reqps",
                (
                    (
                        "sum by (outcome) "
                        f'(rate(meshtoll_authz_decisions_total{{outcome!="allow"}}[{RATE}]))',
                        "{{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Decision latency (p50, p99)",
                "s",
                _quantiles("meshtoll_decision_duration_seconds_bucket", "service, transport"),
            ),
        ),
    ),
    (
        "Limits",
        (
            Panel(
                "Limit decisions by outcome",
                "reqps",
                ((f"sum by (outcome) (rate(meshtoll_limit_decisions_total[{RATE}]))", "{{outcome}}"),),
            ),
            Panel(
                "Decisions served by token leases",
                "percentunit",
                (
                    (
                        f'sum(rate(meshtoll_limit_decisions_total{{outcome="admitted_from_lease"}}[{RATE}])) '
                        f'/ sum(rate(meshtoll_limit_decisions_total{{outcome="admitted"}}[{RATE}]))',
                        "from leases",
                    ),
                ),
            ),
            Panel(
                "RLS calls by outcome",
                "reqps",
                ((f"sum by (outcome) (rate(meshtoll_ratelimit_requests_total[{RATE}]))", "{{outcome}}"),),
            ),
        ),
    ),
    (
        "Redis",
        (
            Panel(
                "Redis reachable, breaker open",
                "short",
                (
                    ("min(meshtoll_redis_up)", "reachable"),
                    ("max(meshtoll_redis_breaker_open)", "breaker open"),
                ),
            ),
            Panel(
                "Redis round trip (p50, p99)",
                "s",
                _quantiles("meshtoll_redis_round_trip_seconds_bucket", "job"),
            ),
            Panel(
                "Redis errors by kind",
                "ops",
                ((f"sum by (kind) (rate(meshtoll_redis_errors_total[{RATE}]))", "{{kind}}"),),
            ),
            Panel(
                "Lease hits granted and returned",
                "ops",
                ((f"sum by (event) (rate(meshtoll_lease_hits_total[{RATE}]))", "{{event}}"),),
            ),
        ),
    ),
    (
        "Metering",
        (
            Panel(
                "Access-log entries by outcome",
                "ops",
                (
                    (f"sum(rate(meshtoll_meter_entries_received_total[{RATE}]))", "received"),
                    (f"sum by (outcome) (rate(meshtoll_meter_records_total[{RATE}]))", "{{outcome}}"),
                ),
            ),
            Panel(
                "Reconciliation backlog, waiting entries",
                "short",
                (
                    ("max(meshtoll_reconcile_backlog)", "admissions awaiting their record"),
                    ("sum(meshtoll_meter_waiting_records)", "entries awaiting their admission"),
                ),
            ),
            Panel(
                "Unreconciled and dropped",
                "ops",
                (
                    (f"sum(rate(meshtoll_reconcile_billed_total[{RATE}]))", "billed without access log"),
                    (f"sum(rate(meshtoll_admissions_dropped_total[{RATE}]))", "admissions dropped"),
                ),
            ),
            Panel(
                "Ledger writes (p50, p99)",
                "s",
                _quantiles("meshtoll_meter_ledger_write_seconds_bucket", "job"),
            ),
        ),
    ),
    (
        "Billing sinks",
        (
            Panel(
                "Usage records by sink and outcome",
                "ops",
                (
                    (
                        f"sum by (sink, outcome) (rate(meshtoll_usage_sink_records_total[{RATE}]))",
                        "{{sink}} {{outcome}}",
                    ),
                ),
                description="delivered, retried, quarantined (refused for good: see the quarantine), skipped",
            ),
            Panel(
                "Sink lag",
                "s",
                (("max by (sink) (meshtoll_usage_sink_lag_seconds)", "{{sink}}"),),
                description="how long ago the oldest record not delivered yet was appended",
            ),
            Panel(
                "Records not delivered yet",
                "short",
                (("max by (sink) (meshtoll_usage_sink_lag_records)", "{{sink}}"),),
            ),
        ),
    ),
    (
        "Run-time tenants",
        (
            Panel(
                "Run-time tenants",
                "short",
                (
                    ("max(meshtoll_runtime_tenants)", "in the registry"),
                    ("max(meshtoll_runtime_tenants_skipped)", "not served (conflict with the file)"),
                ),
                kind="stat",
                description="meshtoll_policy_tenants counts the file's tenants and these together",
            ),
            Panel(
                "Registry version applied, by instance",
                "short",
                (("max by (instance) (meshtoll_runtime_registry_version)", "{{instance}}"),),
                description="instances at different versions for more than a second are not following",
            ),
            Panel(
                "Registry staleness, by instance",
                "s",
                (("max by (instance) (meshtoll_runtime_registry_staleness_seconds)", "{{instance}}"),),
                description="since each instance last read the change log to its end: a change "
                "reaches it within this",
            ),
            Panel(
                "Tenant changes",
                "ops",
                (
                    (
                        f"sum by (outcome) (rate(meshtoll_tenant_api_writes_total[{RATE}]))",
                        "asked: {{outcome}}",
                    ),
                    (f"max(rate(meshtoll_runtime_registry_changes_applied_total[{RATE}]))", "applied"),
                    (f"max(increase(meshtoll_runtime_registry_reloads_total[{RATE}]))", "snapshots reloaded"),
                ),
                description="changes asked of the admin APIs by outcome, and applied from the registry's log",
            ),
        ),
    ),
    (
        "Hooks, policy, processes",
        (
            Panel(
                "ext_proc streams and outcomes",
                "ops",
                ((f"sum by (outcome) (rate(meshtoll_extproc_outcomes_total[{RATE}]))", "{{outcome}}"),),
            ),
            Panel(
                "ext_proc body bytes read",
                "Bps",
                ((f"sum(rate(meshtoll_extproc_body_bytes_total[{RATE}]))", "bytes"),),
            ),
            Panel(
                "Policy",
                "short",
                (
                    ("max(meshtoll_policy_version)", "version"),
                    ("max(meshtoll_policy_tenants)", "tenants"),
                    ("max(meshtoll_policy_rejected_reloads_total)", "rejected reloads"),
                ),
                kind="stat",
            ),
            Panel(
                "CPU per decision",
                "s",
                (
                    (
                        f"sum(rate(process_cpu_seconds_total[{RATE}])) "
                        f"/ sum(rate(meshtoll_authz_decisions_total[{RATE}]))",
                        "CPU seconds per authz decision",
                    ),
                ),
            ),
            Panel(
                "Workers and restarts",
                "short",
                (
                    ("sum(meshtoll_workers)", "workers"),
                    (
                        f"sum by (work) (increase(meshtoll_background_restarts_total[{RATE}]))",
                        "{{work}} restarted",
                    ),
                ),
            ),
        ),
    ),
)


def queries() -> list[str]:
    """Every PromQL expression of the dashboard."""
    return [expr for _, panels in SECTIONS for panel in panels for expr, _ in panel.queries]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for section, section_panels in SECTIONS:
        panels.append({"type": "row", "title": section, "collapsed": False, "gridPos": _grid(0, y, 24, 1)})
        y += 1
        width = 24 // len(section_panels)
        for column, panel in enumerate(section_panels):
            panels.append(_panel(panel, _grid(column * width, y, width, 8)))
        y += 8
    for number, drawn in enumerate(panels, start=1):
        drawn["id"] = number
    return {
        "uid": UID,
        "title": "meshtoll gateway",
        "tags": ["meshtoll", "envoy"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}
            ]
        },
        "panels": panels,
    }


def _panel(panel: Panel, grid: dict[str, int]) -> dict[str, Any]:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": datasource,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": datasource, "expr": expr, "legendFormat": legend}
            for n, (expr, legend) in enumerate(panel.queries)
        ],
    }


def _grid(x: int, y: int, width: int, height: int) -> dict[str, int]:
    return {"x": x, "y": y, "w": width, "h": height}


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
