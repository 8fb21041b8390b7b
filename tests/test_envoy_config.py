"""The local stack's Envoy configuration: every variant loads in a real Envoy, and the
listeners that need no meshtoll answer as the benchmark expects."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from meshtoll.local.envoy_config import EnvoyPorts, MtlsFiles, StubPorts, render_authz_stub, render_bootstrap
from tests.certs import TestPki
from tests.client import fetch
from tests.conftest import StartStack
from tests.envoy_validate import assert_envoy_accepts

PORTS = EnvoyPorts(*range(20000, 20000 + len(fields(EnvoyPorts))))
MTLS_LISTENERS = {"mtls_grpc_authz", "mtls_http_authz"}


def variants(pki: TestPki) -> dict[str, str]:
    return {
        "local": render_bootstrap(PORTS),
        "local-mtls": render_bootstrap(PORTS, pki.server),
        "authz-stub": render_authz_stub(StubPorts(20020, 20021)),
    }


def listener_names(bootstrap: str) -> set[str]:
    return {listener["name"] for listener in yaml.safe_load(bootstrap)["static_resources"]["listeners"]}


def test_rendered_bootstraps_are_plain_envoy_yaml(pki: TestPki) -> None:
    for name, text in variants(pki).items():
        assert "${" not in text, name
        assert "<<" not in text, name
        assert not [key for key in yaml.safe_load(text) if key.startswith("x-")], name


def test_mtls_listeners_only_when_certificates_are_given(pki: TestPki) -> None:
    assert not listener_names(render_bootstrap(PORTS)) & MTLS_LISTENERS
    assert listener_names(render_bootstrap(PORTS, pki.server)) >= MTLS_LISTENERS


def test_certificate_paths_with_spaces_stay_one_string(pki: TestPki, tmp_path: Path) -> None:
    spaced = tmp_path / "with space: and colon.pem"
    files = MtlsFiles(ca_cert=spaced, server_cert=pki.server.server_cert, server_key=spaced)
    assert f"filename: '{spaced}'" in render_bootstrap(PORTS, files)


def test_every_client_listener_draws_the_trust_boundary_first(pki: TestPki) -> None:
    # Tested end to end in test_trust_boundary_through_envoy and test_request_paths_through_envoy;
    # here, that no listener (the mTLS ones included) was left without it.
    bootstrap = yaml.safe_load(render_bootstrap(PORTS, pki.server))
    for listener in bootstrap["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (extension,) = manager["early_header_mutation_extensions"]
        mutations = extension["typed_config"]["mutations"]
        assert {"remove_on_match": {"key_matcher": {"prefix": "x-meshtoll-"}}} in mutations
        assert {"remove": "x-request-id"} in mutations
        assert manager["normalize_path"] is manager["merge_slashes"] is True, listener["name"]
        assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST", listener["name"]
        # A failed authz call is a 503 on every Envoy (1.37.0 answers 403 without the mapper).
        (mapper,) = manager["local_reply_config"]["mappers"]
        assert mapper["status_code"] == 503, listener["name"]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["local", "local-mtls", "authz-stub"])
def test_every_bootstrap_variant_passes_envoy_validation(
    variant: str, pki: TestPki, envoy_binary: Path, tmp_path: Path
) -> None:
    config = tmp_path / f"{variant}.yaml"
    config.write_text(variants(pki)[variant])
    assert_envoy_accepts(envoy_binary, config)


@pytest.mark.integration
def test_listeners_without_meshtoll_answer_through_envoy(start_stack: StartStack) -> None:
    stack = start_stack(None, authz_stub=True)

    direct = fetch(stack.url("listen_direct_port", "/anything"))
    assert (direct.status, direct.body) == (200, b"ok\n")

    echoed = fetch(
        stack.url("listen_stub_authz_port", "/v1/items?page=2&q=a%20b"),
        method="POST",
        headers={"x-api-key": "k", "content-type": "application/json"},
        body=b"{}",
    )
    assert echoed.status == 200
    seen = echoed.json()
    assert (seen["method"], seen["path"]) == ("POST", "/v1/items?page=2&q=a%20b")
    assert seen["headers"]["x-api-key"] == "k"
    assert seen["headers"]["x-request-id"]  # generate_request_id: always present upstream


@pytest.mark.integration
def test_envoy_fails_closed_with_503_when_authz_is_down(start_stack: StartStack) -> None:
    stack = start_stack(None, authz_stub=True)  # no meshtoll behind either authz cluster
    for listener in ("listen_http_authz_port", "listen_grpc_authz_port"):
        assert fetch(stack.url(listener, "/v1/items")).status == 503, listener


@pytest.mark.integration
def test_envoy_rejects_oversized_and_underscored_headers_itself(start_stack: StartStack) -> None:
    stack = start_stack(None, authz_stub=True)
    url = stack.url("listen_stub_authz_port", "/")
    assert fetch(url, headers={"x-big": "a" * 70_000}).status == 431
    assert fetch(url, headers={"x_meshtoll_tenant": "evil"}).status == 400


def test_no_shipped_http_authz_files_its_headers_again_as_dynamic_metadata(pki: TestPki) -> None:
    """Nothing meshtoll ships reads ext_authz metadata on the HTTP transport (the limits, the
    meter and the hooks read the x-meshtoll-* request headers), and filing every header of
    the allow again cost Envoy about 1.5% of row (c)'s request (bench/README.md, Round 6)."""
    shipped = {name: yaml.safe_load(text) for name, text in variants(pki).items()}
    root = Path(__file__).parent.parent
    for path in ("deploy/envoy/envoy.yaml", "deploy/k8s/overlays/gateway-sidecar/envoy.yaml"):
        shipped[path] = next(doc for doc in yaml.safe_load_all((root / path).read_text()) if doc)
    checked = 0
    for name, document in shipped.items():
        for listener in document["static_resources"]["listeners"]:
            for network_filter in listener["filter_chains"][0]["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    service = http_filter.get("typed_config", {}).get("http_service")
                    if http_filter["name"] == "envoy.filters.http.ext_authz" and service is not None:
                        checked += 1
                        assert "dynamic_metadata_from_headers" not in service["authorization_response"], name
    assert checked >= 3
