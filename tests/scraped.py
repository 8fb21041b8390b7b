"""/metrics as Prometheus reads it: scraped over HTTP and parsed by prometheus_client's
reference parsers (the text format's and OpenMetrics'), typed for the tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as _openmetrics
from prometheus_client.parser import text_string_to_metric_families as _text

from tests.client import fetch

OPENMETRICS = "application/openmetrics-text; version=1.0.0"

_parse_text = cast(Callable[[str], Iterable[Metric]], _text)
_parse_openmetrics = cast(Callable[[str], Iterable[Metric]], _openmetrics)


def text_families(text: str) -> dict[str, Metric]:
    """Families by name, as Prometheus' text-format parser reads them."""
    return {family.name: family for family in _parse_text(text)}


def openmetrics_families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in _parse_openmetrics(text)}


def scrape(admin_url: str, accept: str = "") -> dict[str, Metric]:
    """Every family meshtoll's admin port serves, parsed in the format it answered in."""
    reply = fetch(f"{admin_url}/metrics", headers={"accept": accept} if accept else {})
    assert reply.status == 200, reply.body
    text = reply.body.decode()
    if reply.headers["content-type"].startswith("application/openmetrics-text"):
        return openmetrics_families(text)
    return text_families(text)


def value(families: dict[str, Metric], family: str, sample: str | None = None, **labels: str) -> float:
    """The value of the sample `sample` (default: the family's own name, `_total` for a
    counter in OpenMetrics) with exactly these labels; 0 when there is none."""
    found = families.get(family)
    if found is None:
        return 0.0
    name = sample or family
    for each in found.samples:
        if each.name == name and each.labels == labels:
            return float(each.value)
    return 0.0
