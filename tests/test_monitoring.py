"""What an operator installs beside meshtoll: the alert rules pass `promtool check rules` and
fire as their unit tests say (`promtool test rules`), the prometheus-operator objects are
valid against its CRD schemas, and every query of the Grafana dashboard and of the alerts is
valid PromQL naming only series (and labels) a live /metrics serves after traffic through
Envoy."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.metrics_core import Metric

from meshtoll.local.devstack import LocalStack
from meshtoll.render.alerts import RULES, rule_groups
from meshtoll.render.dashboard import RATE, dashboard, queries
from meshtoll.render.monitoring import pod_monitor, prometheus_rule, service_monitor
from meshtoll.render.params import DeployParams
from tests.billing_receivers import Receiver, running_receiver
from tests.client import fetch
from tests.conftest import StartStack
from tests.scraped import scrape
from tests.waiting import eventually

ROOT = Path(__file__).parent.parent
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
CRDS = ROOT / "tests" / "schemas" / "prometheus-operator-crds.yaml"
KEY = "k-monitored"
HOOKED_KEY = "k-monitored-hooks"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, "promtool is missing: scripts/test installs Debian's prometheus package"
    return found


def run_promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *arguments], capture_output=True, text=True, check=False)


def test_the_rules_file_passes_promtool_and_is_the_rendering() -> None:
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(RULES)} rules found" in checked.stdout
    assert yaml.safe_load(ALERTS.read_text()) == rule_groups()


def test_the_prometheus_rule_carries_the_same_rules(tmp_path: Path) -> None:
    rules = tmp_path / "from-prometheus-rule.yaml"
    rules.write_text(yaml.safe_dump(prometheus_rule(DeployParams())["spec"]))
    checked = run_promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# The expected alerts, as promtool's unit tests state them: (alert, input series, when, labels).
SERIES = 'job="meshtoll",instance="10.0.0.1:8090"'


def alert_case(
    name: str,
    series: list[dict[str, str]],
    fires_at: str,
    quiet_at: str,
    summary: str | None = None,
    **labels: str,
) -> dict[str, Any]:
    """`summary`: the rule's summary with its template filled in, when it has one."""
    rule = next(rule for rule in RULES if rule["alert"] == name)
    expected = {**rule["annotations"], **({"summary": summary} if summary else {})}
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": quiet_at, "alertname": name, "exp_alerts": []},
            {
                "eval_time": fires_at,
                "alertname": name,
                "exp_alerts": [
                    {
                        "exp_labels": {"job": "meshtoll", **rule["labels"], **labels},
                        "exp_annotations": expected,
                    }
                ],
            },
        ],
    }


def test_the_alerts_fire_as_their_unit_tests_say(tmp_path: Path) -> None:
    cases = [
        alert_case(
            "MeshtollRedisDown",
            [{"series": f"meshtoll_redis_up{{{SERIES}}}", "values": "1 1 0 0 0 0"}],
            fires_at="5m",
            quiet_at="2m",  # down for a minute only: pending
        ),
        alert_case(
            "MeshtollRedisBreakerOpen",
            [{"series": f"meshtoll_redis_breaker_open{{{SERIES}}}", "values": "0 0 1 1 1"}],
            fires_at="4m",
            quiet_at="1m",
        ),
        alert_case(
            "MeshtollFailureModeAdmissions",
            [
                {
                    "series": f'meshtoll_limit_decisions_total{{{SERIES},outcome="store_unavailable_open"}}',
                    "values": "0 0 0+60x10",
                }
            ],
            fires_at="9m",
            quiet_at="1m",
        ),
        alert_case(
            "MeshtollAdmissionsDropped",
            [{"series": f"meshtoll_admissions_dropped_total{{{SERIES}}}", "values": "0 0 0 5 5"}],
            fires_at="3m",
            quiet_at="2m",
        ),
        alert_case(
            "MeshtollUsageQuarantined",
            [
                {
                    "series": f'meshtoll_usage_sink_records_total{{{SERIES},sink="lago",outcome="quarantined"}}',
                    "values": "0 0 0 2",
                }
            ],
            fires_at="3m",
            quiet_at="2m",
            summary="usage records quarantined by the lago sink",
            sink="lago",
        ),
        alert_case(
            "MeshtollTenantRegistryStale",
            [
                {
                    "series": f"meshtoll_runtime_registry_staleness_seconds{{{SERIES}}}",
                    "values": "1 1 40 100 160 220",
                }
            ],
            fires_at="5m",
            quiet_at="3m",  # stale for a minute only: pending
            summary="meshtoll at 10.0.0.1:8090 has not read the tenant registry for 3m 40s",
            instance="10.0.0.1:8090",
        ),
        alert_case(
            "MeshtollRuntimeTenantsSkipped",
            [{"series": f"meshtoll_runtime_tenants_skipped{{{SERIES}}}", "values": "0 0 2x12"}],
            fires_at="13m",
            quiet_at="1m",
            summary="meshtoll at 10.0.0.1:8090 does not serve 2 run-time tenants",
            instance="10.0.0.1:8090",
        ),
        alert_case(
            "MeshtollBackgroundWorkRestarting",
            [
                {
                    "series": f'meshtoll_background_restarts_total{{{SERIES},work="reconciler"}}',
                    "values": "0 0 1",
                }
            ],
            fires_at="2m",
            quiet_at="1m",
            summary="meshtoll's reconciler failed and was started again",
            work="reconciler",
        ),
    ]
    rules = tmp_path / "alerts.yaml"
    rules.write_text(ALERTS.read_text())
    unit = tmp_path / "alerts_test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": cases}))
    tested = run_promtool("test", "rules", str(unit))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    for document in yaml.load_all(CRDS.read_text(), Loader=yaml.CSafeLoader):
        if document and document["spec"]["names"]["kind"] == kind:
            (served,) = [version for version in document["spec"]["versions"] if version["name"] == "v1"]
            schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(kind)


@pytest.mark.parametrize(
    ("kind", "path", "build"),
    [
        ("ServiceMonitor", "service-monitor.yaml", service_monitor),
        ("PodMonitor", "pod-monitor.yaml", pod_monitor),
        ("PrometheusRule", "prometheus-rule.yaml", prometheus_rule),
    ],
)
def test_the_monitoring_objects_are_valid_against_the_operators_crds(
    kind: str, path: str, build: Any
) -> None:
    rendered = yaml.safe_load((ROOT / "deploy" / "k8s" / "monitoring" / path).read_text())
    assert rendered == build(DeployParams())
    assert (rendered["apiVersion"], rendered["kind"]) == ("monitoring.coreos.com/v1", kind)
    # The schema's own Go regular expressions ((?i) mid-pattern) are not Python's: validate
    # with it without checking it first; no pattern of the fields used here is one of those.
    jsonschema.Draft7Validator(crd_schema(kind)["properties"]["spec"]).validate(rendered["spec"])


def test_a_misspelt_monitor_would_be_caught() -> None:
    spec = service_monitor(DeployParams())["spec"]
    spec["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_schema("ServiceMonitor")["properties"]["spec"]).validate(spec)


def test_the_service_monitor_scrapes_the_services_admin_port() -> None:
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "service.yaml").read_text())
    ports = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = service_monitor(DeployParams())["spec"]["endpoints"]
    assert endpoint["port"] in ports
    assert (
        service_monitor(DeployParams())["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )


def test_the_checked_in_dashboard_is_the_rendering() -> None:
    checked_in = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    assert checked_in == dashboard()
    targets = [target for panel in checked_in["panels"] for target in panel.get("targets", [])]
    assert [target["expr"] for target in targets] == queries()


# --- every query against a live /metrics ---------------------------------------------------

SERIES_NAME = re.compile(r"\b((?:meshtoll|process)_[a-z0-9_]+)\b(\{[^}]*\})?")
LABEL_NAME = re.compile(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus adds (job, instance) or a histogram's buckets carry (le).
SCRAPE_LABELS = {"job", "instance", "le"}


def expressions() -> list[str]:
    return [*queries(), *(rule["expr"] for rule in RULES)]


def family_of(series: str, families: dict[str, Metric]) -> Metric | None:
    for suffix, kind in (
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_count", "histogram"),
        ("_sum", "histogram"),
    ):
        base = series.removesuffix(suffix)
        if base != series and base in families and families[base].type == kind:
            return families[base]
    return families.get(series)


def problems(expression: str, families: dict[str, Metric]) -> list[str]:
    """What in `expression` names a series or label /metrics does not serve."""
    found = []
    labels_here: set[str] = set()
    for name, selector in SERIES_NAME.findall(expression):
        family = family_of(name, families)
        if family is None:
            found.append(f"{name}: no such family")
            continue
        served = {label for sample in family.samples for label in sample.labels}
        labels_here |= served
        for label in LABEL_NAME.findall(selector):
            if family.samples and label not in served | SCRAPE_LABELS:
                found.append(f"{name}: no label {label!r} (has {sorted(served)})")
    for grouping in GROUPING.findall(expression):
        for label in (item.strip() for item in grouping.split(",")):
            if label and label not in labels_here | SCRAPE_LABELS:
                found.append(f"grouping by {label!r}, which no series of the expression has")
    return found


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    recorded = [
        {"record": f"meshtoll:query_{n}", "expr": expression.replace(RATE, "5m")}
        for n, expression in enumerate(expressions())
    ]
    rules = tmp_path / "queries.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": recorded}]}))
    checked = run_promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import hashlib

    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    path = tmp_path_factory.mktemp("monitored") / "policy.yaml"
    path.write_text(f"""
plans:
  metered: {{limits: [{{requests: 100000, per: minute}}]}}
tenants:
  monitored: {{plan: metered, api_keys: [{{id: monitored, sha256: {sha(KEY)}}}]}}
routes:
  - {{prefix: /v1/, name: v1}}
  - prefix: /v1/chat
    name: chat
    hooks: {{usage_from_body: usage.total_tokens, response_headers: {{set: {{x-served-for: "{{tenant}}"}}}}}}
""")
    return path


@pytest.fixture(scope="module")
def openmeter() -> Iterator[Receiver]:
    with running_receiver("openmeter") as receiver:
        yield receiver


@pytest.mark.integration
def test_every_dashboard_and_alert_query_names_series_a_live_metrics_serves(
    start_stack: StartStack, policy: Path, openmeter: Receiver
) -> None:
    # A billing sink too, so that its families have series to hold the queries against.
    stack: LocalStack = start_stack(
        policy,
        serve_args=("--usage-sink", f"openmeter={openmeter.url}"),
        meshtoll_environment=(("MESHTOLL_OPENMETER_TOKEN", openmeter.token),),
    )
    headers = {"x-api-key": KEY}
    for listener in (
        "listen_http_authz_port",
        "listen_grpc_authz_port",
        "listen_rls_port",
        "listen_full_port",
    ):
        assert fetch(stack.url(listener, "/v1/items"), headers=headers).status == 200
        assert fetch(stack.url(listener, "/v1/items"), headers={"x-api-key": "nope"}).status == 401
    assert (
        fetch(stack.url("listen_full_port", "/v1/chat/completions?tokens=3"), headers=headers).status == 200
    )
    # The meter's families fill once Envoy's access log has flushed.
    eventually(
        lambda: scrape(stack.meshtoll_admin_url).get("meshtoll_usage_sink_lag_seconds"),
        lambda family: family is not None and bool(family.samples),
        timeout=30,
        message="the sink's lag, from the process that delivers",
    )
    eventually(
        lambda: scrape(stack.meshtoll_admin_url).get("meshtoll_meter_ledger_write_seconds"),
        lambda family: (
            family is not None and any(s.value > 0 for s in family.samples if s.name.endswith("_count"))
        ),
        timeout=15,
        message="a ledger write",
    )
    families = scrape(stack.meshtoll_admin_url)
    found = {expression: problems(expression, families) for expression in expressions()}
    wrong = {expression: listed for expression, listed in found.items() if listed}
    assert wrong == {}, json.dumps(wrong, indent=1)


def test_the_query_check_catches_a_misnamed_series_or_label() -> None:
    families = {
        "meshtoll_authz_decisions": Metric("meshtoll_authz_decisions", "", "counter"),
    }
    families["meshtoll_authz_decisions"].add_sample("meshtoll_authz_decisions_total", {"outcome": "allow"}, 1)
    assert problems("sum by (outcome) (rate(meshtoll_authz_decisions_total[5m]))", families) == []
    assert problems("rate(meshtoll_authz_decision_total[5m])", families) == [
        "meshtoll_authz_decision_total: no such family"
    ]
    assert problems('meshtoll_authz_decisions_total{reason="x"}', families) != []
    assert problems("sum by (tenant) (meshtoll_authz_decisions_total)", families) != []
