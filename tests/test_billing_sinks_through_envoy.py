"""Usage delivered to OpenMeter, Lago and Stripe (local stand-ins that validate every body
against the published schemas) for traffic sent through a real Envoy: two worker processes
run every sink (the lease lets one deliver), the targets answer 503s, a 429 with
Retry-After, a timeout, Lago's 422 for known transaction ids and an expired Stripe
session, meshtoll is restarted in the middle of a push, and every admitted request arrives
exactly once by id in each, with the sinks' counts and lag on /metrics."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack, RedisServer, StackConfig
from meshtoll.storage import usage_store
from tests.billing_receivers import Receiver, Scripted, running_receiver
from tests.client import fetch
from tests.envoy_harness import local_stack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-billed"
TENANT = "billed"
CUSTOMER = "cus_NffrFeUfNV2Hib"


@pytest.fixture(scope="module")
def receivers() -> Iterator[dict[str, Receiver]]:
    with (
        running_receiver("openmeter") as openmeter,
        running_receiver("lago") as lago,
        running_receiver("stripe") as stripe,
    ):
        yield {"openmeter": openmeter, "lago": lago, "stripe": stripe}


@pytest.fixture(scope="module")
def stack(
    receivers: dict[str, Receiver], envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """Envoy and two meshtoll workers on a Redis of their own (the sinks deliver every
    tenant's usage in their store), stopped before that Redis."""
    path = tmp_path_factory.mktemp("sinks") / "policy.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path.write_text(
        "plans: {pro: {meter: pro_calls}}\n"
        f"tenants: {{{TENANT}: {{plan: pro, api_keys: [{{id: ci, sha256: {digest}}}], billing: "
        f"{{stripe_customer: {CUSTOMER}, lago_subscription: sub-billed, openmeter_subject: billed-corp}}}}}}\n"
        "routes: [{prefix: /v1/search, name: search, cost: 5, meter: searches}, {prefix: /v1/, name: v1}]\n"
    )
    sinks = [
        arg for target, receiver in receivers.items() for arg in ("--usage-sink", f"{target}={receiver.url}")
    ]
    credentials = {
        "MESHTOLL_OPENMETER_TOKEN": receivers["openmeter"].token,
        "MESHTOLL_LAGO_API_KEY": receivers["lago"].token,
        "MESHTOLL_STRIPE_API_KEY": receivers["stripe"].token,
    }
    with pytest.MonkeyPatch.context() as patch, RedisServer(tmp_path_factory.mktemp("sinks-redis")) as redis:
        for name, value in credentials.items():  # the environment meshtoll starts (and restarts) with
            patch.setenv(name, value)
        config = StackConfig(
            policy=path,
            redis_url=redis.url,
            workers=2,
            serve_args=(*sinks, "--usage-sink-timeout-seconds", "1", "--reconcile-grace-seconds", "2"),
            envoy_binary=envoy_binary,
            work_dir=tmp_path_factory.mktemp("sinks-stack"),
        )
        with local_stack(config) as running:
            yield running


def redis_of(stack: LocalStack) -> str:
    assert stack.config.redis_url is not None
    return stack.config.redis_url


def send(stack: LocalStack, count: int) -> int:
    """`count` requests of the tenant; how many were served (a 503 Envoy answers while
    meshtoll restarts is billed too, with 0 units: the ledger says what was admitted)."""
    served = 0
    for index in range(count):
        path = "/v1/search?q=x" if index % 2 else "/v1/items"
        status = fetch(stack.url("listen_full_port", path), headers={"x-api-key": KEY}).status
        assert status in (200, 503)
        served += status == 200
    return served


def ledger_ids(redis_url: str) -> dict[str, int]:
    """Request id -> units of the tenant's records in the ledger: what was admitted and billed."""

    async def read() -> dict[str, int]:
        async with usage_store(redis_url) as store:
            return {r.request_id: r.units for r in await store.ledger(TENANT, 0, 4e9)}

    return asyncio.run(read())


def request_id(receiver: Receiver, key: str) -> str:
    return key.rpartition("/")[2] if receiver.target == "openmeter" else key


def delivered(receivers: dict[str, Receiver], expected: set[str]) -> bool:
    return all({request_id(r, key) for key in r.held} >= expected for r in receivers.values())


def test_every_admitted_request_reaches_each_billing_system_once_through_failures_and_a_restart(
    stack: LocalStack, receivers: dict[str, Receiver]
) -> None:
    own_redis = redis_of(stack)
    openmeter, lago, stripe = receivers["openmeter"], receivers["lago"], receivers["stripe"]
    openmeter.script.extend([Scripted(status=503), Scripted(status=429, retry_after="1"), Scripted(hang=3.0)])
    lago.script.extend([Scripted(status=503, hold=True), Scripted(status=503)])  # then 422: known ids
    stripe.script.extend([Scripted(), Scripted(status=503), Scripted(expire_session=True)])
    assert send(stack, 30) == 30
    # In the middle of a push: OpenMeter is holding a batch without answering.
    eventually(lambda: openmeter.busy, timeout=30, message="OpenMeter's scripted timeout never came")
    stack.restart("meshtoll")
    assert send(stack, 30) > 0
    eventually(
        lambda: len(ledger_ids(own_redis)),
        lambda n: n == 60,
        timeout=30,
        message="not all 60 requests billed",
    )
    admitted = ledger_ids(own_redis)
    eventually(
        lambda: delivered(receivers, set(admitted)),
        timeout=60,
        message="not every record reached every target",
    )
    for receiver in receivers.values():
        assert receiver.problems == [], receiver.target
        ids = [request_id(receiver, key) for key in receiver.held]
        assert sorted(ids) == sorted(admitted), receiver.target  # each once, none missing, no other
    # What each target holds is the tenant's, on the meter the policy names, with its units.
    for key, event in openmeter.held.items():
        assert (event["subject"], event["data"]["units"]) == (
            "billed-corp",
            admitted[request_id(openmeter, key)],
        )
        assert event["type"] in ("searches", "pro_calls")
    assert {event["external_subscription_id"] for event in lago.held.values()} == {"sub-billed"}
    assert {event["payload"]["stripe_customer_id"] for event in stripe.held.values()} == {CUSTOMER}
    assert sum(int(event["payload"]["value"]) for event in stripe.held.values()) == sum(admitted.values())
    # The scripted failures happened: ids arrived more than once, and were held once.
    assert max(lago.arrivals.values()) > 1
    assert max(openmeter.arrivals.values()) > 1
    assert stripe.requests["/v2/billing/meter_event_session"] >= 2


def showing(line: str) -> Callable[[str], bool]:
    return lambda text: line in text


def test_the_sinks_counts_and_lag_are_on_metrics(stack: LocalStack, receivers: dict[str, Receiver]) -> None:
    def scrape() -> str:
        return fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()

    # Two workers share the admin port: one of them delivers each sink and reports its lag.
    for target in receivers:
        text = eventually(
            scrape,
            showing(f'meshtoll_usage_sink_lag_records{{sink="{target}"}} 0'),
            timeout=30,
            message=f"no scrape showed the {target} sink caught up",
        )
        assert f'meshtoll_usage_sink_lag_seconds{{sink="{target}"}}' in text
        assert f'meshtoll_usage_sink_delivering{{sink="{target}"}} 1' in text
        assert f'meshtoll_usage_sink_records_total{{outcome="delivered",sink="{target}"}}' in text


def test_the_quarantine_is_listed_and_replayed_through_the_admin_api(stack: LocalStack) -> None:
    listed = fetch(f"{stack.meshtoll_admin_url}/api/usage/sinks/lago/quarantine")
    assert (listed.status, listed.json()) == (200, {"sink": "lago", "records": []})
    replayed = fetch(
        f"{stack.meshtoll_admin_url}/api/usage/sinks/lago/quarantine/replay", method="POST", body=b""
    )
    assert (replayed.status, replayed.json()) == (200, {"sink": "lago", "replayed": 0})
    wrong = fetch(f"{stack.meshtoll_admin_url}/api/usage/sinks/lago/quarantine/replay")
    assert (wrong.status, wrong.json()["error"]) == (405, "method_not_allowed")
    unknown = fetch(f"{stack.meshtoll_admin_url}/api/usage/sinks/chargebee/quarantine")
    assert (unknown.status, unknown.json()["error"]) == (404, "not_found")


def test_what_a_client_sends_names_no_tenant_customer_or_event_id_in_a_billing_system(
    stack: LocalStack, receivers: dict[str, Receiver]
) -> None:
    own_redis = redis_of(stack)
    before = set(ledger_ids(own_redis))
    hostile = {
        "x-api-key": KEY,
        "x-request-id": "forged-id",  # an id the client chose: replayed, it could hide requests
        "x-meshtoll-tenant": "someone-else",
        "x-meshtoll-route": "free",
        "x-stripe-customer": "cus_someone_else",
    }
    for _ in range(3):
        assert fetch(stack.url("listen_full_port", "/v1/search"), headers=hostile).status == 200
    new = eventually(
        lambda: set(ledger_ids(own_redis)) - before,
        lambda ids: len(ids) == 3,
        timeout=30,
        message="3 more records",
    )
    assert "forged-id" not in new  # Envoy's own ids, one per request
    eventually(
        lambda: delivered(receivers, new), timeout=30, message="the 3 records never reached every target"
    )
    for receiver in receivers.values():
        assert not any("forged-id" in key for key in receiver.held)
    assert {e["subject"] for e in receivers["openmeter"].held.values()} == {"billed-corp"}
    assert {e["external_subscription_id"] for e in receivers["lago"].held.values()} == {"sub-billed"}
    assert {e["payload"]["stripe_customer_id"] for e in receivers["stripe"].held.values()} == {CUSTOMER}
    assert {e["type"] for e in receivers["openmeter"].held.values()} == {"searches", "pro_calls"}
