"""Which limits a request meets, and what their results mean for it. Pure: no store."""

from __future__ import annotations

from datetime import UTC, datetime

from meshtoll.counting.limits import Check, CheckResult, RateLimit
from meshtoll.counting.periods import previous_window, window
from meshtoll.policy import load_policy_text
from meshtoll.ratelimit.verdict import limit_verdict

PER_SECOND = RateLimit(5, "second", name="burst")
PER_MONTH = RateLimit(1000, "month", name="monthly")

POLICY = """
ratelimit: {enforced_in: authz}
plans:
  free: {limits: [{requests: 5, per: second}, {requests: 1000, per: month, name: monthly}]}
tenants:
  acme: {plan: free}
  vip: {plan: free, limits: [{requests: 100, per: second, algorithm: token_bucket, burst: 200}]}
routes:
  - {prefix: /v1/search, name: search, limits: [{requests: 1, per: second}]}
  - {prefix: /v1/export, name: export, enforced_in: service, limits: [{requests: 1, per: hour}]}
"""


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


def test_fixed_periods_align_to_the_epoch_and_months_to_the_utc_calendar() -> None:
    assert window("minute", 125.5) == (120, 180)
    assert window("month", utc(2026, 11, 30, 23, 59, 59)) == (utc(2026, 11, 1), utc(2026, 12, 1))
    assert window("month", utc(2026, 12, 31, 12)) == (utc(2026, 12, 1), utc(2027, 1, 1))
    assert window("year", utc(2028, 2, 29)) == (utc(2028, 1, 1), utc(2029, 1, 1))
    assert previous_window("month", utc(2026, 3, 10)) == (utc(2026, 2, 1), utc(2026, 3, 1))


def test_plan_limits_and_route_limits_apply_where_they_are_enforced() -> None:
    limits = load_policy_text(POLICY, "p.yaml").limits
    search = limits.checks("acme", "search", where="authz")
    assert [check.limit.name for check in search] == ["5/second", "monthly", "1/second"]
    assert {check.key.split("_", 2)[1] for check in search} == {"{acme}"}  # one hash tag: one shard
    assert limits.checks("acme", "search", where="service") == ()
    # The export route is counted by the rate-limit service, never twice.
    assert limits.checks("acme", "export", where="authz") == ()
    assert [check.limit.name for check in limits.checks("acme", "export", where="service")] == [
        "5/second",
        "monthly",
        "1/hour",
    ]


def test_a_tenant_override_replaces_the_plan_limits() -> None:
    limits = load_policy_text(POLICY, "p.yaml").limits
    (check,) = limits.checks("vip", "", where="authz")
    assert (check.limit.algorithm, check.limit.capacity) == ("token_bucket", 200)


def result(allowed: bool, remaining: int, reset: float, retry: float = 0.0) -> CheckResult:
    return CheckResult(allowed, 0, remaining, reset, retry)


def test_the_most_restrictive_limit_fills_the_ratelimit_headers() -> None:
    checks = [Check("a", PER_SECOND), Check("b", PER_MONTH)]
    verdict = limit_verdict(checks, [result(True, 4, 0.4), result(True, 2, 86000)])
    assert verdict.admitted
    assert dict(verdict.headers) == {
        "ratelimit-limit": "1000",
        "ratelimit-remaining": "2",
        "ratelimit-reset": "86000",
    }


def test_a_refused_quota_says_quota_exceeded_with_retry_after() -> None:
    checks = [Check("a", PER_SECOND), Check("b", PER_MONTH)]
    verdict = limit_verdict(checks, [result(True, 4, 0.4), result(False, 0, 86000, 86000)])
    assert (verdict.admitted, verdict.code) == (False, "quota_exceeded")
    assert dict(verdict.headers)["retry-after"] == "86000"


def test_a_refused_rate_limit_says_rate_limited_and_shadow_limits_never_refuse() -> None:
    shadow = RateLimit(1, "second", name="trial", shadow=True)
    refused = limit_verdict([Check("a", PER_SECOND)], [result(False, 0, 0.3, 0.3)])
    assert (refused.admitted, refused.code) == (False, "rate_limited")
    assert dict(refused.headers)["retry-after"] == "1"
    assert limit_verdict([Check("s", shadow)], [result(False, 0, 0.3, 0.3)]).admitted
    assert limit_verdict([Check("a", PER_SECOND)], [result(False, 0, 0.3, 0.3)], enforce=False).admitted
