"""The limiter: at most one store round trip per decision (none when token leases serve it),
refusals remembered locally, and the configured failure policy when the store cannot answer."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from meshtoll.counting.limits import Check, CheckResult, Increment, RateLimit
from meshtoll.counting.store import CounterStore, FailureMode
from meshtoll.errors import StorageError
from meshtoll.ratelimit.leases import GrantWait, LeaseBook, Served, Taken
from meshtoll.ratelimit.verdict import ADMITTED_WITHOUT_LIMITS, LimitVerdict, limit_verdict

log = logging.getLogger("meshtoll.ratelimit")

# Admitted without a store answer: the failure policy was "open".
ADMITTED_BLIND = ADMITTED_WITHOUT_LIMITS
_REFUSAL_CACHE_LIMIT = 100_000
_FAILURE_LOG_INTERVAL_SECONDS = 5.0


class Limiter:
    def __init__(
        self,
        store: CounterStore,
        *,
        failure_mode: FailureMode = "open",
        shadow: bool = False,
        lease_max: int = 1,
        refill_mark: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`lease_max` is L, the decisions one token lease covers (ratelimit/leases.py);
        1 asks the store on every decision. No leases in global shadow mode. `refill_mark`:
        LeaseBook's (None: its default; 0: a lease is refilled only once found empty)."""
        self.store = store
        self.failure_mode = failure_mode
        self.shadow = shadow  # global shadow mode: evaluate and count, never refuse
        self._clock = clock
        # Refused counters, until they could admit again: a client hammering a closed limit
        # costs no store traffic until then.
        self._refused_until: dict[tuple[str, RateLimit], float] = {}
        # Decisions by outcome, for /metrics. Not a Counter: Counter defines __delitem__ in
        # Python, so storing an item goes through a Python-level slot and `+= 1` costs about
        # three times a defaultdict's; a decision leases serve counts two outcomes.
        self.outcomes: defaultdict[str, int] = defaultdict(int)
        self._last_failure_log = 0.0
        self._leases = (
            LeaseBook(lease_max, refill=self._refill, refill_mark=refill_mark)
            if lease_max > 1 and not shadow
            else None
        )
        self._refills: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    @property
    def lease_hits(self) -> Counter[str]:
        """Hits leases were "granted" and "returned" (empty without leases), for /metrics."""
        return Counter() if self._leases is None else self._leases.hits

    async def check(self, checks: Sequence[Check]) -> LimitVerdict:
        """The verdict of one decision. Raises StorageUnavailable only under the "closed"
        failure policy; under "open" an unanswered decision is admitted."""
        if not checks:
            return ADMITTED_WITHOUT_LIMITS
        return self._verdict(checks, await self.results(checks))

    def _verdict(self, checks: Sequence[Check], results: list[CheckResult] | None) -> LimitVerdict:
        if results is None:
            return ADMITTED_BLIND
        verdict = limit_verdict(checks, results, enforce=not self.shadow)
        self.outcomes["admitted" if verdict.admitted else verdict.code] += 1
        return verdict

    def check_from_leases(self, checks: Sequence[Check]) -> Served | None:
        """The most restrictive limit of a decision this process's leases alone admit, as
        (limit, remaining, seconds to its reset), without a coroutine or a verdict object
        (the common case with leases); None when `check` must be awaited."""
        if self._leases is None or not checks:
            return None
        now = self._clock()
        if self._refused_until and self._cached_refusal(checks, now) is not None:
            return None
        served = self._leases.serve(checks, now)
        if served is None:
            return None
        outcomes = self.outcomes
        outcomes["admitted_from_lease"] += 1
        outcomes["admitted"] += 1
        return served  # leases serve only enforced limits

    def waiting_for_grants(self, checks: Sequence[Check]) -> GrantWait | None:
        """For a decision `check_from_leases` did not serve: queued for this process's grants
        in flight when every counter it lacks has one (nothing taken, nothing held while it
        waits), else None (`check` decides it). The caller awaits `wait.future`, then takes
        `served_after_wait` (served) or `check_after_wait` (None: woken to ask the store),
        and calls `done_waiting` however it ends. Every decision of 32 connections at L = 16
        waits; awaited by the caller, it needs no coroutine of the limiter's."""
        leases = self._leases
        if leases is None or not checks:
            return None
        now = self._clock()
        if self._refused_until and self._cached_refusal(checks, now) is not None:
            return None
        return leases.queue_for_grants(checks, now)

    def served_after_wait(self, served: Served) -> Served:
        """A decision a grant served while it waited (`waiting_for_grants`), counted; its
        answer is `check_from_leases`'s (most restrictive limit, remaining, seconds to its
        reset): no verdict object."""
        outcomes = self.outcomes
        outcomes["admitted_from_lease"] += 1
        outcomes["admitted"] += 1
        return served

    async def check_after_wait(self, checks: Sequence[Check], wait: GrantWait) -> LimitVerdict:
        """The verdict of a decision woken to ask the store itself. Raises CancelledError
        when the decision's future was cancelled as the store answered: a waiter answered
        through `GrantWait.then` owns that future, its connection closed in that loop turn,
        and its Task's cancellation (a callback away) would land too late to stop the verdict."""
        leases = self._leases
        assert leases is not None  # only a lease book queues decisions
        results = await self._woken_to_ask(checks, leases, wait)
        if wait.future.cancelled():
            raise asyncio.CancelledError  # neither admitted nor counted, as a cancelled Task is
        return self._verdict(checks, results)

    def done_waiting(self, wait: GrantWait) -> None:
        if self._leases is not None:
            self._leases.done_waiting(wait, self._clock())

    async def results(self, checks: Sequence[Check]) -> list[CheckResult] | None:
        """Each check's result, in one store round trip or none at all when a refused
        counter is remembered; None when the store is unavailable under the "open" policy."""
        now = self._clock()
        if self.shadow:
            # Every limit becomes a shadow one, so the store keeps counting past the limit.
            checks = [Check(check.key, _shadow_of(check.limit), check.cost) for check in checks]
        cached = self._cached_refusal(checks, now)
        if cached is not None:
            self.outcomes["refused_from_cache"] += 1
            return cached
        if self._leases is not None:
            return await self._leased_results(checks, self._leases, now)
        try:
            results = await self.store.check(checks, now)
        except StorageError as exc:
            self._store_failed(exc, now)
            return None
        self._remember_refusals(checks, results, now)
        return results

    async def release_leases(self) -> int:
        """Give every unused leased hit back to the store (a stopping process); the number
        given back. Never raises: a lease not given back only under-admits."""
        if self._leases is None:
            return 0
        while self._refills:  # their grants are this process's too
            await asyncio.wait(set(self._refills))
        now = self._clock()
        unused = self._leases.unused(now)
        try:
            returned = await self.store.release(unused, now) if unused else 0
        except StorageError as exc:
            log.warning("unused token leases not given back (%d counters): %s", len(unused), exc)
            return 0
        self._leases.hits["returned"] += returned
        return returned

    def _refill(self, asked: list[Check]) -> None:
        """The lease book's grant request for leases running low: made by a Task of its own,
        so that no decision waits for it."""
        task = asyncio.get_running_loop().create_task(self._refilled(asked))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refilled(self, asked: list[Check]) -> None:
        leases = self._leases
        assert leases is not None  # only a lease book asks for refills
        asked = leases.refill_asked(asked)
        now = self._clock()
        results = None
        try:
            results = await self.store.check(asked, now)
        except StorageError as exc:
            # No decision is refused or admitted on it: the failure policy is for those
            # that find the lease empty and ask the store themselves.
            self._log_failure(exc, now)
        finally:
            leases.refilled(asked, results, now)

    async def _leased_results(
        self, checks: Sequence[Check], leases: LeaseBook, now: float
    ) -> list[CheckResult] | None:
        taken = leases.take(checks, now)
        if taken.complete:
            self.outcomes["admitted_from_lease"] += 1
            return taken.results  # type: ignore[return-value]  # complete: none is None
        # This process's grants for the missing counters are on their way: wait for them
        # (holding no leased hits meanwhile) rather than take a round trip of our own.
        wait = leases.wait_for_grants(checks, taken)
        if wait is None:
            return await self._ask_store(checks, leases, taken, None, now)
        try:
            served = await wait.future
            if served is not None:
                assert isinstance(served, list)  # `wait_for_grants` queues for a result per check
                self.outcomes["admitted_from_lease"] += 1
                return served
            return await self._woken_to_ask(checks, leases, wait)
        finally:
            leases.done_waiting(wait, self._clock())

    async def _woken_to_ask(
        self, checks: Sequence[Check], leases: LeaseBook, wait: GrantWait
    ) -> list[CheckResult] | None:
        now = self._clock()
        taken = leases.take(checks, now)
        if taken.complete:
            self.outcomes["admitted_from_lease"] += 1
            return taken.results  # type: ignore[return-value]  # complete: none is None
        return await self._ask_store(checks, leases, taken, wait, now)

    async def _ask_store(
        self, checks: Sequence[Check], leases: LeaseBook, taken: Taken, wait: GrantWait | None, now: float
    ) -> list[CheckResult] | None:
        asked = leases.asking(checks, taken, wait)
        results = None
        try:
            results = await self.store.check(asked, now)
        except StorageError as exc:
            self._store_failed(exc, now)  # raises under the "closed" policy
            return None
        finally:
            if results is None or not _admitted(asked, results):
                leases.put_back(taken)  # a refused decision takes from no limit
            leases.answered(asked, results, now)
        self._remember_refusals(asked, results, now)
        return _merged(taken, asked, results)

    def now(self) -> float:
        return self._clock()

    async def counts(
        self, increments: Sequence[Increment], now: float, *, stop_when_over: bool = False
    ) -> list[int] | None:
        """envoyproxy/ratelimit's counting (CounterStore.increment) under the failure policy:
        None when the store is unavailable and the policy is "open"."""
        try:
            return await self.store.increment(increments, now, stop_when_over=stop_when_over)
        except StorageError as exc:
            self._store_failed(exc, now)
            return None

    def _cached_refusal(self, checks: Sequence[Check], now: float) -> list[CheckResult] | None:
        if self.shadow or not self._refused_until:
            return None
        refused = False
        results = []
        for check in checks:
            until = self._refused_until.get((check.key, check.limit))
            if until is not None and until > now and not check.limit.shadow:
                refused = True
                results.append(CheckResult(False, check.limit.capacity, 0, until - now, until - now))
            else:
                # Not asked: the request is refused without a store round trip either way.
                results.append(CheckResult(True, 0, check.limit.capacity, 0.0, 0.0))
        return results if refused else None

    def _remember_refusals(self, checks: Sequence[Check], results: Sequence[CheckResult], now: float) -> None:
        for check, result in zip(checks, results, strict=True):
            # Only a limit with nothing left, refusing a single hit: then no request of this
            # counter can pass before retry_after, whatever its cost.
            exhausted = result.remaining == 0 and check.cost <= 1
            if exhausted and not result.allowed and result.retry_after > 0 and not check.limit.shadow:
                if len(self._refused_until) >= _REFUSAL_CACHE_LIMIT:
                    self._refused_until = {key: t for key, t in self._refused_until.items() if t > now}
                self._refused_until[(check.key, check.limit)] = now + result.retry_after

    def _store_failed(self, exc: StorageError, now: float) -> None:
        self.outcomes[f"store_unavailable_{self.failure_mode}"] += 1
        self._log_failure(exc, now)
        if self.failure_mode == "closed":
            raise exc

    def _log_failure(self, exc: StorageError, now: float) -> None:
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL_SECONDS:
            self._last_failure_log = now
            log.warning("rate-limit store unavailable (failure policy %s): %s", self.failure_mode, exc)


def _admitted(checks: Sequence[Check], results: Sequence[CheckResult]) -> bool:
    # The store's own rule (CounterStore.check): every enforced check admits its cost.
    return all(result.allowed or check.limit.shadow for check, result in zip(checks, results, strict=True))


def _merged(taken: Taken, asked: Sequence[Check], answers: Sequence[CheckResult]) -> list[CheckResult]:
    """Each check's result, from its lease or from the store. A fresh grant is this
    process's to spend: its hits count as remaining, as they do while a lease is spent."""
    found = iter(zip(asked, answers, strict=True))
    results = []
    for served in taken.results:
        if served is None:
            _, answer = next(found)
            if answer.leased:
                # Built directly: dataclasses.replace reads the fields' list on every call.
                answer = CheckResult(
                    answer.allowed, answer.used - answer.leased, answer.remaining + answer.leased,
                    answer.reset_seconds, answer.retry_after, answer.leased,
                )  # fmt: skip
            served = answer
        results.append(served)
    return results


@functools.cache
def _shadow_of(limit: RateLimit) -> RateLimit:
    return dataclasses.replace(limit, shadow=True)
