"""`meshtoll render`: the checked-in deployment files are its output for the defaults, and
each parameter lands everywhere it belongs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.cli import main
from meshtoll.errors import ConfigError
from meshtoll.render.files import TARGETS, rendered, stale
from meshtoll.render.params import DeployParams

ROOT = Path(__file__).parent.parent


def test_every_checked_in_deploy_file_is_what_render_makes_of_the_defaults() -> None:
    differing = stale(rendered(list(TARGETS), DeployParams()), ROOT)
    assert differing == [], "run `meshtoll render all --out .` and commit the result"


def test_no_file_under_deploy_is_left_unrendered() -> None:
    # A hand-written file beside the rendered ones would drift unnoticed.
    produced = set(rendered(list(TARGETS), DeployParams()))
    on_disk = {path.relative_to(ROOT) for path in (ROOT / "deploy").rglob("*") if path.is_file()}
    assert on_disk <= produced


def test_check_mode_names_a_stale_file_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "istio", "--out", str(tmp_path)]) == 0
    assert main(["render", "istio", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "deploy" / "istio" / "telemetry.yaml").write_text("edited by hand\n")
    assert main(["render", "istio", "--out", str(tmp_path), "--check"]) == 1
    assert "stale:" in capsys.readouterr().out


def test_a_helm_gateway_label_and_another_namespace_reach_every_file(tmp_path: Path) -> None:
    main(
        [
            "render",
            "all",
            "--out",
            str(tmp_path),
            "--namespace",
            "gw-auth",
            "--gateway-selector",
            "istio=ingress",
        ]
    )
    istio = tmp_path / "deploy" / "istio"
    for name in ("edge-envoyfilter.yaml", "hooks-envoyfilter.yaml", "ratelimit-envoyfilter.yaml"):
        spec = yaml.safe_load((istio / name).read_text())["spec"]
        assert spec["workloadSelector"] == {"labels": {"istio": "ingress"}}
    hooks = (istio / "hooks-envoyfilter.yaml").read_text()
    assert "outbound|8081||meshtoll.gw-auth.svc.cluster.local" in hooks
    mesh = yaml.safe_load((istio / "mesh-config.yaml").read_text())
    services = {item[next(iter(set(item) - {"name"}))]["service"] for item in mesh["extensionProviders"]}
    assert services == {"meshtoll.gw-auth.svc.cluster.local", "otel-collector"}  # and the tracing collector
    policy = yaml.safe_load((tmp_path / "deploy" / "k8s" / "base" / "network-policy.yaml").read_text())
    assert policy["metadata"]["namespace"] == "gw-auth"
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"istio": "ingress"}


def test_a_gateway_api_gateway_is_targeted_by_reference(tmp_path: Path) -> None:
    main(
        [
            "render",
            "istio",
            "k8s",
            "--out",
            str(tmp_path),
            "--gateway-ref",
            "public",
            "--gateway-namespace",
            "edge",
        ]
    )
    istio = tmp_path / "deploy" / "istio"
    for name in ("authorization-policy.yaml", "telemetry.yaml", "hooks-envoyfilter.yaml"):
        spec = yaml.safe_load((istio / name).read_text())["spec"]
        assert spec["targetRefs"] == [
            {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "public"}
        ]
        assert "selector" not in spec
        assert "workloadSelector" not in spec
    access = list(yaml.safe_load_all((istio / "meshtoll-access.yaml").read_text()))[1]
    assert access["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/edge/sa/public-istio"
    ]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"istio_version": "1.27"}, "istio_version"),
        ({"istio_version": "one"}, "istio_version"),
        ({"namespace": "Mesh_Toll"}, "namespace"),
        ({"grpc_port": 0}, "grpc_port"),
        ({"authz_transport": "grcp"}, "authz_transport"),
        ({"gateway_selector": ("istio", "")}, "gateway_selector"),
    ],
)
def test_parameters_istio_or_kubernetes_would_refuse_are_refused(
    params: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        DeployParams(**params)  # type: ignore[arg-type]


def test_a_selector_without_a_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "istio", "--gateway-selector", "ingressgateway", "--check"]) == 1
    assert "key=value" in capsys.readouterr().err


def test_the_grpc_transport_is_a_parameter_not_an_edit(tmp_path: Path) -> None:
    main(["render", "istio", "--out", str(tmp_path), "--authz-transport", "grpc"])
    policy = yaml.safe_load((tmp_path / "deploy" / "istio" / "authorization-policy.yaml").read_text())
    assert policy["spec"]["provider"] == {"name": "meshtoll-grpc"}


def test_a_query_parameter_key_is_removed_after_http_ext_authz_in_what_render_makes(tmp_path: Path) -> None:
    from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import json_format

    assert main(["render", "envoy", "istio", "--out", str(tmp_path), "--api-key-query-param", "api_key"]) == 0
    envoy = yaml.safe_load((tmp_path / "deploy" / "envoy" / "envoy.yaml").read_text())
    full, grpc = envoy["static_resources"]["listeners"]
    names = [item["name"] for item in full["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
    assert names[names.index("envoy.filters.http.ext_authz") + 1] == "meshtoll.hidden_query_key"
    # The gRPC listener's authz answer removes it itself, honouring forward_credentials.
    grpc_names = [
        item["name"] for item in grpc["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    ]
    assert "meshtoll.hidden_query_key" not in grpc_names
    edge = yaml.safe_load((tmp_path / "deploy" / "istio" / "edge-envoyfilter.yaml").read_text())
    (hidden,) = [p["patch"]["value"] for p in edge["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    assert hidden["name"] == "meshtoll.hidden_query_key"
    filter_message = json_format.ParseDict(hidden, http_connection_manager_pb2.HttpFilter())
    mutation = header_mutation_pb2.HeaderMutation()
    filter_message.typed_config.Unpack(mutation)
    assert [item.remove for item in mutation.mutations.query_parameter_mutations] == ["api_key"]
    # Without the parameter nothing changes: the checked-in files are the defaults' output.
    assert "hidden_query_key" not in (ROOT / "deploy" / "istio" / "edge-envoyfilter.yaml").read_text()


@pytest.mark.integration
def test_envoy_accepts_the_rendered_filter(envoy_binary: Path, tmp_path: Path) -> None:
    from tests.envoy_validate import assert_envoy_accepts

    assert main(["render", "envoy", "--out", str(tmp_path), "--api-key-query-param", "api_key"]) == 0
    assert_envoy_accepts(envoy_binary, tmp_path / "deploy" / "envoy" / "envoy.yaml")


def test_render_prints_one_yaml_stream_of_objects_to_apply_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # a checkout's deploy/ would be overwritten here before
    assert main(["render", "istio", "--namespace", "gw-auth"]) == 0
    printed = capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    documents = [document for document in yaml.safe_load_all(printed.out) if document]
    # What `kubectl apply -f -` takes: Kubernetes objects only, meshtoll's in its namespace.
    assert all({"apiVersion", "kind"} <= set(document) for document in documents)
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == [*["AuthorizationPolicy"] * 2, *["EnvoyFilter"] * 3, "PeerAuthentication", "Telemetry"]
    assert "# Source: deploy/istio/edge-envoyfilter.yaml\n" in printed.out
    assert "mesh-config.yaml" in printed.err  # left out, and said so
    assert "outbound|8081||meshtoll.gw-auth.svc.cluster.local" in printed.out


def test_the_kubernetes_stream_is_what_kustomize_builds_of_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: scripts/test installs it (apt-get install kubernetes-client)")
    monkeypatch.chdir(tmp_path)
    assert main(["render", "k8s"]) == 0
    streamed = [document for document in yaml.safe_load_all(capsys.readouterr().out) if document]
    built = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "base")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kustomized = [document for document in yaml.safe_load_all(built) if document]

    def key(document: dict[str, Any]) -> tuple[str, str]:
        return document["kind"], document["metadata"]["name"]

    assert sorted(streamed, key=key) == sorted(kustomized, key=key)


def test_every_target_streams_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "envoy", "compose"]) == 0
    printed = capsys.readouterr().out
    sources = [line for line in printed.splitlines() if line.startswith("# Source: ")]
    assert sources == ["# Source: deploy/envoy/envoy.yaml", "# Source: docker-compose.yml"]
    envoy, compose = [document for document in yaml.safe_load_all(printed) if document]
    assert "static_resources" in envoy
    assert "services" in compose
