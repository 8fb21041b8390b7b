"""The meter's adapter: Envoy's access-log entries in, usage records out, and a batch that
arrives twice over the gRPC stream counted once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshtoll.meter.als import AccessLogServicer, record_from_envoy
from meshtoll.policy import CompiledPolicy
from meshtoll.policy.reload import PolicyHolder
from meshtoll.storage.usage_redis import RedisUsageStore

START = 1_795_618_437  # 2026-11-25T10:53:57Z


@pytest.fixture
def policy(tmp_path: Path) -> CompiledPolicy:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "plans: {pro: {}}\n"
        "tenants: {acme: {plan: pro}}\n"
        "routes: [{prefix: /v1/search, name: search, cost: 5}, {prefix: /v1/, name: v1}]\n"
    )
    return PolicyHolder.from_file(path).current


def entry(
    request_id: str, *, headers: dict[str, str] | None = None, status: int = 200
) -> accesslog_pb2.HTTPAccessLogEntry:
    found = accesslog_pb2.HTTPAccessLogEntry()
    found.common_properties.start_time.FromSeconds(START)
    found.common_properties.start_time.nanos = 250_000_000
    found.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(12)
    found.request.request_id = request_id
    found.request.request_method = base_pb2.POST
    found.request.request_headers_bytes, found.request.request_body_bytes = 200, 40
    found.response.response_code.value = status
    found.response.response_headers_bytes, found.response.response_body_bytes = 90, 300
    found.request.request_headers.update(
        {"x-meshtoll-tenant": "acme", "x-meshtoll-route": "search", "x-meshtoll-plan": "pro"}
        if headers is None
        else headers
    )
    return found


def test_an_entry_becomes_a_record_with_every_field(policy: CompiledPolicy) -> None:
    record = record_from_envoy(entry("r1", headers=None), policy)
    assert record is not None
    assert (record.request_id, record.tenant, record.plan, record.route, record.method) == (
        "r1",
        "acme",
        "pro",
        "search",
        "POST",
    )
    assert (record.time, record.status, record.request_bytes, record.response_bytes) == (
        START + 0.25,
        200,
        240,
        390,
    )
    assert (record.duration_ms, record.units, record.status_class) == (12.0, 5, "2xx")


def test_a_refused_request_bills_nothing(policy: CompiledPolicy) -> None:
    record = record_from_envoy(entry("r2", status=429), policy)
    assert record is not None
    assert (record.units, record.status_class) == (0, "4xx")


def test_the_identity_comes_from_ext_authz_metadata_when_the_headers_are_absent(
    policy: CompiledPolicy,
) -> None:
    logged = entry("r3", headers={})
    authz = logged.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"]
    authz.update({"tenant": "acme", "consumer": "ci", "plan": "pro", "route": "v1"})
    record = record_from_envoy(logged, policy)
    assert record is not None
    assert (record.tenant, record.consumer, record.plan, record.route, record.units) == (
        "acme",
        "ci",
        "pro",
        "v1",
        1,
    )


def test_a_request_without_a_tenant_is_not_metered(policy: CompiledPolicy) -> None:
    assert record_from_envoy(entry("r4", headers={}), policy) is None


async def test_a_batch_sent_twice_over_the_access_log_stream_counts_once(
    redis_url: str, policy: CompiledPolicy
) -> None:
    tenant = f"als{time.monotonic_ns()}"
    headers = {"x-meshtoll-tenant": tenant, "x-meshtoll-route": "search"}
    batch = als_pb2.StreamAccessLogsMessage()
    batch.identifier.log_name = "meshtoll"
    batch.http_logs.log_entry.extend(entry(f"{tenant}-{n}", headers=headers) for n in range(5))

    async def messages(
        *sent: als_pb2.StreamAccessLogsMessage,
    ) -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for message in sent:
            yield message

    store = RedisUsageStore(redis_url)
    meter = AccessLogServicer(store, lambda: policy)
    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(meter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            await stub.StreamAccessLogs(messages(batch, batch))
            await stub.StreamAccessLogs(messages(batch))  # again on a new stream, as after a reconnect
        usage = await store.usage(tenant, "2026-11")
        assert (usage.requests, usage.units, meter.counted) == (5, 25, 5)
        assert len(await store.ledger(tenant, START, START + 1)) == 5
    finally:
        await server.stop(None)
        await store.close()
