"""What a route's hooks do to one request, as plain values: header changes filled in for the
request's tenant, and the billable units a response body reports. No I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from meshtoll.policy.model import HeaderRules, Hooks
from meshtoll.wire import is_billable_status

# Why a hooked request billed its route's cost instead of units read from the body.
UsageFallback = Literal["body_too_large", "body_truncated", "not_json", "field_missing", "not_a_count"]


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is calling, as authz established it (the x-meshtoll-* request headers)."""

    tenant: str
    plan: str
    consumer: str
    route: str

    def fill(self, template: str) -> str:
        return template.format(tenant=self.tenant, plan=self.plan, consumer=self.consumer, route=self.route)


@dataclass(frozen=True, slots=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    append: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


def header_changes(rules: HeaderRules, context: RequestContext) -> HeaderChanges:
    return HeaderChanges(
        tuple((name, context.fill(value)) for name, value in rules.set),
        tuple((name, context.fill(value)) for name, value in rules.append),
        rules.remove,
    )


def wants_response_headers(hooks: Hooks) -> bool:
    return bool(hooks.response_headers) or hooks.usage_from_body is not None


def wants_body(hooks: Hooks, status: int, content_length: int | None) -> bool | UsageFallback:
    """Whether the response body should be read for units: False for a response that bills
    nothing (not 2xx/3xx), a fallback reason when the body is known to be over the cap."""
    if hooks.usage_from_body is None or not is_billable_status(status):
        return False
    if content_length is not None and content_length > hooks.max_body_bytes:
        return "body_too_large"
    return True


def units_from_capped_body(body: bytes, hooks: Hooks, *, complete: bool) -> int | UsageFallback:
    """Units from a response body the route's cap allows. A body sent without a
    content-length (chunked) is only known to be too long once it arrives."""
    assert hooks.usage_from_body is not None
    if len(body) > hooks.max_body_bytes:
        return "body_too_large"
    return units_from_body(body, hooks.usage_from_body, complete=complete)


def units_from_body(body: bytes, path: tuple[str, ...], *, complete: bool) -> int | UsageFallback:
    """The non-negative integer at `path` in a JSON body; `complete` is False when Envoy sent
    only the first part of a body larger than its buffer."""
    try:
        value: object = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "not_json" if complete else "body_truncated"
    for step in path:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return "field_missing"
    # JSON has one number type: 1500.0 is a count, 1.5 and true are not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "not_a_count"
    if value < 0 or (isinstance(value, float) and not value.is_integer()):
        return "not_a_count"  # is_integer() is also False for inf and nan
    return int(value)
