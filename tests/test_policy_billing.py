"""The policy's names in billing systems: a tenant's `billing:` block and the meter of plans
and routes, validated like every field and looked up with their defaults."""

from __future__ import annotations

import pytest

from meshtoll.errors import PolicyError
from meshtoll.policy import load_policy_text

POLICY = """\
plans:
  free: {}
  pro: {meter: pro_requests}
tenants:
  acme:
    plan: pro
    billing: {stripe_customer: cus_NffrFeUfNV2Hib, lago_subscription: sub-acme-2026, openmeter_subject: acme-corp}
  globex:
    plan: free
    billing: {lago_subscription: globex-main}
routes:
  - {prefix: /v1/chat, name: chat, meter: llm_calls}
  - {prefix: /v1/, name: api}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "policy.yaml")
    return [str(problem) for problem in caught.value.problems]


def test_a_tenant_is_named_by_its_billing_block_in_each_target_and_by_its_own_name_elsewhere() -> None:
    names = load_policy_text(POLICY, "policy.yaml").billing
    assert names.account("acme", "stripe") == "cus_NffrFeUfNV2Hib"
    assert names.account("acme", "lago") == "sub-acme-2026"
    assert names.account("acme", "openmeter") == "acme-corp"
    assert names.account("globex", "lago") == "globex-main"
    assert names.account("globex", "stripe") == "globex"
    # A tenant that has left the policy still owes its usage, under its own name.
    assert names.account("gone", "openmeter") == "gone"


def test_the_route_names_the_meter_before_the_plan_and_each_target_keeps_its_default() -> None:
    names = load_policy_text(POLICY, "policy.yaml").billing
    assert names.meter("pro", "chat", "stripe") == "llm_calls"
    assert names.meter("free", "chat", "openmeter") == "llm_calls"
    assert names.meter("pro", "api", "lago") == "pro_requests"
    # Unnamed: what the exports have always said (Lago's metric code, OpenMeter's event type).
    assert names.meter("free", "api", "lago") == "api_requests"
    assert names.meter("free", "api", "stripe") == "api_requests"
    assert names.meter("a plan since removed", "", "openmeter") == "io.meshtoll.request"


def test_bad_billing_blocks_and_meter_names_are_located() -> None:
    text = """\
plans:
  pro: {meter: "two words"}
tenants:
  acme:
    plan: pro
    billing:
      stripe_customer: 42
      lago_subscription: ""
      chargebee_customer: x
  globex:
    plan: pro
    billing: cus_1
routes:
  - {prefix: /v1/, meter: {name: x}}
"""
    assert problems_of(text) == [
        "policy.yaml:2 plans.pro.meter: 'two words' is not a meter name (up to 100 letters, digits, "
        "'.', '_', ':', '/', '-', as a Stripe event_name, a Lago metric code and a CloudEvents type all allow)",
        "policy.yaml:9 tenants.acme.billing.chargebee_customer: unknown field "
        "(expected one of: stripe_customer, lago_subscription, openmeter_subject)",
        "policy.yaml:7 tenants.acme.billing.stripe_customer: expected a non-empty string, got 42",
        "policy.yaml:8 tenants.acme.billing.lago_subscription: expected a non-empty string, got ''",
        "policy.yaml:12 tenants.globex.billing: expected a mapping, got 'cus_1'",
        "policy.yaml:14 routes[0].meter: expected a non-empty string, got a mapping",
    ]


def test_an_id_longer_than_billing_systems_store_is_refused() -> None:
    text = f"plans: {{p: {{}}}}\ntenants:\n  acme: {{plan: p, billing: {{openmeter_subject: {'x' * 256}}}}}\n"
    assert problems_of(text) == [
        "policy.yaml:3 tenants.acme.billing.openmeter_subject: at most 255 characters, got 256"
    ]
