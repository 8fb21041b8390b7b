"""How traces and logs are switched on: tracing only when an OTLP endpoint is named (and not
disabled), a protocol other than OTLP's two refused with a clear error; JSON log lines one
object each, with the request and trace ids when the line is about a request."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.errors import ConfigError
from meshtoll.local.dev import EXAMPLE_POLICY
from meshtoll.server.services import build
from meshtoll.settings import Settings
from meshtoll.telemetry.logs import configure_logging
from meshtoll.telemetry.sampling import Gate, remote_sampled, sampling_from_environment
from meshtoll.telemetry.tracing import tracing_from_environment, tracing_protocol
from tests.otlp_receiver import otlp_receiver
from tests.serve import running_serve
from tests.waiting import eventually

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "gateway"},
        {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_unless_an_endpoint_is_named(environ: dict[str, str]) -> None:
    assert tracing_from_environment(environ) is None


@pytest.mark.parametrize(
    ("variable", "path"),
    [("OTEL_EXPORTER_OTLP_ENDPOINT", ""), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces")],
)
def test_tracing_is_on_with_an_endpoint(monkeypatch: pytest.MonkeyPatch, variable: str, path: str) -> None:
    with otlp_receiver() as receiver:
        # The exporter reads the process's environment itself.
        monkeypatch.setenv(variable, f"http://127.0.0.1:{receiver.port}{path}")
        tracing = tracing_from_environment()
        assert tracing is not None
        span = tracing.start("authz check", {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
        assert span is not None
        span.end()
        tracing.shutdown()  # exports what is buffered
        (received,) = receiver.received()
    assert (received.service, received.trace_id, received.parent_span_id) == ("meshtoll", "a" * 32, "b" * 16)


def test_a_protocol_otlp_does_not_have_is_refused() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not one of"):
        tracing_protocol({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert tracing_protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == "grpc"
    assert tracing_protocol({}) == "http/protobuf"


async def test_built_services_do_not_trace_without_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    services = await build(Settings(policy=EXAMPLE_POLICY))
    try:
        assert services.tracing is None
    finally:
        await services.close()


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("json", stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_are_one_object_per_line(json_lines: io.StringIO) -> None:
    log = logging.getLogger("meshtoll.authz")
    log.warning("refused\nfor two reasons", extra={"request_id": "r-1", "trace_id": "a" * 32})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = json_lines.getvalue().splitlines()
    event = json.loads(first)
    assert set(event) == {"time", "level", "event", "logger", "process", "request_id", "trace_id"}
    assert (event["level"], event["event"], event["logger"]) == (
        "warning",
        "refused\nfor two reasons",
        "meshtoll.authz",
    )
    assert (event["request_id"], event["trace_id"]) == ("r-1", "a" * 32)
    assert event["time"].endswith("Z")
    assert "ValueError: boom" in json.loads(second)["exception"]


def test_text_logs_stay_readable() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("text", stream)
        logging.getLogger("meshtoll").info("serving")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert stream.getvalue().rstrip().endswith("meshtoll INFO serving")


@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("log_format", "xml", "log_format: 'xml' is not one of text, json"),
        ("metrics_tenant_labels", "top:0", "metrics_tenant_labels: 'top:0': top:N needs N from 1 to 1000"),
    ],
)
def test_bad_observability_settings_are_refused(field: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings(**{field: raw})  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_logs_json_lines_with_log_format_json(tmp_path: Path, workers: str) -> None:
    with running_serve(tmp_path, "--log-format", "json", "--workers", workers) as serving:
        log_path = serving.child.log_path
        lines = eventually(
            lambda: log_path.read_text().splitlines(),
            lambda found: any("meshtoll serving on" in line for line in found),
            timeout=10,
            message="the started line in meshtoll's log",
        )
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {event["logger"] for event in events} >= {"meshtoll"}
    assert all(event["level"] in ("info", "warning", "error") for event in events)


SAMPLED = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


@pytest.mark.parametrize(
    ("traceparent", "sampled"),
    [
        (SAMPLED, True),
        (SAMPLED[:-2] + "00", False),
        (SAMPLED[:-2] + "03", True),  # another flag besides
        (SAMPLED.upper(), None),  # the W3C form is lower case
        ("ff" + SAMPLED[2:], None),  # version ff is invalid
        ("00-" + "0" * 32 + "-" + "b" * 16 + "-01", None),
        ("00-" + "a" * 32 + "-" + "0" * 16 + "-01", None),
        (SAMPLED + "-extra", None),
        ("00-zz", None),
        ("", None),
    ],
)
def test_a_traceparents_sampled_flag_is_read_only_from_a_well_formed_one(
    traceparent: str, sampled: bool | None
) -> None:
    assert remote_sampled(traceparent) is sampled


def test_the_gate_follows_a_parents_flag_and_samples_roots_by_ratio() -> None:
    draws = iter([0.004, 0.5, 0.0099])
    gate = Gate(0.01, draw=lambda: next(draws))
    assert gate.admits({"traceparent": SAMPLED}) is True
    assert gate.admits({"traceparent": SAMPLED[:-2] + "00"}) is False
    assert [gate.admits({}), gate.admits(None), gate.admits({"traceparent": "bad"})] == [True, False, True]


@pytest.mark.parametrize(
    ("environ", "ratio"),
    [
        ({}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}, 0.01),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, None),  # the SDK's alone
    ],
)
def test_the_sampler_variables_choose_the_gate(environ: dict[str, str], ratio: float | None) -> None:
    sampler, gate = sampling_from_environment(environ)
    assert (None if gate is None else gate.root_ratio) == ratio
    assert (sampler is None) == (gate is None)


@pytest.mark.parametrize("argument", ["2", "-0.1", "one percent"])
def test_a_ratio_that_is_not_one_is_refused(argument: str) -> None:
    environ = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": argument}
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        sampling_from_environment(environ)


@pytest.mark.integration
def test_serve_refuses_a_bad_sampling_ratio_before_any_worker_starts(tmp_path: Path) -> None:
    environ = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "5",
    }
    argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(EXAMPLE_POLICY), "--workers", "2"]
    done = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "OTEL_TRACES_SAMPLER_ARG='5' is not a sampling ratio from 0 to 1" in done.stderr
