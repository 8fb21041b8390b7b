"""The dashboard's recent refusals per tenant: newest first, bounded per tenant and in tenants."""

from __future__ import annotations

from meshtoll.telemetry.recent_denials import Denial, RecentDenials


def test_a_tenants_refusals_are_kept_newest_first_and_only_the_last_few() -> None:
    denials = RecentDenials(per_tenant=3)
    for second in range(5):
        denials.add("acme", float(second), "/v1/", "rate_limited", f"refusal {second}")
    assert denials.of("acme") == [
        Denial(4.0, "/v1/", "rate_limited", "refusal 4"),
        Denial(3.0, "/v1/", "rate_limited", "refusal 3"),
        Denial(2.0, "/v1/", "rate_limited", "refusal 2"),
    ]
    assert denials.of("nobody") == []


def test_the_tenant_refused_longest_ago_is_forgotten_first() -> None:
    denials = RecentDenials(per_tenant=2, tenants=2)
    denials.add("a", 1.0, "/", "quota_exceeded", "")
    denials.add("b", 2.0, "/", "quota_exceeded", "")
    denials.add("a", 3.0, "/", "quota_exceeded", "")  # a is the most recent again
    denials.add("c", 4.0, "/", "quota_exceeded", "")
    assert [len(denials.of(name)) for name in ("a", "b", "c")] == [2, 0, 1]
