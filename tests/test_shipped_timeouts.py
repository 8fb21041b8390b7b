"""What users get: Envoy gives each call to meshtoll a quarter second (half a second over gRPC
ext_authz) in envoy/local.yaml and in everything `meshtoll render` makes. The tests give
their Envoy more (tests/envoy_harness.py); these pin the shipped values, so that raising
them for tests cannot hide a change to what users get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.render.files import TARGETS, rendered
from meshtoll.render.params import DeployParams
from tests.envoy_harness import deadlines_by_kind
from tests.test_envoy_harness import local_bootstrap

HTTP_AUTHZ = "ext_authz http_service.server_uri.timeout"
GRPC_AUTHZ = "ext_authz grpc_service.timeout"
RATELIMIT = "ratelimit timeout"
EXT_PROC = "ext_proc message_timeout"


def rendered_file(name: str) -> list[Any]:
    files = rendered(list(TARGETS), DeployParams())
    return list(yaml.safe_load_all(files[Path(name)]))


def test_the_local_stack_gives_each_call_to_meshtoll_a_quarter_second() -> None:
    assert deadlines_by_kind(local_bootstrap()) == {
        HTTP_AUTHZ: {"0.25s"},
        GRPC_AUTHZ: {"0.5s"},
        RATELIMIT: {"0.25s"},
        EXT_PROC: {"0.25s"},
    }


@pytest.mark.parametrize(
    "name", ["deploy/envoy/envoy.yaml", "deploy/k8s/overlays/gateway-sidecar/envoy.yaml"]
)
def test_the_rendered_envoy_bootstraps_keep_the_shipped_deadlines(name: str) -> None:
    assert deadlines_by_kind(*rendered_file(name)) == {
        HTTP_AUTHZ: {"0.25s"},
        GRPC_AUTHZ: {"0.5s"},
        EXT_PROC: {"0.25s"},
    }


def test_the_rendered_istio_files_keep_the_shipped_deadlines() -> None:
    assert deadlines_by_kind(*rendered_file("deploy/istio/hooks-envoyfilter.yaml")) == {EXT_PROC: {"0.25s"}}
    assert deadlines_by_kind(*rendered_file("deploy/istio/ratelimit-envoyfilter.yaml")) == {
        RATELIMIT: {"0.25s"}
    }
    # istiod builds the ext_authz filter from the providers' own timeout field.
    (mesh,) = rendered_file("deploy/istio/mesh-config.yaml")
    timeouts = {
        provider["name"]: body["timeout"]
        for provider in mesh["extensionProviders"]
        for kind, body in provider.items()
        if kind.startswith("envoyExtAuthz")
    }
    assert timeouts == {"meshtoll-http": "0.25s", "meshtoll-grpc": "0.5s"}
