"""A collection rendered by prometheus_client, the reference implementation: the Prometheus
text format (0.0.4) by default, OpenMetrics when the scraper's `Accept` asks for it.

One exception, on purpose: envoyproxy/ratelimit's per-limit counters are named without
`_total` (`ratelimit_service_rate_limit_over_limit`, as its Go exporter writes them and its
users' dashboards query them), which prometheus_client's text format cannot express: it
always appends `_total` to a counter. Those families are written here in the text format
(typed, the TYPE line naming the samples); in OpenMetrics, where a counter's samples end in
`_total` whoever writes them, prometheus_client renders them like the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from meshtoll.telemetry.families import Family, Labels

# Numbers as Prometheus writes them (`+Inf`, `1e-05`): prometheus_client's, untyped there.
_number = cast(Callable[[float], str], floatToGoString)


class _Collection:
    """What prometheus_client's encoders read: anything with `collect()`."""

    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return (_metric(family) for family in self._families)


def render(families: list[Family], accept: str) -> tuple[bytes, str]:
    """The body and its content type for a scraper that sent `accept`."""
    encoder, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        return encoder(_Collection(families)), content_type
    typed = [family for family in families if not family.legacy_counter]
    legacy = [family for family in families if family.legacy_counter]
    body = encoder(_Collection(typed))
    return body + "".join(map(_legacy_counter_text, legacy)).encode(), content_type


def _metric(family: Family) -> Metric:
    metric = Metric(family.name, family.help, family.kind)
    if family.kind == "counter":
        for key, value in sorted(family.samples.items()):
            metric.add_sample(f"{family.name}_total", dict(key), value)
    elif family.kind == "gauge":
        for key, value in sorted(family.samples.items()):
            metric.add_sample(family.name, dict(key), value)
    else:
        for key, histogram in sorted(family.histograms.items()):
            _histogram_samples(metric, family.bounds, key, histogram.counts, histogram.sum)
    return metric


def _histogram_samples(
    metric: Metric, bounds: tuple[float, ...], key: Labels, counts: list[int], total: float
) -> None:
    cumulative = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += count
        metric.add_sample(f"{metric.name}_bucket", {**dict(key), "le": _number(bound)}, cumulative)
    metric.add_sample(f"{metric.name}_count", dict(key), cumulative)
    metric.add_sample(f"{metric.name}_sum", dict(key), total)


def _legacy_counter_text(family: Family) -> str:
    lines = [f"# HELP {family.name} {_escaped_help(family.help)}", f"# TYPE {family.name} counter"]
    for key, value in sorted(family.samples.items()):
        text = ",".join(f'{name}="{_escaped_value(label)}"' for name, label in key)
        # Whole numbers as Go writes them ("3", not "3.0"): the peer's text, byte for byte.
        written = str(int(value)) if float(value).is_integer() else _number(value)
        lines.append(f"{family.name}{{{text}}} {written}")
    return "\n".join(lines) + "\n"


def _escaped_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escaped_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
