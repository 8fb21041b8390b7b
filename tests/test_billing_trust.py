"""Billing cannot be forged: through a real Envoy and Redis, nothing a client sends and
nothing that reaches meshtoll's gRPC port without being the gateway bills a tenant."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-trusted"
LEAVING_KEY = "k-leaving"
PRICE = "{currency: EUR, base_fee: '49.00', tiers: [{up_to: null, unit_price: '0.50'}]}"  # every unit priced


def policy_text(*, with_leaving: bool) -> str:
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    leaving = (
        f", leaving: {{plan: pro, api_keys: [{{id: ci, sha256: {key(LEAVING_KEY)}}}]}}"
        if with_leaving
        else ""
    )
    return (
        f"plans: {{pro: {{price: {PRICE}}}}}\n"
        f"tenants: {{payer: {{plan: pro, api_keys: [{{id: ci, sha256: {key(KEY)}}}]}}, victim: {{plan: pro}}{leaving}}}\n"
        "routes: [{prefix: /v1/, name: v1}]\n"
    )


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "policy.yaml"
    path.write_text(policy_text(with_leaving=True))
    return path


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, policy_path: Path) -> LocalStack:
    return start_stack(policy_path)


def usage_of(stack: LocalStack, tenant: str) -> dict[str, Any]:
    found: dict[str, Any] = fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/usage").json()
    return found


def metric(stack: LocalStack, sample: str) -> float:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_refused_requests_with_a_spoofed_tenant_header_bill_nobody(stack: LocalStack, redis_url: str) -> None:
    invented = f"invented{time.monotonic_ns()}"
    spoofed = {"x-meshtoll-tenant": "victim", "x-meshtoll-plan": "pro", "x-meshtoll-route": "v1"}
    for tenant in ("victim", invented):
        for _ in range(20):
            reply = fetch(
                stack.url("listen_full_port", "/v1/items"), headers=spoofed | {"x-meshtoll-tenant": tenant}
            )
            assert reply.status == 401
    # A paying request on the same listener: once it is billed, the refused ones had their
    # chance to be metered too (they were logged before it).
    before = usage_of(stack, "payer")["requests"]
    assert fetch(stack.url("listen_full_port", "/v1/items"), headers={"x-api-key": KEY}).status == 200
    eventually(
        lambda: usage_of(stack, "payer")["requests"],
        lambda requests: requests == before + 1,
        timeout=10,
        message="the paying request was not billed",
    )
    assert usage_of(stack, "victim")["requests"] == 0
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys(f"*{invented}*") == []  # an invented tenant leaves nothing behind
    finally:
        client.close()


def test_a_client_reusing_one_request_id_is_billed_for_every_request(stack: LocalStack) -> None:
    before = usage_of(stack, "payer")["requests"]
    headers = {"x-api-key": KEY, "x-request-id": "one-id-for-everything"}
    for _ in range(5):
        assert fetch(stack.url("listen_full_port", "/v1/items"), headers=headers).status == 200
    eventually(
        lambda: usage_of(stack, "payer")["requests"],
        lambda requests: requests == before + 5,
        timeout=10,
        message="the five requests sharing one request id were not all billed",
    )


def forged_entry(tenant: str, request_id: str) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.start_time.FromSeconds(int(time.time()))
    entry.request.request_id = request_id
    entry.request.request_method = base_pb2.GET
    entry.request.request_headers.update({"x-meshtoll-tenant": tenant, "x-meshtoll-route": "v1"})
    entry.response.response_code.value = 200
    entry.common_properties.metadata.filter_metadata["meshtoll"].update({"units": 1e9})
    return entry


async def send_forged(port: int, tenant: str, count: int) -> None:
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "meshtoll"
    message.http_logs.log_entry.extend(
        forged_entry(tenant, f"forged-{n}-{time.time_ns()}") for n in range(count)
    )

    async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(messages())


def test_access_log_records_sent_straight_to_the_grpc_port_bill_nothing(stack: LocalStack) -> None:
    invoice_url = f"{stack.meshtoll_admin_url}/api/tenants/victim/invoice"
    before = fetch(invoice_url).json()
    unmatched = metric(stack, 'meshtoll_meter_records_total{outcome="unmatched"}')
    asyncio.run(send_forged(stack.ports.envoy.authz_grpc_port, "victim", 3))
    # Each forged record waits for an admission that never comes, then is dropped, counted.
    eventually(
        lambda: metric(stack, 'meshtoll_meter_records_total{outcome="unmatched"}'),
        lambda counted: counted >= unmatched + 3,
        timeout=10,
        message="the three forged records were not counted as unmatched",
    )
    after = fetch(invoice_url).json()
    assert (after["total"], usage_of(stack, "victim")["units"]) == (before["total"], 0)
    assert after["total"] == "49.00"


def test_the_reconciliation_backlog_and_waiting_entries_are_metrics(stack: LocalStack) -> None:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    assert re.search(r"^meshtoll_reconcile_backlog \d+", text, re.MULTILINE)
    assert re.search(r"^meshtoll_meter_waiting_records \d+", text, re.MULTILINE)


# Last in the module: it rewrites the policy the stack serves.
def test_a_tenant_removed_from_the_policy_keeps_its_usage_and_invoice(
    stack: LocalStack, policy_path: Path
) -> None:
    for _ in range(3):
        assert (
            fetch(stack.url("listen_full_port", "/v1/items"), headers={"x-api-key": LEAVING_KEY}).status
            == 200
        )
    eventually(
        lambda: usage_of(stack, "leaving")["requests"],
        lambda requests: requests == 3,
        timeout=10,
        message="the leaving tenant's three requests were not billed",
    )
    version = fetch(f"{stack.meshtoll_admin_url}/api/policy").json()["version"]
    policy_path.write_text(policy_text(with_leaving=False))
    eventually(
        lambda: fetch(f"{stack.meshtoll_admin_url}/api/policy").json()["version"],
        lambda active: active > version,
        timeout=10,
        message="the policy without the leaving tenant never became active",
    )
    assert fetch(stack.url("listen_full_port", "/v1/items"), headers={"x-api-key": LEAVING_KEY}).status == 401
    assert usage_of(stack, "leaving")["requests"] == 3
    bill = fetch(f"{stack.meshtoll_admin_url}/api/tenants/leaving/invoice").json()
    assert (bill["tenant"], bill["total"]) == ("leaving", "50.50")  # the base fee and 3 units at 0.50
    nobody = fetch(f"{stack.meshtoll_admin_url}/api/tenants/nobody-ever/invoice")
    assert (nobody.status, nobody.json()["error"]) == (404, "unknown_tenant")
