"""The billing targets meshtoll delivers to, and how meshtoll's names map to theirs: a
tenant is a customer (Stripe), a subscription (Lago) or a subject (OpenMeter); a request
counts on a meter (Stripe's `event_name`, Lago's billable metric `code`, OpenMeter's
CloudEvents `type`)."""

from __future__ import annotations

from typing import Literal, Protocol

Target = Literal["openmeter", "lago", "stripe"]
TARGETS: tuple[Target, ...] = ("openmeter", "lago", "stripe")
# Stripe's two ways in: the v2 meter event stream (batches), or v1 (one form a call).
StripeApi = Literal["v2", "v1"]
STRIPE_APIS: tuple[StripeApi, ...] = ("v2", "v1")
# The meter a request counts on unless its route or plan names one: what meshtoll's exports
# have always said, so that meters users defined on them keep counting.
DEFAULT_METERS: dict[Target, str] = {
    "openmeter": "io.meshtoll.request",
    "lago": "api_requests",
    "stripe": "api_requests",
}


class BillingNames(Protocol):
    """Where a record goes in a target: the policy's `billing:` blocks (policy/billing.py),
    or the defaults when no policy is at hand."""

    def account(self, tenant: str, target: Target) -> str:
        """The tenant's id in `target`: its customer, subscription or subject."""
        ...

    def meter(self, plan: str, route: str, target: Target) -> str:
        """The meter a request of this plan and route counts on in `target`."""
        ...


class DefaultNames:
    """Every tenant under its own name, every request on the target's default meter."""

    def account(self, tenant: str, target: Target) -> str:
        return tenant

    def meter(self, plan: str, route: str, target: Target) -> str:
        return DEFAULT_METERS[target]
