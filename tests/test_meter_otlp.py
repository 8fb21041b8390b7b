"""The meter's OTLP logs receiver over a real gRPC server: Envoy's OpenTelemetry access log
in, settled against authz's admissions like the gRPC access log's entries; an export sent
twice bills once, and hostile records are counted and dropped without failing the call."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from meshtoll.meter.otlp import EXPORT_METHOD, LOGS_SERVICE, OtlpLogsReceiver
from meshtoll.meter.settle import Settlement
from meshtoll.transport.h2_server import CallAborted, CallContext, StatusCode, serve_grpc
from meshtoll.transport.http_listener import listening_socket
from meshtoll.usage.records import Admission
from meshtoll.usage.store import UsageStore

START = 1_795_618_437  # 2026-11-25T10:53:57Z
_tenants = itertools.count()

Export = Callable[[ExportLogsServiceRequest], Awaitable[ExportLogsServiceResponse]]


@pytest.fixture
def tenant() -> str:
    # The session's Redis is shared: each test meters its own tenant.
    return f"otlp{time.monotonic_ns()}x{next(_tenants)}"


def line(request_id: str, tenant: str, status: int = 200) -> str:
    return f"mt1 {START}.250 {status} 200 40 90 300 12000 {request_id} {tenant}"


def export_of(*bodies: str | int) -> ExportLogsServiceRequest:
    """One export as Envoy sends it: one resource, one scope, a record per body (an int
    body is not text: an AnyValue of another kind)."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    scope_logs = getattr(resource_logs, resource_logs.DESCRIPTOR.fields_by_number[2].name).add()
    records = getattr(scope_logs, scope_logs.DESCRIPTOR.fields_by_number[2].name)
    for body in bodies:
        record = records.add()
        record.time_unix_nano = START * 10**9
        if isinstance(body, int):
            record.body.int_value = body
        else:
            record.body.string_value = body
    return request


def admitted(tenant: str, request_id: str) -> Admission:
    return Admission(request_id, START, tenant, "ci", "pro", "search", "POST", 5, False)


class Clock:
    def __call__(self) -> float:
        return float(START)


@pytest.fixture
async def receiver(usage_store: UsageStore) -> AsyncIterator[tuple[Settlement, Export]]:
    """A grpcio client's Export calls to `export_bytes` on the h2c server, as serve serves it."""
    settlement = Settlement(usage_store, clock=Clock(), wait_seconds=0)
    sock = listening_socket("127.0.0.1", 0)
    async with (
        serve_grpc({EXPORT_METHOD: OtlpLogsReceiver(settlement).export_bytes}, sock),
        grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel,
    ):
        export = channel.unary_unary(
            f"/{LOGS_SERVICE}/Export",
            request_serializer=ExportLogsServiceRequest.SerializeToString,
            response_deserializer=ExportLogsServiceResponse.FromString,
        )
        yield settlement, export


async def test_an_export_sent_twice_bills_each_request_once(
    receiver: tuple[Settlement, Export], usage_store: UsageStore, tenant: str
) -> None:
    settlement, export = receiver
    await usage_store.admit([admitted(tenant, f"{tenant}-{n}") for n in range(5)])
    batch = export_of(*(line(f"{tenant}-{n}", tenant) for n in range(5)))
    await export(batch)
    await export(batch)  # Envoy retrying, or someone replaying it
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units) == (5, 25)
    # The second time their admissions are settled: nothing to settle, nothing billed.
    assert (settlement.outcomes["billed"], settlement.outcomes["unmatched"]) == (5, 5)
    (record,) = [
        r for r in await usage_store.ledger(tenant, START, START + 1) if r.request_id == f"{tenant}-0"
    ]
    assert (record.plan, record.route, record.status, record.request_bytes, record.duration_ms) == (
        "pro",
        "search",
        200,
        240,
        12.0,
    )


async def test_hostile_records_are_counted_and_dropped_and_the_rest_of_the_export_bills(
    receiver: tuple[Settlement, Export], usage_store: UsageStore, tenant: str
) -> None:
    settlement, export = receiver
    await usage_store.admit([admitted(tenant, f"{tenant}-ok")])
    hostile: list[str | int] = [
        "",
        7,  # not a text body
        "mt1 0 200 nan 0 0 0 0 r t",
        line(f"{tenant}-ok", tenant).replace(" 200 ", " 20O ", 1),
        "\x00" * 10_000,
        "mt1 " + "1 " * 20_000,
    ]
    await export(export_of(*hostile, line(f"{tenant}-ok", tenant), line("r-refused", "-", status=401)))
    assert settlement.outcomes["malformed"] == len(hostile)
    assert settlement.outcomes["anonymous"] == 1
    assert (await usage_store.usage(tenant, "2026-11")).requests == 1


async def test_a_well_formed_record_without_an_admission_bills_nothing(
    receiver: tuple[Settlement, Export], usage_store: UsageStore, tenant: str
) -> None:
    settlement, export = receiver
    await export(export_of(line(f"{tenant}-forged", tenant)))
    await settlement.retry_waiting()
    assert settlement.outcomes["unmatched"] == 1
    assert (await usage_store.usage(tenant, "2026-11")).requests == 0


async def test_an_export_on_bytes_without_meter_lines_is_answered_at_once_and_garbage_ends_internal(
    usage_store: UsageStore,
) -> None:
    settlement = Settlement(usage_store, clock=Clock(), wait_seconds=0)
    receiver = OtlpLogsReceiver(settlement)
    context = CallContext(())
    answer = receiver.export_bytes(export_of(line("r-refused", "-", status=401)).SerializeToString(), context)
    assert answer == ExportLogsServiceResponse().SerializeToString()
    assert settlement.outcomes["anonymous"] == 1
    with pytest.raises(CallAborted) as aborted:
        receiver.export_bytes(b"\x0a\xff", context)
    assert aborted.value.code == StatusCode.INTERNAL
