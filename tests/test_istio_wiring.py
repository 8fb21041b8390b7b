"""The Istio wiring in deploy/istio: valid against Istio's CRD schemas, and asking Envoy for
exactly what envoy/local.yaml (tested end to end) asks for."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshtoll.local.envoy_config import EnvoyPorts, render_bootstrap
from meshtoll.meter.log_line import LOG_LINE_FORMAT
from meshtoll.render.local_filters import with_grpc_cluster

ROOT = Path(__file__).parent.parent
ISTIO = ROOT / "deploy" / "istio"
CRDS = ROOT / "tests" / "schemas" / "istio-crds.yaml"
# The local bootstrap is read here, never run: its ports do not matter.
ANY_PORTS = EnvoyPorts(**dict.fromkeys((field.name for field in dataclasses.fields(EnvoyPorts)), 0))


@functools.cache
def _crds() -> list[dict[str, Any]]:
    return [document for document in yaml.load_all(CRDS.read_text(), Loader=yaml.CSafeLoader) if document]


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    for document in _crds():
        if not document or document["spec"]["names"]["kind"] != kind:
            continue
        for served in document["spec"]["versions"]:
            if served["name"] == version:
                schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
                return schema
    raise LookupError(f"{kind} {version} is not in {CRDS}")


@pytest.fixture(scope="module")
def http_ext_authz() -> dict[str, Any]:
    bootstrap = yaml.safe_load(render_bootstrap(ANY_PORTS))
    listener = next(
        item for item in bootstrap["static_resources"]["listeners"] if item["name"] == "http_authz"
    )
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    config: dict[str, Any] = next(
        item["typed_config"]
        for item in manager["http_filters"]
        if item["name"] == "envoy.filters.http.ext_authz"
    )
    return config


@pytest.fixture(scope="module")
def http_provider() -> dict[str, Any]:
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    provider: dict[str, Any] = next(
        item["envoyExtAuthzHttp"] for item in mesh["extensionProviders"] if item["name"] == "meshtoll-http"
    )
    return provider


def istio_patterns(names: list[str]) -> list[dict[str, str]]:
    return [{"prefix": name[:-1]} if name.endswith("*") else {"exact": name} for name in names]


def test_authorization_policy_is_valid_against_istios_crd_schema() -> None:
    policy = yaml.safe_load((ISTIO / "authorization-policy.yaml").read_text())
    jsonschema.validate(policy["spec"], crd_schema("AuthorizationPolicy", "v1")["properties"]["spec"])
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == "meshtoll-http"


def test_a_misspelt_authorization_policy_would_be_caught() -> None:
    schema = crd_schema("AuthorizationPolicy", "v1")["properties"]["spec"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"action": "CUSTOMISED"}, schema)


def test_istio_provider_sends_and_returns_the_headers_the_local_envoy_does(
    http_ext_authz: dict[str, Any], http_provider: dict[str, Any]
) -> None:
    service = http_ext_authz["http_service"]
    assert (
        istio_patterns(http_provider["includeRequestHeadersInCheck"])
        == http_ext_authz["allowed_headers"]["patterns"]
    )
    assert (
        istio_patterns(http_provider["headersToUpstreamOnAllow"])
        == (service["authorization_response"]["allowed_upstream_headers"]["patterns"])
    )
    assert (
        istio_patterns(http_provider["headersToDownstreamOnDeny"])
        == (service["authorization_response"]["allowed_client_headers"]["patterns"])
    )
    assert (
        istio_patterns(http_provider["headersToDownstreamOnAllow"])
        == (service["authorization_response"]["allowed_client_headers_on_success"]["patterns"])
    )
    added = {item["key"]: item["value"] for item in service["authorization_request"]["headers_to_add"]}
    assert http_provider["includeAdditionalHeadersInCheck"] == added
    assert http_provider["failOpen"] is http_ext_authz["failure_mode_allow"] is False
    assert http_provider["timeout"] == service["server_uri"]["timeout"]


def test_ratelimit_envoyfilter_is_valid_and_matches_the_local_envoy() -> None:
    document = yaml.safe_load((ISTIO / "ratelimit-envoyfilter.yaml").read_text())
    jsonschema.validate(document["spec"], crd_schema("EnvoyFilter", "v1alpha3")["properties"]["spec"])
    bootstrap = yaml.safe_load(render_bootstrap(ANY_PORTS))
    listener = next(item for item in bootstrap["static_resources"]["listeners"] if item["name"] == "rls")
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    local_filter = next(
        item for item in manager["http_filters"] if item["name"] == "envoy.filters.http.ratelimit"
    )
    istio_filter = document["spec"]["configPatches"][0]["patch"]["value"]
    local_config = {
        key: value for key, value in local_filter["typed_config"].items() if key != "rate_limit_service"
    }
    istio_config = {
        key: value for key, value in istio_filter["typed_config"].items() if key != "rate_limit_service"
    }
    assert istio_config == local_config  # the descriptors (rate_limits) among them


def test_hooks_envoyfilter_is_valid_and_matches_the_local_envoy() -> None:
    document = yaml.safe_load((ISTIO / "hooks-envoyfilter.yaml").read_text())
    jsonschema.validate(document["spec"], crd_schema("EnvoyFilter", "v1alpha3")["properties"]["spec"])
    bootstrap = yaml.safe_load(render_bootstrap(ANY_PORTS))
    listener = next(item for item in bootstrap["static_resources"]["listeners"] if item["name"] == "full")
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    local = [item for item in manager["http_filters"] if item["name"].startswith("meshtoll.hooks")]
    istio = [patch["patch"]["value"] for patch in document["spec"]["configPatches"]]
    assert [item["name"] for item in istio] == [item["name"] for item in local] == ["meshtoll.hooks"]
    # One composite filter whose matcher builds the ext_proc filter of each failure mode, the
    # same as the local Envoy's but for the cluster its calls go to (istiod's for meshtoll).
    (istio_filter,), (local_filter,) = istio, local
    processors = {
        mode: action["action"]["typed_config"]["typed_config"]["typed_config"]
        for mode, action in istio_filter["typed_config"]["xds_matcher"]["matcher_tree"]["exact_match_map"][
            "map"
        ].items()
    }
    assert {mode: processor["failure_mode_allow"] for mode, processor in processors.items()} == {
        "open": True,
        "closed": False,
    }
    (cluster,) = {
        processor["grpc_service"]["envoy_grpc"]["cluster_name"] for processor in processors.values()
    }
    assert cluster != "meshtoll_grpc"
    assert istio_filter == with_grpc_cluster(local_filter, cluster)


def test_the_meter_provider_logs_what_the_local_envoy_logs() -> None:
    telemetry = yaml.safe_load((ISTIO / "telemetry.yaml").read_text())
    jsonschema.validate(telemetry["spec"], crd_schema("Telemetry", "v1")["properties"]["spec"])
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    providers = {item["name"]: item for item in mesh["extensionProviders"]}
    # `envoy` first: a Telemetry list replaces meshConfig.accessLogFile, so without it the
    # gateway's own access log would stop. The meter is the OpenTelemetry provider.
    assert telemetry["spec"]["accessLogging"][0]["providers"] == [
        {"name": "envoy"},
        {"name": "meshtoll-meter"},
    ]
    otel = providers["meshtoll-meter"]["envoyOtelAls"]
    local = local_connection_manager("full")["access_log"][0]["typed_config"]
    assert otel["logName"] == local["common_config"]["log_name"]
    assert otel["logFormat"] == {"text": LOG_LINE_FORMAT} == {"text": local["body"]["string_value"]}
    # The gRPC access log stays available as a second provider, as the local full_als logs.
    als = providers["meshtoll-meter-als"]["envoyHttpAls"]
    local_als = local_connection_manager("full_als")["access_log"][0]["typed_config"]
    assert als["logName"] == local_als["common_config"]["log_name"]
    assert als["additionalRequestHeadersToLog"] == local_als["additional_request_headers_to_log"]


def local_connection_manager(listener_name: str = "full") -> dict[str, Any]:
    bootstrap = yaml.safe_load(render_bootstrap(ANY_PORTS))
    listener = next(
        item for item in bootstrap["static_resources"]["listeners"] if item["name"] == listener_name
    )
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def test_the_edge_envoyfilter_draws_the_local_envoys_trust_boundary() -> None:
    document = yaml.safe_load((ISTIO / "edge-envoyfilter.yaml").read_text())
    jsonschema.validate(document["spec"], crd_schema("EnvoyFilter", "v1alpha3")["properties"]["spec"])
    (patch,) = document["spec"]["configPatches"]
    assert patch["applyTo"] == "NETWORK_FILTER"
    assert patch["match"]["context"] == "GATEWAY"
    assert patch["patch"]["operation"] == "MERGE"
    merged = patch["patch"]["value"]["typed_config"]
    local = local_connection_manager()
    # Client-sent x-meshtoll-* and x-request-id go before anything reads the request.
    assert merged["early_header_mutation_extensions"] == local["early_header_mutation_extensions"]
    assert merged["path_with_escaped_slashes_action"] == local["path_with_escaped_slashes_action"]
    # A failed authz call is a 503 on every Envoy, 1.37.0 included.
    assert merged["local_reply_config"] == local["local_reply_config"]


def test_the_mesh_normalises_paths_as_the_local_envoy_does() -> None:
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    # Istio's MERGE_SLASHES sets normalize_path and merge_slashes on every proxy.
    assert mesh["pathNormalization"] == {"normalization": "MERGE_SLASHES"}
    local = local_connection_manager()
    assert local["normalize_path"] is local["merge_slashes"] is True


MESH_CONFIG_SCHEMA = ROOT / "tests" / "schemas" / "istio-meshconfig.json"
ENVOYFILTERS = ["edge-envoyfilter.yaml", "hooks-envoyfilter.yaml", "ratelimit-envoyfilter.yaml"]


def test_mesh_config_has_only_fields_istio_1_28_knows() -> None:
    # istiod ignores a misspelt field with a warning; the schema (from istio/api's proto)
    # refuses it here instead.
    schema = json.loads(MESH_CONFIG_SCHEMA.read_text())
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(mesh)
    misspelt = copy.deepcopy(mesh)
    misspelt["extensionProviders"][0]["envoyExtAuthzHttp"]["headersToUpstreamOnAllowed"] = ["x"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(misspelt)


def test_the_authorization_policy_exempts_no_path() -> None:
    policy = yaml.safe_load((ISTIO / "authorization-policy.yaml").read_text())
    # An exempt path would skip authz and keep the client's x-meshtoll-* headers; the
    # gateway's readiness is another listener (15021) and needs no exemption.
    assert policy["spec"]["rules"] == [{}]


def test_envoyfilters_are_ordered_by_priority_hooks_before_ratelimit() -> None:
    priorities = {}
    for name in ENVOYFILTERS:
        document = yaml.safe_load((ISTIO / name).read_text())
        jsonschema.validate(document["spec"], crd_schema("EnvoyFilter", "v1alpha3")["properties"]["spec"])
        priorities[document["metadata"]["name"]] = document["spec"]["priority"]
    assert priorities["meshtoll-hooks"] < priorities["meshtoll-ratelimit"]


@pytest.mark.parametrize("name", ENVOYFILTERS)
def test_envoyfilter_patches_are_envoy_messages_this_envoy_api_accepts(name: str) -> None:
    # The CRD schema takes any patch value (x-kubernetes-preserve-unknown-fields); Envoy's own
    # message types do not: a misspelt field or @type fails to parse.
    from envoy.config.listener.v3 import listener_components_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import json_format

    load_envoy_extensions()
    document = yaml.safe_load((ISTIO / name).read_text())
    for patch in document["spec"]["configPatches"]:
        value = patch["patch"]["value"]
        message: Any = (
            http_connection_manager_pb2.HttpFilter()
            if patch["applyTo"] == "HTTP_FILTER"
            else listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager")
        )
        json_format.ParseDict(value, message)
        with pytest.raises(json_format.ParseError):
            json_format.ParseDict({**value, "typo_field": 1}, type(message)())


def load_envoy_extensions() -> None:
    """Import the message types the patches name in `@type`, so that Any can resolve them."""
    import importlib

    for module in (
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
        "envoy.extensions.http.early_header_mutation.header_mutation.v3.header_mutation_pb2",
        "envoy.extensions.common.matching.v3.extension_matcher_pb2",
        "envoy.type.matcher.v3.http_inputs_pb2",
        "envoy.extensions.filters.http.composite.v3.composite_pb2",
        "envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2",
        "envoy.extensions.filters.http.ratelimit.v3.rate_limit_pb2",
        "envoy.extensions.access_loggers.filters.cel.v3.cel_pb2",
    ):
        importlib.import_module(module)
