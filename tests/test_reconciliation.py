"""Nothing billable is lost: admissions without an access-log record are billed once, marked
unreconciled; through a real Envoy, a meshtoll restart mid-traffic bills exactly what was
admitted."""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshtoll.local.devstack import LocalStack, RedisServer
from meshtoll.meter.reconcile import reconcile
from meshtoll.storage import MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.recorder import AdmissionRecorder
from meshtoll.usage.records import Admission, ReportedUnits, UsageRecord
from meshtoll.usage.store import UsageStore
from tests.client import fetch
from tests.conftest import ON_REDIS, StartStack
from tests.waiting import eventually

T = 1_795_000_000.0


_tenants = itertools.count()


@pytest.fixture
def tenant() -> str:
    # The session's Redis is shared: each test bills its own tenant.
    return f"reconciled{next(_tenants)}"


def admission(tenant: str, request_id: str, at: float = T) -> Admission:
    return Admission(request_id, at, tenant, "ci", "pro", "search", "GET", 5)


def logged(tenant: str, request_id: str) -> UsageRecord:
    """The access-log record of an admitted request."""
    return replace(admission(tenant, request_id).as_record(), status=200, source="access_log")


def test_an_unreconciled_record_is_the_one_usage_record_would_build_field_for_field() -> None:
    # as_record sets each field itself, not through UsageRecord's __init__: a field it leaves
    # unset would make the two differ (or raise on comparison).
    record = Admission("r1", T, "acme", "ci", "pro", "search", "GET", 7, awaits_report=True).as_record()
    assert record == UsageRecord(
        "r1", T, "acme", "ci", "pro", "search", "GET", status=0, request_bytes=0, response_bytes=0,
        duration_ms=0.0, units=7, source="admission",
    )  # fmt: skip


async def test_overdue_admissions_are_billed_once_and_marked_unreconciled(
    usage_store: UsageStore, tenant: str
) -> None:
    recorder = AdmissionRecorder(usage_store)
    for request_id, at in (("first", T), ("second", T), ("recent", T + 25)):
        recorder.admit(admission(tenant, request_id, at))
    await recorder.flush()
    assert await reconcile(usage_store, now=T + 30, grace=10) == 2  # no access-log record settled them
    assert await reconcile(usage_store, now=T + 30, grace=10) == 0  # billed once
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled) == (2, 10, 2)
    assert await reconcile(usage_store, now=T + 40, grace=10) == 1  # "recent" once it is overdue


async def test_an_access_log_record_settles_its_admission(usage_store: UsageStore, tenant: str) -> None:
    await usage_store.admit([admission(tenant, "r1"), admission(tenant, "r2")])
    await usage_store.record([logged(tenant, "r1")])
    assert [a.request_id for a in await usage_store.overdue(T + 100) if a.tenant == tenant] == ["r2"]
    assert await reconcile(usage_store, now=T + 100, grace=10) == 1
    # A late access-log record of an admission already billed never counts twice.
    assert await usage_store.record([logged(tenant, "r2")]) == 0
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.unreconciled) == (2, 1)


async def test_an_admission_stored_after_its_access_log_record_is_never_billed(
    usage_store: UsageStore, tenant: str
) -> None:
    # Envoy flushed the access log before authz flushed its admissions.
    await usage_store.record([logged(tenant, "fast")])
    await usage_store.admit([admission(tenant, "fast")])
    assert await reconcile(usage_store, now=T + 100, grace=10) == 0
    assert not [a for a in await usage_store.overdue(T + 100) if a.tenant == tenant]
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.unreconciled) == (1, 0)


async def test_an_overdue_admission_bills_the_units_its_body_hook_reported(
    usage_store: UsageStore, tenant: str
) -> None:
    # ext_proc's report can reach the store before authz's admission does.
    await usage_store.report_units([ReportedUnits(tenant, "tokens", 1234)])
    await usage_store.admit([admission(tenant, "tokens"), admission(tenant, "plain")])
    assert await reconcile(usage_store, now=T + 100, grace=10) == 2
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled) == (2, 1234 + 5, 2)


def priced_stack(
    start_stack: StartStack,
    directory: Path,
    tenant: str,
    key: str,
    routes: str = "[]",
    grace: float = 1.0,
    *,
    shipped_timeouts: bool = False,
) -> LocalStack:
    """A stack whose one tenant is on a priced plan (admissions are recorded for it) and
    whose admissions are billed after `grace` seconds; `shipped_timeouts` as start_stack's."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    policy = directory / "policy.yaml"
    policy.write_text(
        "plans: {pro: {price: {currency: EUR, tiers: [{up_to: null, unit_price: '0.01'}]}}}\n"
        f"tenants: {{{tenant}: {{plan: pro, api_keys: [{{id: k, sha256: {digest}}}]}}}}\n"
        f"routes: {routes}\n"
    )
    serve_args = ("--reconcile-grace-seconds", str(grace))
    return start_stack(policy, serve_args=serve_args, shipped_timeouts=shipped_timeouts)


@pytest.mark.integration
def test_a_meshtoll_restart_mid_traffic_bills_exactly_what_was_admitted(
    start_stack: StartStack, tmp_path: Path
) -> None:
    key = "k-reconcile"
    # A request authz admitted but Envoy answered 503 itself (its allow came after the
    # ext_authz timeout, or its connection broke) is settled by its tenant-less entry about
    # a second later (authz's flush, then the meter's retry): a one-second grace would race it.
    stack = priced_stack(start_stack, tmp_path, "recon", key, grace=5)
    url = stack.url("listen_full_port", "/v1/items")
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses[fetch(url, headers={"x-api-key": key}).status] += 1

    client = threading.Thread(target=traffic)
    client.start()
    try:
        # Traffic on each side of the restart: the behaviour under test.
        more_served(lambda: statuses[200], 30, "before the restart")
        stack.restart("meshtoll")
        more_served(lambda: statuses[200], 30, "after the restart")
    finally:
        stop.set()
        client.join()
    served = statuses[200]
    assert served > 50, statuses
    assert set(statuses) <= {200, 503}, statuses  # 503: the moments meshtoll was down
    # Every request served bills its unit, from its entry or, when the restart lost that,
    # from its admission; a request authz admitted but Envoy did not serve bills none.
    usage = eventually(
        lambda: usage_of(stack, "recon"),
        lambda usage: usage["units"] == served,
        timeout=15,
        interval=0.2,
        message=f"the {served} requests served ({statuses}) were not all billed their unit",
    )
    assert usage["requests"] - usage["by_status"].get("5xx", 0) == served, (usage, statuses)


def more_served(count: Callable[[], int], more: int, when: str) -> None:
    """Until `count()` has grown by `more`: traffic flowing, not a guessed time of it."""
    start = count()
    eventually(
        count,
        lambda now: now >= start + more,
        timeout=30,
        interval=0.01,
        message=f"fewer than {more} requests were answered {when}",
    )


def usage_of(stack: LocalStack, tenant: str) -> dict[str, Any]:
    found: dict[str, Any] = fetch(f"{stack.meshtoll_admin_url}/api/tenants/{tenant}/usage").json()
    return found


def allowed_so_far(stack: LocalStack) -> float:
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    prefix = 'meshtoll_authz_decisions_total{outcome="allow",transport="http"} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.integration
@pytest.mark.parametrize("listener", ["listen_full_port", "listen_full_als_port"])
def test_a_request_authz_allowed_after_envoys_timeout_is_billed_as_envoys_503(
    start_stack: StartStack, tmp_path: Path, listener: str
) -> None:
    # meshtoll paused for longer than Envoy's ext_authz timeout (0.25 s): Envoy answers the
    # requests in flight 503 itself and forwards nothing, while meshtoll, resumed, allows
    # them all the same. Admitted, and logged by Envoy without authz's tenant header, they
    # are settled by request id: 5xx requests of the tenant, 0 units, none unreconciled.
    key, tenant = "k-late", listener.split("_")[-2]  # full, als
    # Envoy's shipped ext_authz timeout: giving up on a paused meshtoll is this test's subject.
    stack = priced_stack(start_stack, tmp_path, tenant, key, grace=30, shipped_timeouts=True)
    url = stack.url(listener, "/v1/items")
    statuses: Counter[int] = Counter()
    stop = threading.Event()
    counting = threading.Lock()  # four clients: `+=` on a Counter is not atomic

    def traffic() -> None:
        while not stop.is_set():
            status = fetch(url, headers={"x-api-key": key}).status
            with counting:
                statuses[status] += 1

    clients = [threading.Thread(target=traffic) for _ in range(4)]
    for client in clients:
        client.start()
    meshtoll = stack.children["meshtoll"].pid  # its own process group (start_new_session)
    try:
        more_served(lambda: statuses[200], 20, "before the pause")
        os.killpg(meshtoll, signal.SIGSTOP)
        # Paused until Envoy has given up on calls in flight (its ext_authz timeout).
        more_served(lambda: statuses[503], 1, "by Envoy itself while meshtoll was paused")
    finally:
        os.killpg(meshtoll, signal.SIGCONT)
        more_served(lambda: statuses[200], 20, "after the pause")
        stop.set()
        for client in clients:
            client.join()
    admitted = allowed_so_far(stack)
    late = admitted - statuses[200]
    assert set(statuses) == {200, 503}, statuses
    assert late > 0, f"no allow came too late: the test proved nothing ({statuses}, {admitted} allowed)"
    usage = eventually(
        lambda: usage_of(stack, tenant),
        lambda usage: usage["requests"] == admitted,
        timeout=15,
        interval=0.2,
        message=f"the {admitted} admitted requests ({statuses}) were not all settled",
    )
    assert usage["units"] == statuses[200], (usage, statuses)
    assert (usage["by_status"], usage["unreconciled"]) == ({"2xx": statuses[200], "5xx": late}, 0), usage


@pytest.mark.integration
def test_an_envoy_restart_cutting_the_access_log_stream_loses_no_billable_request(
    start_stack: StartStack, tmp_path: Path
) -> None:
    key = "k-cut"
    stack = priced_stack(start_stack, tmp_path, "cut", key)
    stop = threading.Event()

    answered: Counter[str] = Counter()

    def traffic() -> None:
        while not stop.is_set():
            try:
                fetch(stack.url("listen_full_port", "/v1/items"), headers={"x-api-key": key})
                answered["requests"] += 1
            except (OSError, http.client.HTTPException):
                time.sleep(0.01)  # Envoy is restarting: not a state to wait on, a pause to retry

    client = threading.Thread(target=traffic)
    client.start()
    try:
        # Traffic on each side of the restart: the behaviour under test.
        more_served(lambda: answered["requests"], 30, "before the restart")
        stack.restart("envoy")  # its buffered access-log entries die with it
        more_served(lambda: answered["requests"], 30, "after the restart")
    finally:
        stop.set()
        client.join()
    admitted = allowed_so_far(stack)
    usage = eventually(
        lambda: usage_of(stack, "cut"),
        lambda usage: usage["requests"] == admitted,
        timeout=15,
        interval=0.2,
        message=f"the {admitted} allowed requests were not all billed",
    )
    assert usage["unreconciled"] > 0, "no access-log entry was lost: the test proved nothing"


@pytest.mark.integration
def test_body_metered_requests_whose_access_log_never_comes_bill_their_tokens(
    start_stack: StartStack, tmp_path: Path
) -> None:
    # The rls listener runs gRPC authz and the hooks but has no access logger: every
    # request there is billed by reconciliation alone, from authz's admission and the
    # units ext_proc read from the response body.
    key = "k-tokens"
    routes = "[{prefix: /v1/chat/, name: chat, hooks: {usage_from_body: usage.total_tokens}}]"
    stack = priced_stack(start_stack, tmp_path, "tokens", key, routes)
    headers = {"x-api-key": key}
    for tokens in (120, 3000, 45):
        url = stack.url("listen_rls_port", f"/v1/chat/completions?tokens={tokens}")
        assert fetch(url, headers=headers).status == 200
    usage = eventually(
        lambda: usage_of(stack, "tokens"),
        lambda usage: usage["requests"] == 3,
        timeout=15,
        interval=0.2,
        message="the three requests were not all billed by reconciliation",
    )
    assert (usage["requests"], usage["units"], usage["unreconciled"]) == (3, 120 + 3000 + 45, 3), usage


@pytest.fixture(params=["memory", ON_REDIS])
async def own_usage_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UsageStore]:
    """A usage store no other meshtoll reconciles: the module's stack, running on the
    session's Redis, would bill overdue admissions alongside the test."""
    if request.param == "memory":
        yield MemoryUsageStore()
        return
    with RedisServer(tmp_path) as server:
        store = RedisUsageStore(server.url)
        yield store
        await store.close()


@pytest.mark.parametrize("tenant_count", [4, 1000])
async def test_reconciliation_drains_a_backlog_in_one_round_and_bills_each_admission_once(
    own_usage_store: UsageStore, tenant: str, tenant_count: int
) -> None:
    # 20,000 overdue admissions, as after a Redis outage: one round bills every one, however
    # many tenants share them, and a later round finds nothing more to bill. (How fast it
    # goes is bench/reconcile_catch_up.py's to say: a rate fails by chance on a busy machine.)
    store = own_usage_store
    tenants = [f"{tenant}-{n}" for n in range(tenant_count)]
    await store.admit(
        [admission(tenants[n % tenant_count], f"backlog-{n}", at=T + n / 1000) for n in range(20_000)]
    )
    assert await store.backlog() == 20_000
    assert await reconcile(store, now=T + 100, grace=10) == 20_000
    assert await store.backlog() == 0
    assert await reconcile(store, now=T + 200, grace=10) == 0
    each = 20_000 // tenant_count
    assert [(await store.usage(name, "2026-11")).requests for name in tenants] == [each] * tenant_count


async def test_a_body_metered_admission_waits_an_hour_for_its_streamed_units(
    own_usage_store: UsageStore, tenant: str
) -> None:
    usage_store = own_usage_store  # reconciled up to now: nothing else of the session's
    streamed = replace(admission(tenant, "stream"), awaits_report=True)
    await usage_store.admit([streamed])
    # A response still streaming a minute on is not billed at the route's cost meanwhile...
    assert not [a for a in await usage_store.overdue(T + 60) if a.tenant == tenant]
    assert [a.request_id for a in await usage_store.overdue(T + 3601) if a.tenant == tenant] == ["stream"]
    await usage_store.report_units([ReportedUnits(tenant, "stream", 50_000)])
    # ...and once ext_proc reports the units (the stream has ended), a missing entry is
    # billed those units after the ordinary grace.
    assert await reconcile(usage_store, now=time.time() + 31, grace=30) >= 1
    usage = await usage_store.usage(tenant, "2026-11")
    assert (usage.requests, usage.units, usage.unreconciled) == (1, 50_000, 1)
