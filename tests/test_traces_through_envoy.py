"""Traces through a real Envoy: meshtoll's span of each decision joins the trace of the
traceparent the client sent (OTLP to a local receiver, over HTTP or gRPC as OTEL_* say),
with what was decided as attributes; with Envoy tracing too, Envoy's spans and meshtoll's
are one trace. A traceparent decides nothing else, and a malformed one starts a new trace."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_grpc_receiver, otlp_receiver
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-traced"


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traced") / "policy.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(f"""
plans:
  metered: {{limits: [{{requests: 100000, per: minute}}]}}
tenants:
  traced: {{plan: metered, api_keys: [{{id: traced, sha256: {digest}}}]}}
routes:
  - {{prefix: /v1/, name: v1}}
""")
    return path


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as found:
        yield found


def exporting_to(port: int, protocol: str = "http/protobuf") -> tuple[tuple[str, str], ...]:
    return (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),  # milliseconds: spans leave at once, for the test
    )


@pytest.fixture(scope="module")
def traced(start_stack: StartStack, policy: Path, receiver: OtlpReceiver) -> LocalStack:
    """meshtoll traces; Envoy does not."""
    return start_stack(policy, meshtoll_environment=exporting_to(receiver.port))


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def spans_of(receiver: OtlpReceiver, trace_id: str, service: str, count: int = 1) -> list[ReceivedSpan]:
    return eventually(
        lambda: [
            span for span in receiver.received() if span.trace_id == trace_id and span.service == service
        ],
        lambda found: len(found) >= count,
        timeout=15,
        message=f"{count} span(s) of {service} in trace {trace_id}",
    )


@pytest.mark.parametrize("listener", ["listen_http_authz_port", "listen_grpc_authz_port"])
def test_the_authz_span_continues_the_clients_traceparent(
    traced: LocalStack, receiver: OtlpReceiver, listener: str
) -> None:
    header, trace_id, parent = traceparent()
    reply = fetch(traced.url(listener, "/v1/items"), headers={"x-api-key": KEY, "traceparent": header})
    assert reply.status == 200
    (span,) = spans_of(receiver, trace_id, "meshtoll")
    assert (span.name, span.parent_span_id) == ("authz check", parent)
    assert span.attributes["meshtoll.outcome"] == "allow"
    assert span.attributes["meshtoll.tenant"] == "traced"
    assert span.attributes["meshtoll.plan"] == "metered"
    assert span.attributes["meshtoll.route"] == "v1"
    assert span.attributes["meshtoll.request_id"]  # Envoy's x-request-id, to find the request's logs


def test_a_denials_span_says_why(traced: LocalStack, receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    reply = fetch(
        traced.url("listen_http_authz_port", "/v1/items"),
        headers={"x-api-key": "nope", "traceparent": header},
    )
    assert reply.status == 401
    (span,) = spans_of(receiver, trace_id, "meshtoll")
    assert span.attributes["meshtoll.outcome"] == "deny"
    assert span.attributes["meshtoll.reason"] == "invalid_api_key"
    assert "meshtoll.tenant" not in span.attributes


def test_a_traceparent_decides_nothing_and_a_malformed_one_starts_a_new_trace(
    traced: LocalStack, receiver: OtlpReceiver
) -> None:
    for header in ("00-zz-not-hex-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 300):
        reply = fetch(
            traced.url("listen_http_authz_port", "/v1/items"),
            headers={"x-api-key": "nope", "traceparent": header},
        )
        assert reply.status == 401
        assert reply.json()["error"] == "invalid_api_key"
    assert (
        fetch(
            traced.url("listen_http_authz_port", "/v1/items"),
            headers={"x-api-key": KEY, "traceparent": "bad"},
        ).status
        == 200
    )
    seen = {span.trace_id for span in receiver.received()}
    assert "0" * 32 not in seen  # the invalid all-zero trace id is never continued


def test_envoy_and_meshtoll_spans_are_one_trace(
    start_stack: StartStack, policy: Path, receiver: OtlpReceiver
) -> None:
    both = start_stack(policy, traces_port=receiver.port, meshtoll_environment=exporting_to(receiver.port))
    header, trace_id, _ = traceparent()
    reply = fetch(
        both.url("listen_http_authz_port", "/v1/items"), headers={"x-api-key": KEY, "traceparent": header}
    )
    assert reply.status == 200
    (authz,) = spans_of(receiver, trace_id, "meshtoll")
    envoy_spans = spans_of(receiver, trace_id, "envoy")
    # meshtoll's span is the child of the span Envoy made for its ext_authz call.
    assert authz.parent_span_id in {span.span_id for span in envoy_spans}


def test_spans_go_out_over_otlp_grpc_when_the_protocol_says_so(start_stack: StartStack, policy: Path) -> None:
    with otlp_grpc_receiver() as grpc_receiver:
        stack = start_stack(policy, meshtoll_environment=exporting_to(grpc_receiver.port, "grpc"))
        header, trace_id, parent = traceparent()
        reply = fetch(
            stack.url("listen_http_authz_port", "/v1/items"),
            headers={"x-api-key": KEY, "traceparent": header},
        )
        assert reply.status == 200
        (span,) = spans_of(grpc_receiver, trace_id, "meshtoll")
        assert span.parent_span_id == parent
        stack.close()  # before its collector goes: no export left retrying against a closed port


def test_a_call_whose_parent_was_not_sampled_gets_no_span(traced: LocalStack, receiver: OtlpReceiver) -> None:
    unsampled, unsampled_id, _ = traceparent()
    unsampled = unsampled[:-2] + "00"
    url = traced.url("listen_http_authz_port", "/v1/items")
    assert fetch(url, headers={"x-api-key": KEY, "traceparent": unsampled}).status == 200
    header, trace_id, _ = traceparent()
    assert fetch(url, headers={"x-api-key": KEY, "traceparent": header}).status == 200
    # Spans leave in the order they end: once the later call's is in, the earlier one's would be.
    spans_of(receiver, trace_id, "meshtoll")
    assert [span for span in receiver.received() if span.trace_id == unsampled_id] == []
