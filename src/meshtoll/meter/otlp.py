"""`opentelemetry.proto.collector.logs.v1.LogsService/Export`: Envoy's OpenTelemetry access
logger in, one meter line (meter/log_line.py) per logged request, settled against authz's
admissions like the gRPC access log's entries (meter/als.py). Each flush of Envoy's buffer
is one unary call, answered by `export_bytes` on meshtoll's own HTTP/2 server
(transport/h2_server.py, `meshtoll serve`'s gRPC port) on the call's bytes.

xds-protos ships the OTLP messages but no gRPC stub for them: the call's bytes are parsed
with the messages' own FromString. Its copy of the logs proto predates OTLP 1.0 and names
ResourceLogs' field 2 `instrumentation_library_logs` and that message's field 2 `logs`, where
OTLP now says `scope_logs` and `log_records`: same numbers, same wire format; the names are
looked up once, whichever copy is installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1 import logs_pb2

from meshtoll.errors import MalformedLine
from meshtoll.meter.log_line import parse_log_line
from meshtoll.meter.settle import Settlement
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode
from meshtoll.usage.records import Observation

LOGS_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"
EXPORT_METHOD = f"/{LOGS_SERVICE}/Export"  # its HTTP/2 :path
_EXPORTED: bytes = ExportLogsServiceResponse().SerializeToString()


class OtlpLogsReceiver:
    def __init__(self, settlement: Settlement) -> None:
        self._settlement = settlement
        scopes = logs_pb2.ResourceLogs.DESCRIPTOR.fields_by_number[2]
        self._scopes: str = scopes.name
        self._records: str = scopes.message_type.fields_by_number[2].name

    def export_bytes(self, request: bytes, context: CallContext) -> bytes | Awaitable[bytes]:
        """Export on the call's bytes: answered at once when no entry is to be settled."""
        try:
            message = ExportLogsServiceRequest.FromString(request)
        except DecodeError:
            # What grpcio answers when its own deserialiser fails.
            raise CallAborted(StatusCode.INTERNAL, "the request is not an ExportLogsServiceRequest") from None
        observations = self._observations(message)
        if not observations:
            return _EXPORTED
        return self._settled(observations)

    async def _settled(self, observations: list[Observation]) -> bytes:
        await self._settlement.settle(observations)
        return _EXPORTED

    def _observations(self, request: ExportLogsServiceRequest) -> list[Observation]:
        """The request's meter lines, its other entries counted by outcome."""
        observations: list[Observation] = []
        anonymous = malformed = 0
        for body in self.bodies(request):
            try:
                seen = parse_log_line(body)
            except MalformedLine:
                malformed += 1
                continue
            if seen is None:
                anonymous += 1
            else:
                observations.append(seen)
        outcomes = self._settlement.outcomes
        # Requests that never went through authz (no request id), or that authz refused
        # (no tenant, not failed by Envoy itself): not metered.
        outcomes["anonymous"] += anonymous
        # Not meter lines (another log format, or forged): dropped, never billed.
        outcomes["malformed"] += malformed
        return observations

    def bodies(self, request: ExportLogsServiceRequest) -> Iterator[str]:
        """The text body of every log record in the request ("" for a body of another kind)."""
        scopes, records = self._scopes, self._records
        for resource_logs in request.resource_logs:
            for scope_logs in getattr(resource_logs, scopes):
                for record in getattr(scope_logs, records):
                    yield record.body.string_value
