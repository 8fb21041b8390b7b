"""Route hooks: how the policy declares them, and what they do to one request (pure)."""

from __future__ import annotations

import pytest

from meshtoll.errors import PolicyError
from meshtoll.extproc.hooks import (
    RequestContext,
    header_changes,
    units_from_body,
    units_from_capped_body,
    wants_body,
)
from meshtoll.policy import load_policy_text
from meshtoll.policy.model import Hooks

CONTEXT = RequestContext(tenant="acme", plan="pro", consumer="app-1", route="chat")

POLICY = """\
plans:
  pro:
    limits:
      - {requests: 100, per: minute}
      - {units: 5000, per: month, name: tokens}
tenants:
  acme: {plan: pro}
routes:
  - prefix: /v1/chat
    name: chat
    hooks: {usage_from_body: usage.total_tokens}
  - prefix: /v1/search
    name: search
    cost: 5
  - prefix: /v1/strict
    name: strict
    hooks:
      request_headers:
        set: {X-Tenant: "{tenant}", x-caller: "{consumer} on {plan}"}
        append: {x-via: "meshtoll {{edge}}"}
        remove: [X-Api-Key]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "policy.yaml")
    return [str(problem) for problem in caught.value.problems]


def test_header_values_are_filled_with_the_requests_tenant() -> None:
    policy = load_policy_text(POLICY, "policy.yaml")
    hooks = policy.hooked_routes["strict"].hooks
    assert hooks is not None
    changes = header_changes(hooks.request_headers, CONTEXT)
    assert changes.set == (("x-tenant", "acme"), ("x-caller", "app-1 on pro"))
    assert changes.append == (("x-via", "meshtoll {edge}"),)
    assert changes.remove == ("x-api-key",)


def test_metering_hooks_fail_open_and_policy_hooks_fail_closed_by_default() -> None:
    policy = load_policy_text(POLICY, "policy.yaml")
    chat, strict = policy.hooked_routes["chat"].hooks, policy.hooked_routes["strict"].hooks
    assert chat is not None
    assert strict is not None
    assert (chat.failure_mode_allow, strict.failure_mode_allow) == (True, False)
    assert "search" not in policy.hooked_routes


def test_bad_hooks_are_named_with_their_field_path() -> None:
    text = """\
plans: {free: {}}
routes:
  - prefix: /a
    hooks: {}
  - prefix: /b
    hooks:
      usage_from_body: usage..tokens
      request_headers: {set: {host: x, x-meshtoll-tenant: y, x-ok: "{tenant} {secret}"}, remove: [bad name]}
      response_headers: {add: {x: y}}
  - prefix: /c
    hooks: {max_body_bytes: 10, failure_mode_allow: "yes"}
"""
    assert problems_of(text) == [
        "policy.yaml:4 routes[0].hooks: no hook given (expected some of: request_headers, "
        "response_headers, usage_from_body, max_body_bytes, failure_mode_allow)",
        "policy.yaml:8 routes[1].hooks.request_headers.remove[0]: 'bad name' is not an HTTP header name",
        "policy.yaml:8 routes[1].hooks.request_headers.set.host: 'host' cannot be changed by a hook "
        "(Envoy ignores it)",
        "policy.yaml:8 routes[1].hooks.request_headers.set.x-meshtoll-tenant: 'x-meshtoll-tenant': "
        "x-meshtoll-* headers are set by authz alone",
        "policy.yaml:8 routes[1].hooks.request_headers.set.x-ok: unknown placeholder {secret} in "
        "'{tenant} {secret}' (known: {tenant}, {plan}, {consumer}, {route})",
        "policy.yaml:9 routes[1].hooks.response_headers.add: unknown field (expected one of: set, append, remove)",
        "policy.yaml:7 routes[1].hooks.usage_from_body: 'usage..tokens' is not a dotted field path",
        "policy.yaml:11 routes[2].hooks.max_body_bytes: only 'usage_from_body' reads a body",
        "policy.yaml:11 routes[2].hooks.failure_mode_allow: expected true or false, got 'yes'",
    ]


def test_a_limit_counts_requests_or_units_never_both() -> None:
    text = """\
plans:
  a: {limits: [{requests: 1, units: 2, per: day}, {per: day}, {units: -1, per: day}]}
"""
    assert problems_of(text) == [
        "policy.yaml:2 plans.a.limits[0]: exactly one of 'requests' or 'units' is required",
        "policy.yaml:2 plans.a.limits[1]: exactly one of 'requests' or 'units' is required",
        "policy.yaml:2 plans.a.limits[2].units: expected an integer >= 0, got -1",
    ]


def test_unit_limits_cost_the_route_or_only_look_until_the_body_tells() -> None:
    limits = load_policy_text(POLICY, "policy.yaml").limits
    costs = {
        route: {check.limit.name: check.cost for check in limits.checks("acme", route, where="authz")}
        for route in ("chat", "search", "")
    }
    assert costs == {
        "chat": {"100/minute": 1, "tokens": 0},
        "search": {"100/minute": 1, "tokens": 5},
        "": {"100/minute": 1, "tokens": 1},
    }
    (charge,) = limits.charges("acme", "chat", 1234, where="authz")
    assert (charge.limit.name, charge.cost, charge.limit.shadow) == ("tokens", 1234, True)
    assert limits.charges("acme", "chat", 0, where="authz") == ()
    assert limits.charges("acme", "chat", 10, where="service") == ()  # enforced in authz


@pytest.mark.parametrize(
    ("body", "complete", "units"),
    [
        (b'{"usage": {"total_tokens": 1500}}', True, 1500),
        (b'{"usage": {"total_tokens": 1500.0}}', True, 1500),
        (b'{"usage": {"total_tokens": 0}}', True, 0),
        (b'{"usage": {"total_tokens": 1.5}}', True, "not_a_count"),
        (b'{"usage": {"total_tokens": -3}}', True, "not_a_count"),
        (b'{"usage": {"total_tokens": true}}', True, "not_a_count"),
        (b'{"usage": {"total_tokens": "12"}}', True, "not_a_count"),
        (b'{"usage": {"total_tokens": Infinity}}', True, "not_a_count"),
        (b'{"usage": {}}', True, "field_missing"),
        (b"[1, 2]", True, "field_missing"),
        (b"<html>oops</html>", True, "not_json"),
        (b'{"usage": {"total_tok', False, "body_truncated"),
    ],
)
def test_units_from_a_json_body(body: bytes, complete: bool, units: int | str) -> None:
    assert units_from_body(body, ("usage", "total_tokens"), complete=complete) == units


def test_list_steps_in_a_field_path_are_indexes() -> None:
    body = b'{"data": [{"tokens": 3}, {"tokens": 4}]}'
    assert units_from_body(body, ("data", "1", "tokens"), complete=True) == 4
    assert units_from_body(body, ("data", "2", "tokens"), complete=True) == "field_missing"


def test_a_chunked_body_over_the_cap_is_not_parsed() -> None:
    hooks = Hooks(usage_from_body=("usage", "total_tokens"), max_body_bytes=40)
    body = b'{"usage": {"total_tokens": 12}}'
    assert units_from_capped_body(body, hooks, complete=True) == 12
    assert units_from_capped_body(body + b" " * 10, hooks, complete=True) == "body_too_large"


def test_bodies_are_read_only_for_successes_under_the_cap() -> None:
    hooks = Hooks(usage_from_body=("usage", "total_tokens"), max_body_bytes=100)
    assert wants_body(hooks, 200, 99) is True
    assert wants_body(hooks, 200, None) is True  # chunked: Envoy's buffer limit caps it
    assert wants_body(hooks, 200, 101) == "body_too_large"
    assert wants_body(hooks, 500, 10) is False  # a failure bills nothing
    assert wants_body(Hooks(), 200, 10) is False
