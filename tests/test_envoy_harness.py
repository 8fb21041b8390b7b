"""tests/envoy_harness.py: every Envoy a test starts gives meshtoll more time per call than
the shipped configuration, changes nothing else, and fails loudly when the configuration no
longer has a deadline where the harness expects one."""

from __future__ import annotations

import ast
import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtoll.local.envoy_config import EnvoyPorts, MtlsFiles, render_bootstrap
from tests.client import fetch
from tests.conftest import StartStack
from tests.envoy_harness import (
    TEST_CALL_TIMEOUT,
    UnexpectedEnvoyConfig,
    call_deadlines,
    deadlines_by_kind,
    with_test_timeouts,
)

TESTS = Path(__file__).parent
PORTS = EnvoyPorts(*range(20000, 20000 + len(fields(EnvoyPorts))))
MTLS = MtlsFiles(Path("ca.pem"), Path("server.pem"), Path("server-key.pem"))


def local_bootstrap() -> dict[str, Any]:
    """envoy/local.yaml as `meshtoll dev` and the benchmark run it, the mTLS listeners
    included; read back from its text, so that no two listeners share a filter's dict."""
    found: dict[str, Any] = yaml.safe_load(render_bootstrap(PORTS, MTLS))
    return found


def test_the_test_harness_raises_every_deadline_and_changes_nothing_else() -> None:
    bootstrap = local_bootstrap()
    untouched = copy.deepcopy(bootstrap)
    raised = with_test_timeouts(bootstrap)
    assert bootstrap == untouched  # a copy: the document given stays as it was
    assert set(deadlines_by_kind(raised)) == set(deadlines_by_kind(bootstrap))
    assert {value for values in deadlines_by_kind(raised).values() for value in values} == {TEST_CALL_TIMEOUT}
    for before, after in zip(call_deadlines(bootstrap), call_deadlines(raised), strict=True):
        after.replace(before.value)
    assert raised == bootstrap


def http_filters(bootstrap: dict[str, Any], listener: str) -> dict[str, dict[str, Any]]:
    """The listener's HTTP filters by name."""
    (found,) = [item for item in bootstrap["static_resources"]["listeners"] if item["name"] == listener]
    manager = found["filter_chains"][0]["filters"][0]["typed_config"]
    return {item["name"]: item for item in manager["http_filters"]}


def test_a_renamed_deadline_field_fails_the_harness_loudly() -> None:
    bootstrap = local_bootstrap()
    authz = http_filters(bootstrap, "full")["envoy.filters.http.ext_authz"]
    server_uri = authz["typed_config"]["http_service"]["server_uri"]
    server_uri["timeout_ms"] = server_uri.pop("timeout")
    with pytest.raises(
        UnexpectedEnvoyConfig, match=r"listeners\[full\].*ext_authz has no http_service.server_uri.timeout"
    ):
        with_test_timeouts(bootstrap)


def test_a_hook_without_its_message_timeout_fails_the_harness_loudly() -> None:
    bootstrap = local_bootstrap()
    hooks = http_filters(bootstrap, "full")["meshtoll.hooks"]
    actions = hooks["typed_config"]["xds_matcher"]["matcher_tree"]["exact_match_map"]["map"]
    del actions["open"]["action"]["typed_config"]["typed_config"]["typed_config"]["message_timeout"]
    with pytest.raises(
        UnexpectedEnvoyConfig,
        match=r"http_filters\[meshtoll.hooks\].*\.open\..*ext_proc has no deadline for its call at message_timeout",
    ):
        with_test_timeouts(bootstrap)


def test_a_filter_of_another_type_than_expected_fails_the_harness_loudly() -> None:
    bootstrap = local_bootstrap()
    config = http_filters(bootstrap, "full")["envoy.filters.http.ext_authz"]["typed_config"]
    config["@type"] = config["@type"].replace(".v3.", ".v4.")
    with pytest.raises(
        UnexpectedEnvoyConfig, match=r"ext_authz has @type .*v4.ExtAuthz', expected .*v3.ExtAuthz"
    ):
        with_test_timeouts(bootstrap)


def test_a_bootstrap_without_any_call_to_meshtoll_fails_the_harness_loudly() -> None:
    bootstrap = local_bootstrap()
    bootstrap["static_resources"]["listeners"] = [
        listener for listener in bootstrap["static_resources"]["listeners"] if listener["name"] == "direct"
    ]
    with pytest.raises(UnexpectedEnvoyConfig, match="no filter calls meshtoll here"):
        with_test_timeouts(bootstrap)


def test_no_test_starts_an_envoy_but_through_the_harness() -> None:
    # tests/envoy_harness.py is the one place that starts the local stack or an Envoy:
    # anywhere else, a test would run with the shipped deadlines without saying so.
    starters = {"LocalStack", "EnvoyProcess"}
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "envoy_harness.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if called in starters:
                    found.append(f"{path.name}:{node.lineno} {called}(...)")
    assert found == [], "start it with tests/envoy_harness.py's local_stack or envoy_process"


def running_deadlines(admin_url: str) -> set[str]:
    """Every deadline of a call to meshtoll in the configuration a running Envoy reports."""
    dump = fetch(f"{admin_url}/config_dump?resource=static_listeners").json()
    return {deadline.value for deadline in call_deadlines(dump)}


@pytest.mark.integration
def test_the_stacks_tests_start_run_envoy_with_test_timeouts_unless_asked(start_stack: StartStack) -> None:
    assert running_deadlines(start_stack(None).envoy_admin_url) == {TEST_CALL_TIMEOUT}
    # Envoy writes durations back with milliseconds.
    shipped_stack = start_stack(None, shipped_timeouts=True)
    assert running_deadlines(shipped_stack.envoy_admin_url) == {"0.250s", "0.500s"}
