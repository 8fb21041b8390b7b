"""Both of Envoy's access loggers feed the same meter through a real Envoy: the default
OpenTelemetry logger (the `full` listener) and the gRPC access log (`full_als`) bill the same
requests as the same records, refused requests are not billed, and Envoy drops nothing."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from meshtoll.storage import usage_store as opened_usage_store
from meshtoll.usage.records import UsageRecord
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

# Names of one length, so that both loggers see requests of the same size.
LOGGERS = {"otel": "listen_full_port", "grpc": "listen_full_als_port"}


def key_of(logger: str) -> str:
    return f"k-{logger}"


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    # One tenant per logger, so that each one's records are its own.
    tenants = ", ".join(
        f"via-{logger}: {{plan: pro, api_keys: [{{id: ci, sha256: {hashlib.sha256(key_of(logger).encode()).hexdigest()}}}]}}"
        for logger in LOGGERS
    )
    path: Path = tmp_path_factory.mktemp("loggers") / "policy.yaml"
    path.write_text(
        f"plans: {{pro: {{}}}}\ntenants: {{{tenants}}}\n"
        "routes: [{prefix: /v1/search, name: search, cost: 5}, {prefix: /v1/, name: v1}]\n"
    )
    return start_stack(path)


async def ledger_of(redis_url: str, tenant: str) -> list[UsageRecord]:
    async with opened_usage_store(redis_url) as store:
        return await store.ledger(tenant, 0, time.time() + 60)


def access_log_counters(stack: LocalStack) -> dict[str, int]:
    text = fetch(f"{stack.envoy_admin_url}/stats?filter=^access_logs").body.decode()
    return {name: int(value) for name, _, value in (line.partition(": ") for line in text.splitlines())}


def metered(stack: LocalStack, redis_url: str, logger: str, requests: int) -> list[UsageRecord]:
    headers = {"x-api-key": key_of(logger)}
    url = stack.url(LOGGERS[logger], "/v1/search?q=x")
    for _ in range(requests):
        assert fetch(url, headers=headers).status == 200
    assert fetch(url, method="POST", headers=headers, body=b'{"q": 1}').status == 200
    assert fetch(url, headers={"x-api-key": "nobody's"}).status == 401  # no tenant: not metered
    return eventually(
        lambda: asyncio.run(ledger_of(redis_url, f"via-{logger}")),
        lambda records: len(records) >= requests + 1,
        timeout=10,
        message=f"{logger}: {requests + 1} records in the ledger",
    )


def test_both_loggers_bill_every_admitted_request_once_with_the_same_fields(
    stack: LocalStack, redis_url: str
) -> None:
    records = {logger: metered(stack, redis_url, logger, 5) for logger in LOGGERS}
    for logger, found in records.items():
        assert len(found) == len({record.request_id for record in found}) == 6, logger
        assert {(r.tenant, r.plan, r.route, r.status, r.units) for r in found} == {
            (f"via-{logger}", "pro", "search", 200, 5)
        }
        assert all(abs(r.time - time.time()) < 30 and r.duration_ms >= 0 for r in found)

    def sizes(logger: str, method: str) -> tuple[set[int], int]:
        mine = [r for r in records[logger] if r.method == method]
        return {r.request_bytes for r in mine}, max(r.response_bytes for r in mine)

    # Requests of the same size measure the same through either logger; responses within a
    # few bytes (x-envoy-upstream-service-time, the milliseconds the upstream took).
    for method in ("GET", "POST"):
        (otel_in, otel_out), (grpc_in, grpc_out) = sizes("otel", method), sizes("grpc", method)
        assert otel_in == grpc_in
        assert len(otel_in) == 1
        assert min(otel_in) > 0
        assert abs(otel_out - grpc_out) <= 4
        assert otel_out > 0


def test_envoy_drops_no_entry_of_either_logger(stack: LocalStack, redis_url: str) -> None:
    metered(stack, redis_url, "otel", 2)
    counters = access_log_counters(stack)
    assert counters["access_logs.open_telemetry_access_log.logs_written"] > 0
    assert counters["access_logs.grpc_access_log.logs_written"] > 0
    assert counters["access_logs.open_telemetry_access_log.logs_dropped"] == 0
    assert counters["access_logs.grpc_access_log.logs_dropped"] == 0
