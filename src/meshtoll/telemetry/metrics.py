"""Metrics: plain counts on the hot path, read into typed families only when /metrics is
collected.

A decision costs a dict increment (tens of nanoseconds) and, for its latency, a histogram
bucket increment (telemetry/histogram.py); nothing on the request path knows of
prometheus_client. Each service keeps its counts where it works (a `Counter`, a
`Histogram`, an attribute) and registers a reader for them here, once, in `build`. A
collection runs every reader and is a list of plain `Family` values, which the workers of
one process group merge (telemetry/workers.py) and telemetry/exposition.py renders.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshtoll.telemetry.exposition import render
from meshtoll.telemetry.families import Combine, Family, HistogramValue, Labels, merge
from meshtoll.telemetry.histogram import LATENCY_BUCKETS, Histogram
from meshtoll.telemetry.tenant_labels import TenantLabels

Read = Callable[[], Mapping[Labels, float]]
# A value with its labels, as a service reports it: ({"sink": "lago", "outcome": "delivered"}, 3).
Labelled = tuple[dict[str, str], float]


class DecisionCounts:
    """Authz decisions by transport and outcome ("allow" or the denial's error code)."""

    def __init__(self) -> None:
        # Not a Counter, whose item assignment is a Python-level slot (it defines
        # __delitem__): every decision counts itself here.
        self.counts: defaultdict[tuple[str, str], int] = defaultdict(int)


class Metrics:
    """The registry of every family this process serves; built once in `build`."""

    def __init__(self, *, tenant_labels: TenantLabels | None = None) -> None:
        self.tenant_labels = tenant_labels or TenantLabels()
        self._families: dict[str, Callable[[], Family]] = {}
        self._histograms: dict[str, tuple[str, tuple[float, ...], dict[Labels, Histogram]]] = {}
        # Where sibling workers' collections come from (telemetry/workers.py), when there are
        # some, and how many processes report (this one alone, unless a group says otherwise).
        self.siblings: Callable[[], list[list[Family]]] | None = None
        self.workers: Callable[[], int] = lambda: 1

    def counter(
        self, name: str, help: str, read: Read, *, combine: Combine = "sum", legacy: bool = False
    ) -> None:
        """`name` without `_total`. `legacy`: its text-format samples keep the bare name."""
        self._add(
            name, lambda: Family(name, "counter", help, dict(read()), combine=combine, legacy_counter=legacy)
        )

    def count_outcomes(self, name: str, description: str, outcomes: Mapping[str, int]) -> None:
        """Export a service's outcome counter (as the service keeps it) as `name_total{outcome}`."""
        self.count_by(name, description, outcomes, "outcome")

    def count_by(self, name: str, help: str, counts: Mapping[Any, float], *labels: str) -> None:
        """A counter of `counts`, whose keys are one label's value (a str) or several's (a
        tuple), in the order of `labels`."""

        def read() -> dict[Labels, float]:
            return {
                tuple(zip(labels, key if isinstance(key, tuple) else (key,), strict=True)): count
                for key, count in list(counts.items())
            }

        self.counter(name, help, read)

    def count_labelled(self, name: str, description: str, read: Callable[[], Iterable[Labelled]]) -> None:
        """Export counts a service keeps under several labels (`read` gives each count with
        its labels) as the counter `name`."""
        self.counter(name, description, lambda: _by_labels(read()))

    def gauge_labelled(self, name: str, description: str, read: Callable[[], Iterable[Labelled]]) -> None:
        """Export values a service keeps current, each with its labels, as the gauge `name`."""
        self.gauges(name, description, lambda: _by_labels(read()))

    def gauge(
        self, name: str, description: str, read: Callable[[], float], *, combine: Combine = "sum"
    ) -> None:
        """Export a value a service keeps current as the gauge `name`."""
        self._add(name, lambda: Family(name, "gauge", description, {(): read()}, combine=combine))

    def gauges(self, name: str, help: str, read: Read, *, combine: Combine = "sum") -> None:
        """A gauge with labels: its samples by label set."""
        self._add(name, lambda: Family(name, "gauge", help, dict(read()), combine=combine))

    def histogram(
        self, name: str, help: str, bounds: tuple[float, ...] = LATENCY_BUCKETS, **labels: str
    ) -> Histogram:
        """The histogram of `name` for these label values, made once: the caller keeps it and
        observes into it on its path."""
        found = self._histogram_family_of(name, help, bounds)
        key = tuple(labels.items())
        if key not in found:
            found[key] = Histogram(bounds)
        return found[key]

    def histogram_of(self, name: str, help: str, histogram: Histogram, **labels: str) -> None:
        """Export a histogram a service made itself (as `name` with these label values)."""
        self._histogram_family_of(name, help, histogram.bounds)[tuple(labels.items())] = histogram

    def collect(self) -> list[Family]:
        return [read() for read in self._families.values()]

    def group_collection(self) -> list[Family]:
        """This process's collection, merged with its sibling workers' when it has some:
        what /metrics serves (and the dashboard's overview reads)."""
        collection = self.collect()
        if self.siblings is not None:
            collection = merge([collection, *self.siblings()])
        return collection

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The body and content type of /metrics for a scraper that sent `accept`."""
        collection = self.group_collection()
        if self.tenant_labels.enabled:
            collection = [self.tenant_labels.select(family) for family in collection]
        return render(collection, accept)

    def prometheus_text(self) -> str:
        """The Prometheus text format (0.0.4), as a scraper that asks for nothing gets it."""
        return self.exposition()[0].decode()

    def _histogram_family_of(
        self, name: str, help: str, bounds: tuple[float, ...]
    ) -> dict[Labels, Histogram]:
        found = self._histograms.get(name)
        if found is None:
            found = self._histograms[name] = (help, bounds, {})
            self._add(name, lambda: self._histogram_family(name))
        elif found[1] != bounds:
            raise ValueError(f"histogram {name!r}: every series of a family has the same buckets")
        return found[2]

    def _histogram_family(self, name: str) -> Family:
        help, bounds, histograms = self._histograms[name]
        values = {key: HistogramValue(list(h.counts), h.sum) for key, h in list(histograms.items())}
        return Family(name, "histogram", help, histograms=values, bounds=bounds)

    def _add(self, name: str, read: Callable[[], Family]) -> None:
        if name in self._families:
            raise ValueError(f"metric family {name!r} registered twice")
        self._families[name] = read


def _by_labels(values: Iterable[Labelled]) -> dict[Labels, float]:
    return {tuple(sorted(labels.items())): value for labels, value in values}
