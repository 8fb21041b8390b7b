"""Who may reach meshtoll's ports in Kubernetes: the NetworkPolicy and the in-mesh Istio
policies are valid against their schemas (offline) and open the decision ports to the
gateway alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.test_istio_wiring import crd_schema

ROOT = Path(__file__).parent.parent
KUBERNETES_VERSION = "1.33"
DECISION_PORTS = {8081, 8082}


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(path.read_text()) if document}


def test_the_network_policy_is_valid_and_opens_the_decision_ports_to_the_gateway_only() -> None:
    policy = documents(ROOT / "deploy" / "k8s" / "base" / "network-policy.yaml")["NetworkPolicy"]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    for rule in policy["spec"]["ingress"]:
        ports = {port["port"] for port in rule["ports"]}
        if ports & DECISION_PORTS:
            (peer,) = rule["from"]
            assert peer["podSelector"]["matchLabels"] == {"istio": "ingressgateway"}
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "istio-system"}


def test_a_misspelt_network_policy_would_be_caught() -> None:
    policy = documents(ROOT / "deploy" / "k8s" / "base" / "network-policy.yaml")["NetworkPolicy"]
    policy["spec"]["ingress"][0]["ports"][0]["prot"] = 8081
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)


def test_in_the_mesh_only_the_gateways_identity_reaches_the_decision_ports_over_mtls() -> None:
    found = documents(ROOT / "deploy" / "istio" / "meshtoll-access.yaml")
    peer, access = found["PeerAuthentication"], found["AuthorizationPolicy"]
    jsonschema.validate(peer["spec"], crd_schema("PeerAuthentication", "v1")["properties"]["spec"])
    jsonschema.validate(access["spec"], crd_schema("AuthorizationPolicy", "v1")["properties"]["spec"])
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert access["spec"]["action"] == "ALLOW"
    for rule in access["spec"]["rules"]:
        ports = {int(port) for to in rule["to"] for port in to["operation"]["ports"]}
        if ports & DECISION_PORTS:
            principals = [p for source in rule["from"] for p in source["source"]["principals"]]
            assert principals == ["cluster.local/ns/istio-system/sa/istio-ingressgateway"]
        else:
            assert not any(path.startswith("/api") for to in rule["to"] for path in to["operation"]["paths"])
