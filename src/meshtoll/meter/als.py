"""`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's batched access log
stream in, one observation per logged request, settled against authz's admissions
(meter/settle.py). Off the request path: Envoy buffers entries and flushes them on its own
schedule."""

from __future__ import annotations

from collections.abc import AsyncIterator

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from meshtoll.meter.settle import Settlement
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode
from meshtoll.usage.records import Observation
from meshtoll.wire import AUTHZ_METADATA_NAMESPACE, TENANT_HEADER, TENANT_KEY, is_envoys_own_failure


class AccessLogServicer:
    def __init__(self, settlement: Settlement) -> None:
        self._settlement = settlement

    async def stream_access_logs(
        self, requests: AsyncIterator[bytes], context: CallContext
    ) -> AsyncIterator[bytes]:
        """StreamAccessLogs on meshtoll's own h2c server (transport/h2_server.py): the
        messages' bytes in, the empty response's bytes out once Envoy ends the stream."""
        parse = als_pb2.StreamAccessLogsMessage.FromString
        async for raw in requests:
            try:
                message = parse(raw)
            except DecodeError:
                raise CallAborted(StatusCode.INVALID_ARGUMENT, "not a StreamAccessLogsMessage") from None
            await self._settle(message)
        yield _EMPTY_RESPONSE

    async def _settle(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        entries = message.http_logs.log_entry
        observations = [seen for entry in entries if (seen := observation_from_envoy(entry)) is not None]
        # Requests that never went through authz (no request id), or that authz refused
        # (no tenant, not failed by Envoy itself): not metered.
        self._settlement.outcomes["anonymous"] += len(entries) - len(observations)
        if observations:
            await self._settlement.settle(observations)


_EMPTY_RESPONSE = als_pb2.StreamAccessLogsResponse().SerializeToString()


def observation_from_envoy(entry: accesslog_pb2.HTTPAccessLogEntry) -> Observation | None:
    """What one logged request says, with tenant "" when it names none but Envoy failed it
    itself (authz's allow may have come too late); None when it has no request id (it never
    went through authz), or no tenant and authz refused it.
    The meter runs this for every request: each protobuf field read costs a tenth of a
    microsecond, so every message is read once into a local and durations are computed
    from seconds and nanos (Duration.ToMicroseconds is pure Python)."""
    request = entry.request
    common = entry.common_properties
    request_id = request.request_id
    tenant = request.request_headers.get(TENANT_HEADER) or tenant_from_authz_metadata(common)
    if not request_id:
        return None
    response = entry.response
    status = response.response_code.value
    if not tenant and not is_envoys_own_failure(status):
        return None
    took = common.time_to_last_downstream_tx_byte
    return (
        request_id,
        tenant,
        status,
        request.request_headers_bytes + request.request_body_bytes,
        response.response_headers_bytes + response.response_body_bytes,
        took.seconds * 1000 + took.nanos / 1_000_000,
    )


def tenant_from_authz_metadata(common: accesslog_pb2.AccessLogCommon) -> str:
    """The tenant of the gRPC ext_authz allow's dynamic metadata: for setups that keep the
    x-meshtoll-* headers from the upstream (and so from the log)."""
    namespaces = common.metadata.filter_metadata
    if AUTHZ_METADATA_NAMESPACE not in namespaces:
        return ""
    fields = namespaces[AUTHZ_METADATA_NAMESPACE].fields
    return fields[TENANT_KEY].string_value if TENANT_KEY in fields else ""
