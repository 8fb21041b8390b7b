"""Limits and the counter checks a decision makes, as plain values shared by the decision
code and every CounterStore."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Algorithm = Literal["fixed_window", "sliding_window", "token_bucket"]
ALGORITHMS: tuple[Algorithm, ...] = ("fixed_window", "sliding_window", "token_bucket")
# What a limit counts: requests, or billable units (a route's cost, or what a body hook
# read from the response, such as an LLM API's tokens).
Counted = Literal["requests", "units"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`requests` per `period` (a PERIODS name). For a token bucket, `requests` per `period`
    is the refill rate and `burst` the capacity (default `requests`). When `counts` is
    "units", `requests` is the number of billable units instead (the policy says `units:`)."""

    requests: int
    period: str
    algorithm: Algorithm = "fixed_window"
    burst: int | None = None
    name: str = ""
    shadow: bool = False  # evaluated and counted, never enforced
    counts: Counted = "requests"

    @property
    def capacity(self) -> int:
        return self.requests if self.burst is None else self.burst


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to evaluate in a decision.

    `key` identifies the counter (stores add the window to it); keys of one tenant carry
    the same Redis hash tag so that one decision's checks live on one shard. `cost` is the
    number of hits to consume; 0 looks without consuming. `lease` is how many hits beyond
    the cost the caller would like to reserve for its later decisions (a token lease, see
    algorithms.lease_grant): the store grants what fits, never more than the limit allows.
    """

    key: str
    limit: RateLimit
    cost: int = 1
    lease: int = 0


@dataclass(frozen=True, slots=True)
class CheckResult:
    allowed: bool  # this limit alone admits the cost (a cost of 0: admits one more hit)
    used: int  # hits counted in the current window (bucket: capacity minus tokens left)
    remaining: int  # hits still admitted before the limit refuses
    reset_seconds: float  # until the window ends (bucket: until it is full again)
    retry_after: float  # until this limit could admit a hit again; 0 when it admits now
    leased: int = 0  # hits reserved beyond the cost (counted in `used`), for the caller's lease


@dataclass(frozen=True, slots=True)
class Increment:
    """One counter as envoyproxy/ratelimit counts it: add `hits` to `key` (the whole key,
    window included) and let it expire `expire_seconds` from now. `limit` matters only
    when counting stops at the limit (STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT)."""

    key: str
    hits: int
    limit: int
    expire_seconds: int


@dataclass(frozen=True, slots=True)
class Unused:
    """Leased hits a process gives back (on shutdown): `hits` of `check`'s counter in the
    window holding the moment of the return. A token bucket takes them back only while its
    TAT is still `bucket_tat_ms`, the value the lease left (nothing took from it since):
    the one case in which a return is exact."""

    check: Check
    hits: int
    bucket_tat_ms: int = 0
