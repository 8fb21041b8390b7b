"""What envoyproxy/ratelimit adds to an answer besides the codes: the RateLimit headers of
the most restrictive descriptor (LIMIT_RESPONSE_HEADERS_ENABLED) and the dynamic metadata
that describes the request (RESPONSE_DYNAMIC_METADATA). Pure: plain values in and out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtoll.ratelimit.decision import Descriptor, DescriptorStatus

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class HeaderNames:
    """LIMIT_LIMIT_HEADER, LIMIT_REMAINING_HEADER, LIMIT_RESET_HEADER."""

    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"


def rate_limit_headers(
    names: HeaderNames, statuses: Sequence[DescriptorStatus], quota: Sequence[bool]
) -> Headers:
    """The descriptor closest to its limit, or the last one refusing (quota descriptors do
    not count as refusing); none when no descriptor has a limit."""
    chosen: DescriptorStatus | None = None
    least = 2**32 - 1
    for status, is_quota in zip(statuses, quota, strict=True):
        if status.limit is not None and status.remaining < least:
            chosen, least = status, status.remaining
        if status.over_limit and not is_quota:
            chosen, least = status, 0
    if chosen is None or chosen.limit is None:
        return ()
    return (
        (names.limit, str(chosen.limit.requests)),
        (names.remaining, str(chosen.remaining)),
        (names.reset, str(int(chosen.reset_seconds))),
    )


def dynamic_metadata(
    domain: str,
    descriptors: Sequence[Descriptor],
    hits_addend: int,
    passed_metadata: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """envoyproxy/ratelimit's ratelimitToMetadata: the domain, each descriptor's entries ("key=value"),
    override and hits, the request's hits when set, and the `metadata` of every descriptor
    that passed, merged (the first value of a key wins; nested mappings merge)."""
    document: dict[str, Any] = {
        "domain": domain,
        "descriptors": [_descriptor(descriptor) for descriptor in descriptors],
    }
    if hits_addend:
        document["hitsAddend"] = float(hits_addend)
    merged: dict[str, Any] = {}
    for metadata in passed_metadata:
        _merge(merged, metadata)
    if merged:
        document["metadata"] = merged
    return document


def _descriptor(descriptor: Descriptor) -> dict[str, Any]:
    described: dict[str, Any] = {"entries": [f"{key}={value}" for key, value in descriptor.entries]}
    if descriptor.override is not None:
        override = descriptor.override
        described["limit"] = f"requests_per_unit:{override.requests} unit:{override.period.upper()}"
    if descriptor.hits_addend is not None:
        described["hitsAddend"] = float(descriptor.hits_addend)
    return described


def _merge(into: dict[str, Any], source: Mapping[str, Any]) -> None:
    for key, value in source.items():
        if key not in into:
            into[key] = _copy(value)
        elif isinstance(into[key], dict) and isinstance(value, Mapping):
            _merge(into[key], value)


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, Mapping) else value
