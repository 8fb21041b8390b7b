"""xds-protos and opentelemetry-proto install the same OTLP modules; the environments the
repository makes must hold opentelemetry-proto's, or tracing's exporters cannot import."""

from __future__ import annotations

import sys

from tests.otlp_protos import overwritten_otlp_files


def test_this_environment_holds_opentelemetry_protos_own_otlp_modules() -> None:
    assert overwritten_otlp_files(sys.executable) == []
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert InstrumentationScope.DESCRIPTOR.full_name == "opentelemetry.proto.common.v1.InstrumentationScope"
