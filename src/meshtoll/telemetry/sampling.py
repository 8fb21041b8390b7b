"""Which decisions get a span, decided before the OpenTelemetry SDK is asked.

The SDK builds a span object, ids and a sampling result for every span it is asked to start,
recorded or not: tens of microseconds a decision, paid by all of them when 1% are traced.
For the parent-based samplers (OTEL_TRACES_SAMPLER=parentbased_*, the SDK's default and the
usual choice) the decision is cheap to take here: a call whose traceparent says "not
sampled" gets no span, a call without a parent gets one with the root sampler's probability,
and only those go to the SDK, whose sampler then records what it is given (parent-based,
always on for a root). Other samplers (traceidratio, always_on, always_off, one of the SDK's
entry points) are left to the SDK for every span.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler

from meshtoll.errors import ConfigError

_ROOTS = {"parentbased_always_on": 1.0, "parentbased_always_off": 0.0, "parentbased_traceidratio": None}
# A W3C traceparent: version, trace id, parent id and flags, in lower-case hex.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True, slots=True)
class Gate:
    """Spans for parentless calls with probability `root_ratio`, for calls with a parent
    only when the parent was sampled."""

    root_ratio: float
    draw: Callable[[], float] = random.random

    def admits(self, carrier: Mapping[str, str] | None) -> bool:
        parent = carrier.get("traceparent") if carrier else None
        sampled = None if parent is None else remote_sampled(parent)
        if sampled is None:  # no parent, or none the SDK would take: a new trace
            return self.draw() < self.root_ratio
        return sampled


def remote_sampled(traceparent: str) -> bool | None:
    """The sampled flag of a traceparent; None when it is not one the SDK would continue
    (malformed, version ff, or an all-zero id): then it starts a new trace."""
    found = _TRACEPARENT.fullmatch(traceparent)
    if found is None or found[1] == "ff" or found[2] == "0" * 32 or found[3] == "0" * 16:
        return None
    return bool(int(found[4], 16) & 1)


def sampling_from_environment(environ: Mapping[str, str]) -> tuple[Sampler | None, Gate | None]:
    """The SDK's sampler (None: let it read OTEL_TRACES_SAMPLER itself) and meshtoll's gate
    in front of it (None: every span goes to the SDK)."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in _ROOTS:
        return None, None
    ratio = _ROOTS[name]
    if ratio is None:
        ratio = _ratio(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    return ParentBased(ALWAYS_ON), Gate(ratio)


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={text!r} is not a sampling ratio from 0 to 1")
    return ratio
