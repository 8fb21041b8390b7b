"""/metrics as a scraper reads it, from the services `build` wires, without a server: every
family typed in both formats, counters ending in `_total`, latencies in seconds with buckets
from 10 µs to 1 s, and no tenant's name in a label unless the operator asked for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.metrics_core import Metric

from meshtoll.local.dev import EXAMPLE_POLICY
from meshtoll.server.services import Services, build
from meshtoll.settings import Settings
from meshtoll.telemetry.histogram import LATENCY_BUCKETS, Histogram
from meshtoll.telemetry.metrics import Metrics
from meshtoll.telemetry.tenant_labels import TenantLabels, parse_tenant_labels
from tests.scraped import OPENMETRICS, openmetrics_families, text_families, value
from tests.test_services import ACME_KEY, answer

GLOBEX_KEY = "mt_demo_globex_8a3b6c1d0e2f4a5b"


@pytest.fixture
async def services(request: pytest.FixtureRequest) -> AsyncIterator[Services]:
    marker = request.node.get_closest_marker("tenant_labels")
    settings = Settings(policy=EXAMPLE_POLICY, metrics_tenant_labels=marker.args[0] if marker else "")
    built = await build(settings)
    yield built
    await built.close()


async def traffic(services: Services) -> None:
    """Three allowed acme requests, two refused (no such key)."""
    for n in range(3):
        await answer(services.http_authz, "/v1/orders", {"x-api-key": ACME_KEY, "x-request-id": f"r-{n}"})
    for _ in range(2):
        await answer(services.http_authz, "/v1/orders", {"x-api-key": "mt_nobody"})


def http_latencies(families: dict[str, Metric]) -> float:
    """How many HTTP authz decisions the latency histogram holds."""
    name = "meshtoll_decision_duration_seconds"
    return value(families, name, f"{name}_count", service="authz", transport="http")


async def scrape(services: Services, accept: str = "") -> tuple[str, str]:
    reply = await answer(services.admin, "/metrics", {"accept": accept} if accept else {})
    head, _, body = reply.partition(b"\r\n\r\n")
    content_type = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    return body.decode(), content_type


async def test_every_family_is_typed_and_counts_what_was_decided(services: Services) -> None:
    await traffic(services)
    text, content_type = await scrape(services)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = text_families(text)
    assert {family.type for family in families.values()} <= {"counter", "gauge", "histogram"}
    for family in families.values():
        if family.type == "counter":
            assert all(sample.name.endswith("_total") for sample in family.samples), family.name
            assert f"# TYPE {family.name}_total counter" in text
    decisions = families["meshtoll_authz_decisions"]
    allowed = value(
        families,
        "meshtoll_authz_decisions",
        "meshtoll_authz_decisions_total",
        outcome="allow",
        transport="http",
    )
    refused = value(
        families,
        "meshtoll_authz_decisions",
        "meshtoll_authz_decisions_total",
        outcome="invalid_api_key",
        transport="http",
    )
    assert (allowed, refused) == (3, 2), decisions.samples
    assert http_latencies(families) == 5


async def test_decision_latency_buckets_resolve_ten_microseconds_to_a_second(services: Services) -> None:
    await traffic(services)
    families = text_families((await scrape(services))[0])
    buckets = [
        sample
        for sample in families["meshtoll_decision_duration_seconds"].samples
        if sample.name.endswith("_bucket")
        and sample.labels["service"] == "authz"
        and sample.labels["transport"] == "http"
    ]
    bounds = [float(sample.labels["le"]) for sample in buckets]
    assert bounds == [*LATENCY_BUCKETS, float("inf")]
    assert (bounds[0], bounds[-2]) == (0.00001, 1.0)
    counts = [sample.value for sample in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == 5  # every decision in +Inf


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(services: Services) -> None:
    await traffic(services)
    text, content_type = await scrape(services, f"{OPENMETRICS},text/plain;version=0.0.4;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    families = openmetrics_families(text)  # the OpenMetrics parser is strict: it raises on any fault
    assert "# TYPE meshtoll_authz_decisions counter" in text
    assert (
        value(
            families,
            "meshtoll_authz_decisions",
            "meshtoll_authz_decisions_total",
            outcome="allow",
            transport="http",
        )
        == 3
    )
    assert families["meshtoll_decision_duration_seconds"].type == "histogram"


async def test_no_series_names_a_tenant_by_default(services: Services) -> None:
    await traffic(services)
    await answer(services.http_authz, "/v1/orders", {"x-api-key": GLOBEX_KEY, "x-request-id": "g-1"})
    text, _ = await scrape(services)
    families = text_families(text)
    assert "meshtoll_tenant_decisions" not in families
    labels = {name for family in families.values() for sample in family.samples for name in sample.labels}
    assert "tenant" not in labels
    assert "acme" not in text
    assert "globex" not in text


@pytest.mark.tenant_labels("top:1")
async def test_top_n_gives_the_busiest_tenants_series_of_their_own(services: Services) -> None:
    await traffic(services)  # acme: 3
    await answer(services.http_authz, "/v1/orders", {"x-api-key": GLOBEX_KEY, "x-request-id": "g-1"})
    families = text_families((await scrape(services))[0])
    tenants = {
        sample.labels["tenant"]: sample.value for sample in families["meshtoll_tenant_decisions"].samples
    }
    assert tenants == {"acme": 3}


@pytest.mark.tenant_labels("globex")
async def test_an_allow_list_names_only_its_tenants(services: Services) -> None:
    await traffic(services)
    await answer(services.http_authz, "/v1/orders", {"x-api-key": GLOBEX_KEY, "x-request-id": "g-1"})
    families = text_families((await scrape(services))[0])
    samples = families["meshtoll_tenant_decisions"].samples
    assert [(sample.labels["tenant"], sample.labels["outcome"], sample.value) for sample in samples] == [
        ("globex", "allow", 1)
    ]


@pytest.mark.parametrize("text", ["top:0", "top:x", "top:1001", "acme,", "a b", "top:"])
def test_a_bad_tenant_selection_is_refused_saying_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=text.replace("+", r"\+")):
        parse_tenant_labels(text)


def test_tenant_selections_parse() -> None:
    assert parse_tenant_labels("") == TenantLabels()
    assert not parse_tenant_labels(" ").enabled
    assert parse_tenant_labels("top:20") == TenantLabels(top=20)
    assert parse_tenant_labels("acme, globex") == TenantLabels(names=frozenset({"acme", "globex"}))


def test_an_observation_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 2, 1]
    assert histogram.sum == pytest.approx(4.65)


def test_two_registrations_of_one_name_are_a_mistake() -> None:
    metrics = Metrics()
    metrics.gauge("meshtoll_x", "x", lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        metrics.gauge("meshtoll_x", "x", lambda: 2)


async def test_a_scrape_while_decisions_run_reads_consistent_counts(services: Services) -> None:
    # Collection runs on the event loop between decisions: it never sees half an observation.
    await asyncio.gather(*(traffic(services) for _ in range(4)), scrape(services))
    families = text_families((await scrape(services))[0])
    assert http_latencies(families) == 20
