"""What /metrics serves, as plain values: a family per metric name, typed, with its samples
by label set. A collection is a list of families; the workers of one `meshtoll serve` merge
their collections (telemetry/workers.py) before one exposition renders them.

Counter names are written without `_total` (the OpenMetrics family name); the exposition
adds it to the samples, in either format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Labels = tuple[tuple[str, str], ...]  # (name, value) pairs, in a fixed order
Kind = Literal["counter", "gauge", "histogram"]
# How the workers' values combine: "sum" for what each process counts or holds (its
# decisions, the entries waiting in its memory), "max" for what they all see alike (the
# policy version, the reloads of the one policy file each of them rejected).
Combine = Literal["sum", "max"]


@dataclass(slots=True)
class HistogramValue:
    counts: list[int]  # per bucket, not cumulative; the last one above every bound
    sum: float

    def add(self, other: HistogramValue) -> HistogramValue:
        if len(other.counts) != len(self.counts):
            raise ValueError("histograms with different buckets")
        return HistogramValue(
            [a + b for a, b in zip(self.counts, other.counts, strict=True)], self.sum + other.sum
        )


@dataclass(slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)  # counters and gauges
    histograms: dict[Labels, HistogramValue] = field(default_factory=dict)
    bounds: tuple[float, ...] = ()  # histograms: the upper bounds of the buckets but the last
    combine: Combine = "sum"
    # A counter whose samples keep the name as it is in the Prometheus text format, without
    # `_total`: envoyproxy/ratelimit's, whose dashboards query them so (telemetry/exposition.py).
    legacy_counter: bool = False

    def describe(self) -> tuple[str, str, tuple[float, ...], bool]:
        """What two workers must agree on to merge this family."""
        return self.kind, self.help, self.bounds, self.legacy_counter


def labels(**values: str) -> Labels:
    return tuple(values.items())


def merge(collections: Iterable[list[Family]]) -> list[Family]:
    """One collection from several processes': counters and histograms add up, gauges
    combine as their family says. A family two processes describe differently (a worker of
    another version during a rolling restart) keeps the first description met."""
    merged: dict[str, Family] = {}
    for collection in collections:
        for family in collection:
            found = merged.get(family.name)
            if found is None:
                merged[family.name] = _copy(family)
            elif found.describe() == family.describe():
                _add(found, family)
    return list(merged.values())


def _copy(family: Family) -> Family:
    return Family(
        family.name,
        family.kind,
        family.help,
        dict(family.samples),
        {key: HistogramValue(list(value.counts), value.sum) for key, value in family.histograms.items()},
        family.bounds,
        family.combine,
        family.legacy_counter,
    )


def _add(into: Family, other: Family) -> None:
    for key, value in other.samples.items():
        before = into.samples.get(key)
        if before is None:
            into.samples[key] = value
        else:
            into.samples[key] = max(before, value) if into.combine == "max" else before + value
    for key, histogram in other.histograms.items():
        had = into.histograms.get(key)
        into.histograms[key] = histogram if had is None else had.add(histogram)


def to_document(collection: list[Family]) -> list[dict[str, object]]:
    """JSON-ready: what a worker writes for its siblings."""
    return [
        {
            "name": family.name,
            "kind": family.kind,
            "help": family.help,
            "samples": [[list(map(list, key)), value] for key, value in family.samples.items()],
            "histograms": [
                [list(map(list, key)), value.counts, value.sum] for key, value in family.histograms.items()
            ],
            "bounds": list(family.bounds),
            "combine": family.combine,
            "legacy_counter": family.legacy_counter,
        }
        for family in collection
    ]


def from_document(document: object) -> list[Family]:
    """The inverse of to_document; ValueError for anything else (a file cut short, another
    program's JSON)."""
    if not isinstance(document, list):
        raise ValueError("a collection is a list of families")
    try:
        return [_family(entry) for entry in document]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a metrics collection: {exc!r}") from None


def _family(entry: Mapping[str, object]) -> Family:
    kind = entry["kind"]
    combine = entry["combine"]
    if kind not in ("counter", "gauge", "histogram") or combine not in ("sum", "max"):
        raise ValueError(f"unknown kind {kind!r} or combination {combine!r}")
    samples = {_labels(key): float(value) for key, value in entry["samples"]}  # type: ignore[attr-defined]
    histograms = {
        _labels(key): HistogramValue([int(count) for count in counts], float(total))
        for key, counts, total in entry["histograms"]  # type: ignore[attr-defined]
    }
    bounds = tuple(float(bound) for bound in entry["bounds"])  # type: ignore[attr-defined]
    if any(len(value.counts) != len(bounds) + 1 for value in histograms.values()):
        raise ValueError("a histogram's buckets do not match its bounds")
    return Family(
        str(entry["name"]),
        kind,
        str(entry["help"]),
        samples,
        histograms,
        bounds,
        combine,
        bool(entry["legacy_counter"]),
    )


def _labels(pairs: object) -> Labels:
    return tuple((str(name), str(value)) for name, value in pairs)  # type: ignore[attr-defined]
