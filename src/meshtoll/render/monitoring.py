"""What an operator installs beside meshtoll to watch it:

deploy/monitoring/          the Grafana dashboard (JSON, for import or provisioning) and the
                            alert rules as a plain Prometheus rules file
deploy/k8s/monitoring/      for the prometheus-operator: a ServiceMonitor scraping the base's
                            Service and the same rules as a PrometheusRule (kubectl apply -k),
                            or a PodMonitor scraping its pods instead of the ServiceMonitor
"""

from __future__ import annotations

from typing import Any

from meshtoll.render.alerts import rule_groups
from meshtoll.render.dashboard import dashboard_json
from meshtoll.render.documents import yaml_file
from meshtoll.render.k8s_objects import LABELS, NAME, SELECTOR, metadata
from meshtoll.render.params import DeployParams

SCRAPE_INTERVAL = "15s"


def monitoring_files(params: DeployParams) -> dict[str, str]:
    return {"grafana-dashboard.json": dashboard_json(), "alerts.yaml": alerts_file()}


def alerts_file() -> str:
    return yaml_file(
        """
meshtoll's alert rules for Prometheus: list this file under rule_files (promtool check rules
deploy/monitoring/alerts.yaml); with the prometheus-operator, deploy/k8s/monitoring has them
as a PrometheusRule. Every alert is grouped by job; the README's "Observe" explains each.
""",
        rule_groups(),
    )


def kubernetes_monitoring(params: DeployParams) -> dict[str, str]:
    """deploy/k8s/monitoring/*, by path under deploy/k8s."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": params.namespace,
        "resources": ["service-monitor.yaml", "prometheus-rule.yaml"],
    }
    return {
        "monitoring/kustomization.yaml": yaml_file(
            """
For the prometheus-operator (its CRDs installed): `kubectl apply -k deploy/k8s/monitoring`
scrapes the base's meshtoll Service and loads the alert rules. A Prometheus selecting
monitors and rules by label (kube-prometheus-stack: release=<its release>) needs that label
added here (`labels:` in this kustomization). A Prometheus that watches PodMonitors only:
list pod-monitor.yaml instead of service-monitor.yaml (never both: every pod scraped twice).
The gateway-sidecar overlay's meshtoll listens on the pod's loopback only: not scraped.
""",
            kustomization,
        ),
        "monitoring/service-monitor.yaml": yaml_file(
            "meshtoll's /metrics, through the Service's http-admin port (each pod, every worker).",
            service_monitor(params),
        ),
        "monitoring/pod-monitor.yaml": yaml_file(
            "meshtoll's /metrics from each pod of the base's Deployment (container port `admin`).",
            pod_monitor(params),
        ),
        "monitoring/prometheus-rule.yaml": yaml_file(
            "deploy/monitoring/alerts.yaml as a PrometheusRule.", prometheus_rule(params)
        ),
    }


def _monitor(kind: str, endpoints: str, port: str, params: DeployParams) -> dict[str, Any]:
    # /metrics is open on the admin port (only /api/* needs the token); Prometheus itself
    # negotiates OpenMetrics.
    endpoint = {"port": port, "path": "/metrics", "interval": SCRAPE_INTERVAL, "scheme": "http"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": kind,
        "metadata": metadata(NAME, params),
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR)},
            "namespaceSelector": {"matchNames": [params.namespace]},
            endpoints: [endpoint],
        },
    }


def service_monitor(params: DeployParams) -> dict[str, Any]:
    """Through the base Service's `http-admin` port."""
    return _monitor("ServiceMonitor", "endpoints", "http-admin", params)


def pod_monitor(params: DeployParams) -> dict[str, Any]:
    """From the pods' container port `admin`."""
    return _monitor("PodMonitor", "podMetricsEndpoints", "admin", params)


def prometheus_rule(params: DeployParams) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(NAME, params, {**LABELS}),
        "spec": rule_groups(),
    }
