"""The meter's adapter and settlement: Envoy's access-log entries in, settled against authz's
admissions; an entry with no admission bills nothing, whatever it claims, and a batch that
arrives twice over the gRPC stream counts once."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshtoll.errors import StorageUnavailable
from meshtoll.meter.als import AccessLogServicer, observation_from_envoy
from meshtoll.meter.settle import Settlement
from meshtoll.storage import MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.transport.h2_server import serve_grpc
from meshtoll.transport.http_listener import listening_socket
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.records import Admission, Observation, ReportedUnits, UsageRecord
from meshtoll.usage.store import PendingAdmissions, UsageStore

START = 1_795_618_437  # 2026-11-25T10:53:57Z
_tenants = itertools.count()


@pytest.fixture
def tenant() -> str:
    # The session's Redis is shared: each test meters its own tenant.
    return f"metered{time.monotonic_ns()}x{next(_tenants)}"


class Clock:
    def __init__(self) -> None:
        self.now = float(START)

    def __call__(self) -> float:
        return self.now


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


def admitted(tenant: str, request_id: str, *, units: int = 5, awaits_report: bool = False) -> Admission:
    return Admission(request_id, START, tenant, "ci", "pro", "search", "POST", units, awaits_report)


def test_an_entry_becomes_an_observation_with_every_field() -> None:
    seen = observation_from_envoy(entry("r1"))
    assert seen is not None
    # (request id, tenant, status, request bytes, response bytes, duration ms)
    assert seen == ("r1", "acme", 200, 240, 390, 12.0)


@pytest.mark.parametrize(
    ("status", "reported", "units"), [(200, None, 5), (302, 9, 9), (404, 9, 0), (503, None, 0)]
)
def test_a_settled_record_is_the_one_usage_record_would_build_field_for_field(
    status: int, reported: int | None, units: int
) -> None:
    # settled_by sets each field itself, not through UsageRecord's __init__: a field it
    # leaves unset would make the two differ (or raise on comparison).
    record = admitted("t1", "r1").settled_by(("r1", "t1", status, 120, 3400, 7.5), reported)
    assert record == UsageRecord(
        "r1", START, "t1", "ci", "pro", "search", "POST", status, 120, 3400, 7.5, units
    )


def test_the_tenant_comes_from_ext_authz_metadata_when_the_headers_are_absent() -> None:
    logged = entry("r3", headers={})
    authz = logged.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"]
    authz.update({"tenant": "acme"})
    seen = observation_from_envoy(logged)
    assert seen is not None
    assert seen[1] == "acme"


def test_a_request_envoy_failed_itself_is_observed_by_its_request_id_and_a_refused_one_is_not() -> None:
    for status in (503, 0):  # Envoy's status_on_error; the client left first
        seen = observation_from_envoy(entry("r4", headers={}, status=status))
        assert seen is not None
        assert seen[:3] == ("r4", "", status)
    assert observation_from_envoy(entry("r4", headers={}, status=401)) is None  # authz refused it
    assert observation_from_envoy(entry("")) is None


async def test_an_entry_bills_with_the_admissions_identity_not_the_logs(
    usage_store: UsageStore, tenant: str
) -> None:
    await usage_store.admit([admitted(tenant, "r1")])
    settlement = Settlement(usage_store, clock=Clock())
    claims = {"x-meshtoll-tenant": tenant, "x-meshtoll-route": "cheap", "x-meshtoll-plan": "free"}
    forged_units = entry("r1", headers=claims)
    forged_units.common_properties.metadata.filter_metadata["meshtoll"].update({"units": 1e9})
    seen = observation_from_envoy(forged_units)
    assert seen is not None
    await settlement.settle([seen])
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled) == (1, 5, 0)
    assert [(route.route, route.units) for route in usage.by_route] == [("search", 5)]
    assert usage.by_plan == {"pro": 1}
    assert settlement.outcomes["billed"] == 1


async def test_a_forged_entry_without_an_admission_bills_nothing(
    usage_store: UsageStore, tenant: str
) -> None:
    clock = Clock()
    settlement = Settlement(usage_store, clock=clock, wait_seconds=5)
    forged = [
        observation_from_envoy(entry(f"forged{n}", headers={"x-meshtoll-tenant": tenant})) for n in range(3)
    ]
    await settlement.settle([seen for seen in forged if seen is not None])
    assert settlement.waiting == 3  # its admission may still be on its way
    clock.now += 6
    await settlement.retry_waiting()
    assert (settlement.waiting, settlement.outcomes["unmatched"], settlement.outcomes["billed"]) == (0, 3, 0)
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units) == (0, 0)
    assert tenant not in await usage_store.tenants()
    assert not await usage_store.has_usage(tenant)


async def test_an_entry_that_comes_before_its_admission_waits_for_it(
    usage_store: UsageStore, tenant: str
) -> None:
    settlement = Settlement(usage_store, clock=Clock())
    seen = observation_from_envoy(entry("early", headers={"x-meshtoll-tenant": tenant}))
    assert seen is not None
    await settlement.settle([seen])
    await usage_store.admit([admitted(tenant, "early")])
    await settlement.retry_waiting()
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled, settlement.waiting) == (1, 5, 0, 0)
    assert tenant in await usage_store.tenants()
    assert await usage_store.has_usage(tenant)


async def test_a_body_metered_entry_waits_for_the_units_ext_proc_reports(
    usage_store: UsageStore, tenant: str
) -> None:
    await usage_store.admit([admitted(tenant, "chat", awaits_report=True)])
    settlement = Settlement(usage_store, clock=Clock())
    seen = observation_from_envoy(entry("chat", headers={"x-meshtoll-tenant": tenant}))
    assert seen is not None
    await settlement.settle([seen])
    assert settlement.waiting == 1
    await usage_store.report_units([ReportedUnits(tenant, "chat", 4321)])
    await settlement.retry_waiting()
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, settlement.waiting) == (1, 4321, 0)


async def test_a_refused_or_failed_request_bills_no_units(usage_store: UsageStore, tenant: str) -> None:
    await usage_store.admit([admitted(tenant, "r429"), admitted(tenant, "r503")])
    settlement = Settlement(usage_store, clock=Clock())
    seen = [
        observation_from_envoy(entry(request_id, headers={"x-meshtoll-tenant": tenant}, status=status))
        for request_id, status in (("r429", 429), ("r503", 503))
    ]
    await settlement.settle([s for s in seen if s is not None])
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.by_status) == (2, 0, {"4xx": 1, "5xx": 1})


async def test_a_batch_sent_twice_over_the_access_log_stream_counts_once(
    usage_store: UsageStore, tenant: str
) -> None:
    """Through `stream_access_logs` on the h2c server (transport/h2_server.py), as serve's
    gRPC port serves it; a message that is not one ends the stream INVALID_ARGUMENT."""
    headers = {"x-meshtoll-tenant": tenant}
    await usage_store.admit([admitted(tenant, f"{tenant}-{n}") for n in range(5)])
    batch = als_pb2.StreamAccessLogsMessage()
    batch.identifier.log_name = "meshtoll"
    batch.http_logs.log_entry.extend(entry(f"{tenant}-{n}", headers=headers) for n in range(5))
    settlement = Settlement(usage_store, clock=Clock())
    sock = listening_socket("127.0.0.1", 0)
    path = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
    listener = serve_grpc({}, sock, streams={path: AccessLogServicer(settlement).stream_access_logs})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            assert await stub.StreamAccessLogs(sent(batch, batch)) == als_pb2.StreamAccessLogsResponse()
            await stub.StreamAccessLogs(sent(batch))  # again on a new stream, as after a reconnect
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.stream_unary(path)(sent(b"\xff not a message"))
        usage = await usage_store.usage(tenant, "2026-11")
        assert (usage.requests, usage.units, settlement.outcomes["billed"]) == (5, 25, 5)
        assert len(await usage_store.ledger(tenant, START, START + 1)) == 5
        assert (refused.value.code(), refused.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a StreamAccessLogsMessage",
        )
    finally:
        listener.close()
        await listener.wait_closed()


async def sent(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def test_an_entry_cannot_move_its_request_to_another_period(
    usage_store: UsageStore, tenant: str
) -> None:
    await usage_store.admit([admitted(tenant, "known-id")])
    settlement = Settlement(usage_store, clock=Clock())
    moved = entry("known-id", headers={"x-meshtoll-tenant": tenant})
    moved.common_properties.start_time.FromSeconds(1_579_046_400)  # 2020-01-15
    seen = observation_from_envoy(moved)
    assert seen is not None
    await settlement.settle([seen])
    assert (await usage_store.usage(tenant, "2020-01")).requests == 0
    assert (await usage_store.usage(tenant, "2026-11")).requests == 1  # authz admitted it then


async def test_an_entry_without_a_tenant_settles_the_admission_of_its_request_id_and_a_503_bills_nothing(
    usage_store: UsageStore, tenant: str
) -> None:
    # authz admitted the request, but its allow reached Envoy after the ext_authz timeout:
    # Envoy answered 503 itself and logged the request without authz's tenant header.
    clock = Clock()
    settlement = Settlement(usage_store, clock=clock)
    seen = observation_from_envoy(entry(f"{tenant}-late", headers={}, status=503))
    assert seen is not None
    await settlement.settle([seen])
    assert settlement.waiting == 1  # its admission is still in authz's buffer
    await usage_store.admit([admitted(tenant, f"{tenant}-late")])
    await settlement.retry_waiting()
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled, usage.by_status) == (1, 0, 0, {"5xx": 1})
    assert [(route.route, route.units) for route in usage.by_route] == [("search", 0)]
    assert (settlement.outcomes["resolved"], settlement.outcomes["billed"], settlement.waiting) == (1, 1, 0)
    assert not [a for a in await usage_store.overdue(time.time() + 3600) if a.tenant == tenant]


async def test_an_entry_without_a_tenant_whose_request_id_names_no_admission_stays_anonymous(
    usage_store: UsageStore, tenant: str
) -> None:
    clock = Clock()
    settlement = Settlement(usage_store, clock=clock, wait_seconds=5)
    await usage_store.admit([admitted(tenant, f"{tenant}-admitted")])
    unknown = observation_from_envoy(entry(f"{tenant}-unknown", headers={}, status=503))
    assert unknown is not None
    await settlement.settle([unknown])
    assert settlement.waiting == 1  # a 503 may be a late allow whose admission is on its way
    clock.now += 6
    await settlement.retry_waiting()
    outcomes = settlement.outcomes
    assert (outcomes["anonymous"], outcomes["resolved"], settlement.waiting) == (1, 0, 0)
    assert (await usage_store.usage(tenant, "2026-11")).requests == 0
    assert not await usage_store.has_usage(tenant)
    assert [a.request_id for a in await usage_store.overdue(time.time() + 3600) if a.tenant == tenant] == [
        f"{tenant}-admitted"
    ]


class FlakyStore(MemoryUsageStore):
    """A store whose first lookup of pending admissions fails, as in a Redis outage."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def pending(self, requests: Sequence[tuple[str, str]]) -> PendingAdmissions:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("Redis is away")
        return await super().pending(requests)


async def test_entries_wait_anew_after_the_store_was_unavailable(tenant: str) -> None:
    store, clock = FlakyStore(), Clock()
    settlement = Settlement(store, clock=clock, wait_seconds=5)
    seen = observation_from_envoy(entry("r1", headers={"x-meshtoll-tenant": tenant}))
    assert seen is not None
    clock.now += 4
    await settlement.settle([seen])  # the store fails: the entry waits
    clock.now += 4  # past the first give-up time, within a wait that started at the failure
    await store.admit([admitted(tenant, "r1")])
    await settlement.retry_waiting()
    assert (settlement.outcomes["billed"], settlement.outcomes["unmatched"]) == (1, 0)


class RecordFailsOnce(MemoryUsageStore):
    """A store whose first record call fails, as in a Redis outage."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def record(self, records: Sequence[UsageRecord]) -> int:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("Redis is away")
        return await super().record(records)


class AdmitFailsOnce(MemoryUsageStore):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def admit(self, admissions: Sequence[Admission]) -> None:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("Redis is away")
        await super().admit(admissions)


def observed(tenant: str, request_id: str) -> Observation:
    seen = observation_from_envoy(entry(request_id, headers={"x-meshtoll-tenant": tenant}))
    assert seen is not None
    return seen


async def test_an_entry_whose_admission_is_not_flushed_yet_settles_it_at_once_and_it_is_never_stored(
    usage_store: UsageStore, tenant: str
) -> None:
    recorder = AdmissionRecorder(usage_store)
    observed_admissions: list[str] = []

    async def observe(admissions: Sequence[Admission]) -> None:
        observed_admissions.extend(admission.request_id for admission in admissions)

    recorder.on_stored(observe)
    settlement = Settlement(usage_store, clock=Clock(), recorder=recorder)
    recorder.admit(admitted(tenant, "r1"))
    recorder.admit(admitted(tenant, "r2"))
    await settlement.settle([observed(tenant, "r1")])
    assert (settlement.outcomes["billed"], settlement.waiting) == (1, 0)
    await recorder.flush()
    assert await usage_store.pending([(tenant, "r1"), (tenant, "r2")]) == {
        (tenant, "r2"): (admitted(tenant, "r2"), None)
    }
    assert sorted(observed_admissions) == ["r1", "r2"]  # key use sees both admitted requests
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled) == (1, 5, 0)
    # The same entry again, now that nothing is buffered: counted before, never twice.
    await settlement.settle([observed(tenant, "r1")])
    await settlement.retry_waiting()
    assert (await usage_store.usage(tenant, "2026-11")).requests == 1


async def test_an_admission_is_held_one_round_and_written_at_the_next_so_a_late_entry_still_settles_it_unwritten(
    usage_store: UsageStore, tenant: str
) -> None:
    recorder = AdmissionRecorder(usage_store)
    settlement = Settlement(usage_store, clock=Clock(), recorder=recorder)
    recorder.admit(admitted(tenant, "r1"))
    recorder.admit(admitted(tenant, "r2"))
    await recorder.flush(held=True)  # the round they were admitted in: held, not written
    assert await usage_store.pending([(tenant, "r1"), (tenant, "r2")]) == {}
    recorder.admit(admitted(tenant, "r3"))
    await settlement.settle([observed(tenant, "r1")])  # an entry a round later: settled from memory
    assert (settlement.outcomes["billed"], settlement.outcomes["buffered"], settlement.waiting) == (1, 1, 0)
    await recorder.flush(held=True)  # r2's second round: written; r3 held
    assert set(await usage_store.pending([(tenant, "r1"), (tenant, "r2"), (tenant, "r3")])) == {
        (tenant, "r2")
    }
    await recorder.flush()  # everything (shutdown)
    assert set(await usage_store.pending([(tenant, "r2"), (tenant, "r3")])) == {
        (tenant, "r2"),
        (tenant, "r3"),
    }
    await settlement.settle([observed(tenant, "r2"), observed(tenant, "r3")])
    assert (settlement.outcomes["billed"], settlement.waiting) == (3, 0)
    assert (await usage_store.usage(tenant, "2026-11")).requests == 3


async def test_a_held_admission_whose_write_failed_is_written_first_at_the_next_round(tenant: str) -> None:
    store = AdmitFailsOnce()
    recorder = AdmissionRecorder(store)
    recorder.admit(admitted(tenant, "r1"))
    await recorder.flush(held=True)
    recorder.admit(admitted(tenant, "r2"))
    await recorder.flush(held=True)  # r1's write fails: kept
    assert await store.pending([(tenant, "r1")]) == {}
    await recorder.flush(held=True)  # r1 and r2, held since the round before
    assert set(await store.pending([(tenant, "r1"), (tenant, "r2")])) == {(tenant, "r1"), (tenant, "r2")}


@pytest.mark.integration
async def test_units_reported_in_the_round_of_their_admission_are_written_after_it_and_make_it_due(
    redis_url: str, tenant: str
) -> None:
    # Redis moves a pending admission's due time when its units are reported, and only an
    # admission already there: a report written before its admission would leave it due an
    # hour after its request (the streaming grace) instead of the grace from the report.
    store = RedisUsageStore(redis_url, clock=lambda: START + 10)
    try:
        recorder = AdmissionRecorder(store)
        recorder.admit(admitted(tenant, "chat", awaits_report=True))
        recorder.report_units(ReportedUnits(tenant, "chat", 77))
        await recorder.flush(held=True)
        await recorder.flush(held=True)
        overdue = await store.overdue(START + 100)
        assert [(a.request_id, a.units) for a in overdue if a.tenant == tenant] == [("chat", 77)]
    finally:
        await store.close()


async def test_a_buffered_admission_is_not_settled_by_an_entry_naming_another_tenant_or_awaiting_units(
    usage_store: UsageStore, tenant: str
) -> None:
    recorder = AdmissionRecorder(usage_store)
    settlement = Settlement(usage_store, clock=Clock(), recorder=recorder)
    recorder.admit(admitted(tenant, "r1"))
    recorder.admit(admitted(tenant, "chat", awaits_report=True))
    await settlement.settle([observed(f"{tenant}-other", "r1"), observed(tenant, "chat")])
    assert (settlement.outcomes["billed"], settlement.waiting) == (0, 2)
    await recorder.flush()
    found = await usage_store.pending([(tenant, "r1"), (tenant, "chat")])
    assert sorted(request_id for _, request_id in found) == ["chat", "r1"]


async def test_a_buffered_admission_whose_record_was_not_stored_is_flushed_and_its_entry_settles_it_later(
    tenant: str,
) -> None:
    store = RecordFailsOnce()
    recorder = AdmissionRecorder(store)
    settlement = Settlement(store, clock=Clock(), recorder=recorder)
    recorder.admit(admitted(tenant, "r1"))
    await settlement.settle([observed(tenant, "r1")])  # the store fails: the entry waits
    assert (settlement.outcomes["unavailable"], settlement.waiting) == (1, 1)
    await recorder.flush()
    assert list(await store.pending([(tenant, "r1")])) == [(tenant, "r1")]
    await settlement.retry_waiting()
    assert (settlement.outcomes["billed"], settlement.waiting) == (1, 0)
    assert (await store.usage(tenant, "2026-11")).requests == 1
