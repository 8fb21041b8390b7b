"""The authz service shared by both transports: the live policy, the JWKS cache, a clock and,
for routes whose limits are enforced in the authz call itself (the fused path), the limiter.

`check` answers synchronously when no counter is involved, and with an awaitable when the
limiter has to ask the store: the common no-limit path never pays for a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from meshtoll.authz.decide import decide
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Verdict
from meshtoll.counting.limits import Check
from meshtoll.errors import StorageError
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.verdict import RateLimitState, allowed_state
from meshtoll.telemetry.metrics import DecisionCounts
from meshtoll.telemetry.recent_denials import RecentDenials
from meshtoll.usage.records import Admission

if TYPE_CHECKING:
    from meshtoll.policy import CompiledPolicy
    from meshtoll.ratelimit.leases import GrantWait, Served, Woken
    from meshtoll.ratelimit.limiter import Limiter
    from meshtoll.ratelimit.verdict import LimitVerdict
    from meshtoll.usage.recorder import AdmissionRecorder

log = logging.getLogger("meshtoll.authz")
_new_tuple = tuple.__new__
T = TypeVar("T")

SHUTTING_DOWN = Deny(503, "shutting_down", "this meshtoll process is stopping; retry")
LIMITS_UNAVAILABLE = Deny(
    503, "ratelimit_unavailable", "limits cannot be checked right now and the failure policy is closed"
)


class Authorizer:
    """One per transport, so that decisions are counted by the transport that asked."""

    def __init__(
        self,
        policy: PolicyHolder,
        jwks: JwksCache,
        *,
        transport: str = "direct",
        counts: DecisionCounts | None = None,
        tenant_counts: MutableMapping[tuple[str, str], int] | None = None,
        limiter: Limiter | None = None,
        recorder: AdmissionRecorder | None = None,
        denials: RecentDenials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tenant_counts`: decisions by (tenant, outcome), only when per-tenant metrics are
        asked for (--metrics-tenant-labels): allows and limit refusals, the decisions that
        know their tenant; `denials`: where limit refusals are kept by tenant for the dashboard."""
        self._policy = policy
        self._jwks = jwks
        self._transport = transport
        self._counts = (counts or DecisionCounts()).counts
        self._allowed = (transport, "allow")  # its key in `_counts`, built once
        self._tenant_counts = tenant_counts
        self._limiter = limiter
        self._recorder = recorder
        self._denials = denials
        self._clock = clock
        self._admitting = True
        self._warned_no_request_id = False

    def stop_admitting(self) -> None:
        """From now on refuse every request (503): a process that is stopping must not admit
        a request after its last admissions have been handed to the store."""
        self._admitting = False

    def check(self, request: CheckRequest) -> Verdict | Awaitable[Verdict]:
        if not self._admitting:
            return SHUTTING_DOWN
        policy = self._policy.current
        verdict = decide(request, policy, self._jwks.key_sets, self._clock())
        if isinstance(verdict, Allow) and self._limiter is not None:
            checks = policy.limits.checks(verdict.tenant, verdict.route, where="authz")
            if checks:
                leased = self._limiter.check_from_leases(checks)
                if leased is not None:  # no store call: answered without a coroutine
                    state = allowed_state(policy.policy.ratelimit.headers, *leased)
                    return self._counted(request, _with_headers(verdict, state), policy)
                wait = self._limiter.waiting_for_grants(checks)
                if wait is not None:
                    return PendingDecision(self, request, verdict, checks, self._limiter, policy, wait)
                return self._limited(request, verdict, checks, self._limiter, policy)
        return self._counted(request, verdict, policy)

    async def _waited(
        self,
        request: CheckRequest,
        allow: Allow,
        checks: Sequence[Check],
        limiter: Limiter,
        policy: CompiledPolicy,
        wait: GrantWait,
    ) -> Verdict:
        """A decision waiting for this process's grants in flight, awaited (a PendingDecision
        not `answered`): one frame to resume rather than the limiter's four (each waiter is
        resumed once). Served, it has nothing left to give back (`done_waiting` is for one
        woken to ask the store, or cancelled once woken: it may hold counters reserved for it)."""
        try:
            served = await wait.future
        except BaseException:
            limiter.done_waiting(wait)
            raise
        if served is None:
            return await self._asked_after_wait(request, allow, checks, limiter, policy, wait)
        assert isinstance(served, tuple)  # `waiting_for_grants` queues for `serve`'s answer
        return self._served_after_wait(request, allow, limiter, policy, served)

    def _served_after_wait(
        self, request: CheckRequest, allow: Allow, limiter: Limiter, policy: CompiledPolicy, served: Served
    ) -> Verdict:
        """A waiting decision a grant served: answered as a decision leases serve at once is."""
        state = allowed_state(policy.policy.ratelimit.headers, *limiter.served_after_wait(served))
        return self._counted(request, _with_headers(allow, state), policy)

    async def _asked_after_wait(
        self,
        request: CheckRequest,
        allow: Allow,
        checks: Sequence[Check],
        limiter: Limiter,
        policy: CompiledPolicy,
        wait: GrantWait,
    ) -> Verdict:
        """A waiting decision woken to ask the store itself; its turn given back however it ends."""
        try:
            limits = await limiter.check_after_wait(checks, wait)
        except StorageError:
            return self._counted(request, LIMITS_UNAVAILABLE, policy)
        finally:
            limiter.done_waiting(wait)
        return self._answer(request, allow, limits, policy)

    async def _limited(
        self,
        request: CheckRequest,
        allow: Allow,
        checks: Sequence[Check],
        limiter: Limiter,
        policy: CompiledPolicy,
    ) -> Verdict:
        try:
            limits = await limiter.check(checks)
        except StorageError:
            return self._counted(request, LIMITS_UNAVAILABLE, policy)
        return self._answer(request, allow, limits, policy)

    def _answer(
        self, request: CheckRequest, allow: Allow, limits: LimitVerdict, policy: CompiledPolicy
    ) -> Verdict:
        if limits.admitted:
            state = None
            if limits.deciding is not None:
                check, result = limits.deciding
                when = policy.policy.ratelimit.headers
                state = allowed_state(when, check.limit, result.remaining, result.reset_seconds)
            return self._counted(request, _with_headers(allow, state), policy)
        assert limits.deciding is not None
        if self._tenant_counts is not None:
            self._tenant_counts[(allow.tenant, limits.code)] += 1
        name = limits.deciding[0].limit.name
        message = (
            f"the quota {name!r} is used up"
            if limits.code == "quota_exceeded"
            else f"the rate limit {name!r} is exceeded"
        )
        if self._denials is not None:
            self._denials.add(allow.tenant, self._clock(), allow.route, limits.code, message)
        return self._counted(request, Deny(429, limits.code, message, limits.headers), policy)

    def _counted(self, request: CheckRequest, verdict: Verdict, policy: CompiledPolicy) -> Verdict:
        """Count the decision and, for an allow, record its admission: by the policy version
        that decided it (one snapshot per decision)."""
        if isinstance(verdict, Deny):
            self._counts[(self._transport, verdict.code)] += 1
            return verdict
        self._counts[self._allowed] += 1
        if self._tenant_counts is not None:
            self._tenant_counts[(verdict.tenant, "allow")] += 1
        if self._recorder is not None:
            if request.request_id:
                self._recorder.admit(self._admission(request, verdict, policy))
            elif not self._warned_no_request_id:
                # Nothing can settle or bill an admission without an id: the gateway must
                # send x-request-id (allowed_headers / includeRequestHeadersInCheck).
                self._warned_no_request_id = True
                log.warning(
                    "%s authz admitted a request without x-request-id: it cannot be billed; "
                    "make the gateway send x-request-id to meshtoll",
                    self._transport,
                )
        return verdict

    def _admission(self, request: CheckRequest, allow: Allow, policy: CompiledPolicy) -> Admission:
        """What the meter bills this request by: every metered access-log record must settle
        an admission, so every admitted request of every tenant has one."""
        route = allow.route
        return Admission(
            request.request_id, self._clock(), allow.tenant, allow.consumer, allow.plan, route,
            request.method, policy.route_costs.get(route, 1), route in policy.body_metered_routes,
        )  # fmt: skip


class PendingDecision:
    """An allowed decision waiting for this process's grants in flight (`check`'s answer
    when the limiter queued it). Awaited, it is the decision's verdict. `answered(respond)`
    instead is a future of `respond(verdict)`, settled from the lease book's own call when
    a grant serves the decision: no Task, no coroutine for the waiters a grant serves, which
    at 32 connections and L = 16 are nearly every fused decision. Only one woken to ask the
    store gets a Task, which the future's cancellation (its connection closed) cancels, so
    that its turn is given back."""

    __slots__ = ("_allow", "_authorizer", "_checks", "_limiter", "_policy", "_request", "_respond", "_wait")

    def __init__(
        self,
        authorizer: Authorizer,
        request: CheckRequest,
        allow: Allow,
        checks: Sequence[Check],
        limiter: Limiter,
        policy: CompiledPolicy,
        wait: GrantWait,
    ) -> None:
        self._authorizer = authorizer
        self._request = request
        self._allow = allow
        self._checks = checks
        self._limiter = limiter
        self._policy = policy
        self._wait = wait
        self._respond: Callable[[Verdict], object] | None = None

    def __await__(self) -> Generator[Any, None, Verdict]:
        waited = self._authorizer._waited(
            self._request, self._allow, self._checks, self._limiter, self._policy, self._wait
        )
        return waited.__await__()

    def answered(self, respond: Callable[[Verdict], T]) -> asyncio.Future[T]:
        """A future of `respond(verdict)`; what `respond` raises is its exception. Called
        at once (before the loop turns: no grant can serve the decision before then), and
        instead of awaiting."""
        self._respond = respond
        self._wait.then = self._woken
        return self._wait.future

    def _woken(self, served: Woken) -> None:
        """The lease book's call: served from a grant, or (None) to ask the store itself."""
        if served is None:
            task = asyncio.get_running_loop().create_task(self._ask())
            self._wait.future.add_done_callback(partial(self._closed, task))
            return
        assert isinstance(served, tuple)  # `waiting_for_grants` queues for `serve`'s answer
        assert self._respond is not None  # `answered` set it before the decision could wake
        wait = self._wait
        # Called once: the wait no longer holds this object through its bound method, a
        # cycle only the garbage collector frees (kept, it made half as many collections
        # again and cost 183,028 instructions per decision against 178,543).
        wait.then = None
        verdict = self._authorizer._served_after_wait(
            self._request, self._allow, self._limiter, self._policy, served
        )
        wait.future.set_result(self._respond(verdict))

    @staticmethod
    def _closed(task: asyncio.Task[None], future: asyncio.Future[Any]) -> None:
        """Its connection closed while it asked the store: the Task stops, and what was
        reserved for it goes to the next waiter (`_asked_after_wait`'s `finally`: the Task's
        first step was scheduled before this callback, so it is in that `try` by now)."""
        if future.cancelled():
            task.cancel()

    async def _ask(self) -> None:
        wait = self._wait
        future = wait.future
        assert self._respond is not None  # `answered` set it before the decision could wake
        try:
            verdict = await self._authorizer._asked_after_wait(
                self._request, self._allow, self._checks, self._limiter, self._policy, wait
            )
            answer = self._respond(verdict)
        except asyncio.CancelledError:
            future.cancel()  # its future was cancelled first, or the loop is stopping
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        finally:
            wait.then = None  # as in `_woken`; `done_waiting` has run (`_asked_after_wait`)
        if not future.done():
            future.set_result(answer)


def _with_headers(allow: Allow, state: RateLimitState | None) -> Allow:
    """`allow` with the RateLimit headers for the client, if any."""
    if state is None:
        return allow
    # Built by tuple.__new__ itself: _replace goes through a dict of the fields, and a named
    # tuple's constructor is a Python function around the same call.
    tenant, plan, consumer, route, headers, remove_headers, metadata, _, remove_query_params = allow
    return _new_tuple(
        Allow, (tenant, plan, consumer, route, headers, remove_headers, metadata, state, remove_query_params)
    )
