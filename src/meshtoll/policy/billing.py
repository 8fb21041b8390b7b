"""The policy's names in billing systems: a tenant's `billing:` block and the `meter:` of
plans and routes, validated (billing_accounts, meter_name) and looked up for delivery
(PolicyBillingNames)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from meshtoll.policy.document import FieldPath
from meshtoll.policy.fields import Fields
from meshtoll.policy.limits import HasTenant
from meshtoll.policy.model import BillingAccounts, Policy
from meshtoll.sinks.names import DEFAULT_METERS, Target

# A meter name must be a valid Stripe event_name (at most 100 characters), Lago metric code
# and CloudEvents type alike: this much is safe in all three.
_METER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}")
# Ids are the target's own (cus_..., a Lago external id, an OpenMeter subject key): any
# single-line text (control characters are refused for every string of a policy) of
# reasonable length; Stripe and Lago store at most 255.
MAX_ACCOUNT_LENGTH = 255
# The field of each target in a `billing:` block.
ACCOUNT_FIELDS: dict[Target, str] = {
    "stripe": "stripe_customer",
    "lago": "lago_subscription",
    "openmeter": "openmeter_subject",
}


def billing_accounts(fields: Fields, value: object, path: FieldPath) -> BillingAccounts:
    raw = fields.mapping(value, path, optional=tuple(ACCOUNT_FIELDS.values())) or {}
    found: dict[str, str] = {}
    for key in ACCOUNT_FIELDS.values():
        if key not in raw:
            continue
        text = fields.string(raw[key], (*path, key))
        if text is not None and len(text) > MAX_ACCOUNT_LENGTH:
            fields.problem((*path, key), f"at most {MAX_ACCOUNT_LENGTH} characters, got {len(text)}")
        elif text is not None:
            found[key] = text
    return BillingAccounts(**found)


def meter_name(fields: Fields, value: object, path: FieldPath) -> str | None:
    text = fields.string(value, path)
    if text is not None and not _METER.fullmatch(text):
        fields.problem(
            path,
            f"{text[:40]!r} is not a meter name (up to 100 letters, digits, '.', '_', ':', '/', '-', "
            "as a Stripe event_name, a Lago metric code and a CloudEvents type all allow)",
        )
        return None
    return text


class PolicyBillingNames:
    """BillingNames from a policy: a tenant's `billing:` block (its own name where the block
    names none, or for a tenant that has left the policy), and the route's meter, else the
    plan's, else the target's default."""

    def __init__(self, policy: Policy, tenants: Mapping[str, HasTenant]) -> None:
        """`tenants`: the compiled policy's own index, run-time tenants included."""
        self._tenants = tenants
        self._plan_meters = {name: plan.meter for name, plan in policy.plans.items() if plan.meter}
        self._route_meters = {route.name: route.meter for route in policy.routes if route.meter}

    def account(self, tenant: str, target: Target) -> str:
        compiled = self._tenants.get(tenant)
        accounts = None if compiled is None else compiled.tenant.billing
        found: str | None = None if accounts is None else getattr(accounts, ACCOUNT_FIELDS[target])
        return tenant if found is None else found

    def meter(self, plan: str, route: str, target: Target) -> str:
        return self._route_meters.get(route) or self._plan_meters.get(plan) or DEFAULT_METERS[target]
