"""`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's batched access log
stream in, one usage record per metered request into the usage store. Off the request path:
Envoy buffers entries and flushes them on its own schedule."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshtoll.authz.verdict import (
    AUTHZ_METADATA_NAMESPACE,
    CONSUMER_HEADER,
    CONSUMER_KEY,
    PLAN_HEADER,
    PLAN_KEY,
    ROUTE_HEADER,
    ROUTE_KEY,
    TENANT_HEADER,
    TENANT_KEY,
)
from meshtoll.errors import StorageUnavailable
from meshtoll.extproc.hooks import METADATA_NAMESPACE, UNITS_KEY
from meshtoll.meter.records import UsageRecord
from meshtoll.policy import CompiledPolicy
from meshtoll.storage.usage import UsageStore

log = logging.getLogger("meshtoll.meter")

# Headers the access logger must be told to log (additional_request_headers_to_log).
LOGGED_HEADERS = (TENANT_HEADER, CONSUMER_HEADER, PLAN_HEADER, ROUTE_HEADER)
# By enum number: RequestMethod.Name() costs ten times a tuple index, per record.
_METHOD_NAMES = tuple(
    base_pb2.RequestMethod.Name(number) for number in range(max(base_pb2.RequestMethod.values()) + 1)
)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, store: UsageStore, policy: Callable[[], CompiledPolicy]) -> None:
        self._store = store
        self._policy = policy
        self.counted = 0
        self.dropped = 0

    async def StreamAccessLogs(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in requests:
            policy = self._policy()
            records = [
                record
                for entry in message.http_logs.log_entry
                if (record := record_from_envoy(entry, policy)) is not None
            ]
            if not records:
                continue
            try:
                self.counted += await self._store.record(records)
            except StorageUnavailable as exc:
                # The stream is best effort by design; authz admissions fill the gap.
                self.dropped += len(records)
                log.error("usage batch of %d records not stored: %s", len(records), exc)
        return als_pb2.StreamAccessLogsResponse()


def record_from_envoy(entry: accesslog_pb2.HTTPAccessLogEntry, policy: CompiledPolicy) -> UsageRecord | None:
    """The usage record of one logged request; None when no tenant was established (a
    request authz refused is not metered).
    The meter runs this for every request: each protobuf field read costs a tenth of a
    microsecond, so every message is read once into a local and durations are computed
    from seconds and nanos (Duration.ToMicroseconds is pure Python)."""
    request = entry.request
    headers = request.request_headers
    common = entry.common_properties
    tenant = headers.get(TENANT_HEADER)
    if tenant:
        consumer, plan = headers.get(CONSUMER_HEADER, ""), headers.get(PLAN_HEADER, "")
        route = headers.get(ROUTE_HEADER, "")
    else:
        identity = identity_from_authz_metadata(common)
        if identity is None:
            return None
        tenant, consumer, plan, route = identity
    response = entry.response
    status = response.response_code.value
    start = common.start_time
    took = common.time_to_last_downstream_tx_byte
    method = request.request_method
    return UsageRecord(
        request.request_id,
        start.seconds + start.nanos // 1_000_000 / 1000,
        tenant,
        consumer,
        plan,
        route,
        _METHOD_NAMES[method] if 0 < method < len(_METHOD_NAMES) else "",
        status,
        request.request_headers_bytes + request.request_body_bytes,
        response.response_headers_bytes + response.response_body_bytes,
        took.seconds * 1000 + took.nanos / 1_000_000,
        billable_units(policy, route, status, _reported_units(common)),
    )


def identity_from_authz_metadata(common: accesslog_pb2.AccessLogCommon) -> tuple[str, str, str, str] | None:
    """Tenant, consumer, plan and route from the gRPC ext_authz allow's dynamic metadata: for
    setups that keep the x-meshtoll-* headers from the upstream (and so from the log)."""
    namespaces = common.metadata.filter_metadata
    if AUTHZ_METADATA_NAMESPACE not in namespaces:
        return None
    fields = namespaces[AUTHZ_METADATA_NAMESPACE].fields
    tenant = fields[TENANT_KEY].string_value if TENANT_KEY in fields else ""
    if not tenant:
        return None
    consumer, plan, route = (
        fields[key].string_value if key in fields else "" for key in (CONSUMER_KEY, PLAN_KEY, ROUTE_KEY)
    )
    return tenant, consumer, plan, route


def billable_units(policy: CompiledPolicy, route: str, status: int, reported: int | None = None) -> int:
    """For a request that succeeded, the units a body hook reported, else the route's cost;
    refused and failed requests bill 0."""
    if not 200 <= status < 400:
        return 0
    if reported is not None:
        return reported
    found = policy.route_costs.get(route)
    return 1 if found is None else found


def _reported_units(common: accesslog_pb2.AccessLogCommon) -> int | None:
    """The units the ext_proc hook put into the request's dynamic metadata, if any."""
    filter_metadata = common.metadata.filter_metadata
    if METADATA_NAMESPACE not in filter_metadata:
        return None
    value = filter_metadata[METADATA_NAMESPACE].fields.get(UNITS_KEY)
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    return max(0, int(value.number_value))
