"""Traces: a span per decision (authz check, rate-limit call, ext_proc stream, meter batch),
continuing the W3C trace context the caller sent, exported over OTLP as the standard
OpenTelemetry variables say.

Off unless an OTLP endpoint is named (OTEL_EXPORTER_OTLP_ENDPOINT or ..._TRACES_ENDPOINT),
and off when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: then nothing is built and
the request path pays one `is None` check. On, the SDK reads the rest of the variables
itself: OTEL_TRACES_SAMPLER and its argument (default: follow the parent, sample every
root), OTEL_SERVICE_NAME (default here: meshtoll), OTEL_RESOURCE_ATTRIBUTES, the exporter's
headers, timeout, certificates and compression, the batch processor's delays and sizes.

A traceparent is the caller's text and decides nothing but which trace a span joins; a
malformed one starts a new trace. With a parent-based sampler a client that sends a sampled
traceparent has its requests traced: an operator who will not have that samples by ratio
alone (OTEL_TRACES_SAMPLER=traceidratio).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshtoll.errors import ConfigError
from meshtoll.telemetry.sampling import Gate, sampling_from_environment

PROTOCOLS = ("http/protobuf", "grpc")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The tracer of this process: `start` a span for a decision, and `end_span` it with
    what was decided. `gate`: decides first which decisions get a span at all
    (telemetry/sampling.py); None: the SDK's sampler decides each."""

    def __init__(self, provider: TracerProvider, gate: Gate | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("meshtoll")
        self._gate = gate

    def start(self, name: str, carrier: Mapping[str, str] | None = None) -> Span | None:
        """A server span named `name`, the child of the trace context in `carrier` (headers
        or gRPC metadata, names in lower case), or a new trace's root; None when the
        decision is not to be traced."""
        if self._gate is not None and not self._gate.admits(carrier):
            return None
        context = None if not carrier else _PROPAGATOR.extract(carrier)
        return self._tracer.start_span(name, context=context, kind=SpanKind.SERVER)

    def shutdown(self) -> None:
        """Export what is still buffered; a stopping process's last spans are not dropped."""
        self.provider.shutdown()


def trace_carrier(context: Any, headers: Mapping[str, str]) -> Mapping[str, str]:
    """Where a gRPC call's trace context is: the call's metadata when the caller put one
    there (Envoy does, when it traces), else `headers` (the request Envoy asks about)."""
    metadata = dict(context.invocation_metadata() or ())
    return metadata if "traceparent" in metadata else headers


def end_span(span: Span, attributes: Mapping[str, Any]) -> None:
    """Set what was decided (only on a span the sampler records) and end it."""
    if span.is_recording():
        span.set_attributes({key: value for key, value in attributes.items() if value != ""})
    span.end()


def tracing_from_environment(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """The process's tracing as the OTEL_* variables configure it, or None (off)."""
    if not any(environ.get(name) for name in _ENDPOINTS):
        return None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or "meshtoll"})
    sampler, gate = sampling_from_environment(environ)
    provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
    return Tracing(provider, gate)


def tracing_protocol(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP protocol the variables name (http/protobuf by default); ConfigError for
    another, so that `meshtoll serve` refuses it before any worker starts."""
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip() or "http/protobuf"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return protocol


def _exporter(environ: Mapping[str, str]) -> SpanExporter:
    if tracing_protocol(environ) == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
    except ImportError:  # not installed on Python 3.14+ (pyproject.toml says why)
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; use http/protobuf"
        ) from None
    return GrpcSpanExporter()
