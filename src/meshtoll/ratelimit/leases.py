"""Token leases: hits the counter store reserved for this process, spent in memory.

A lease is granted with an admitted decision (`Check.lease`, `CheckResult.leased`): the
store consumed the grant with the cost, only if it fitted under the limit, so spending it
here never lets a limit overshoot. Each counter has at most one lease, and at most one
request for a new grant is in flight per counter.

A lease is refilled before it runs out: far from its limit (8 grants or more left at its
grant), a decision that leaves it at its refill mark m (by default a grant's worth, L - 1
decisions' hits) starts the next grant's request in the background, and decisions go on
being served from what is left while it is in flight. No decision needs the store then, so
the request asks for a check's cost and more and keeps all of it: the store's check takes
the cost and the grant under the limit as for a decision (no script of its own, the same
grant rule), and the cost, which no decision spends, is a lease hit too. It asks, when it
is sent, for what the lease lacks to hold L - 1 + m decisions' hits, so a process holds at
most that per counter: with the default mark, a lease plus a grant. Near the limit a lease
is not refilled early, so that what a process holds back there stays one grant at most.

A decision that finds the grants it needs in flight waits for them rather than asking the
store itself (with 32 connections at L = 16, asking instead saved only a third of the round
trips, measured). Waiting decisions queue in arrival order and a grant's arrival serves
them from it, each woken once with its results; the first one the grants in flight cannot
serve is woken to ask the store itself, the counters it lacks reserved for it, so that those
behind it wait for its grant instead of all asking at once. (Waking every waiter to race
for each grant cost about three wake-ups per decision at 32 connections.) A decision is
served from leases alone when every one of its checks has a lease with hits for it;
otherwise the checks without one go to the store, and the hits of the others are set aside
first and put back when the store refuses: a decision still takes from every limit or from
none. (A refill is no decision: the store takes all of its checks or none, and nothing is
admitted or refused on its answer.)

A window's lease ends with its window (its hits expire with the counter). A token bucket's
lease is spent token by token, each no later than the moment the bucket would have
admitted it had it been taken one by one, its "slot": a token used later than its slot
would let a burst pass the bucket's capacity, so an unused lease past its slot is dropped.
A grant that lands while the lease still has tokens puts them in front of its own, each
kept no later than its slot.

Not for month and year quotas: a crashed process would hold a month's hits until the month
ends, and quota and invoice views should show exactly what was admitted.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshtoll.counting.algorithms import LEASE_SHARE, bucket_interval_ms
from meshtoll.counting.limits import Check, CheckResult, RateLimit, Unused
from meshtoll.counting.periods import QUOTA_PERIODS


@dataclass(slots=True)
class Lease:
    limit: RateLimit
    hits: int  # reserved in the store, not yet used by a decision
    deadline_ms: int  # the next hit may be used before then (window end; bucket: its slot)
    step_ms: int  # a token bucket's emission interval: each hit used moves the deadline; 0
    remaining: int  # what the store said the limit had left at the grant, the grant counted as used
    reset_at: float  # when the window ends (a bucket: when it would be full), as of the grant
    bucket_tat_ms: int  # a token bucket's TAT after the grant, for an exact return; 0
    # A decision leaving `hits` at or below this starts the next grant's request; -1: none.
    refill_at: int = -1

    @classmethod
    def granted(cls, check: Check, result: CheckResult, now: float, *, spare: int = 0) -> Lease:
        """The lease of `result.leased` hits, plus `spare` hits of the cost the store took
        that no decision spends (a refill's: see `LeaseBook.refilled`)."""
        now_ms = int(now * 1000)
        ends_ms = now_ms + round(result.reset_seconds * 1000)
        reset_at = now + result.reset_seconds
        hits = result.leased + spare
        if check.limit.algorithm != "token_bucket":
            return cls(check.limit, hits, ends_ms, 0, result.remaining, reset_at, 0)
        interval = bucket_interval_ms(check.limit)
        # ends_ms is the TAT after cost + grant, the last leased token's slot; the first one's
        # is `hits - 1` intervals before, and it may be used until one interval before it.
        deadline = ends_ms - hits * interval + 1
        return cls(check.limit, hits, deadline, interval, result.remaining, reset_at, ends_ms)

    def take(self, cost: int, now_ms: int) -> bool:
        if self.hits < cost or now_ms >= self.deadline_ms:
            return False
        self.hits -= cost
        self.deadline_ms += cost * self.step_ms
        return True

    def put_back(self, cost: int) -> None:
        self.hits += cost
        self.deadline_ms -= cost * self.step_ms

    def result(self, now: float) -> CheckResult:
        """This limit's answer to a decision served from the lease. Remaining counts this
        process's unused lease as still available (other processes' as used)."""
        remaining = self.remaining + self.hits
        reset = max(0.0, self.reset_at - now)
        return CheckResult(True, self.limit.capacity - remaining, remaining, reset, 0.0)


@dataclass(slots=True)
class Taken:
    """What a decision took from leases: a result per check (None: not served from a
    lease), and the leases to put back to should the decision be refused."""

    results: list[CheckResult | None]
    leases: list[tuple[Lease, int]]

    @property
    def complete(self) -> bool:
        return len(self.leases) == len(self.results)


# What `LeaseBook.serve` answers for a decision leases serve: the limit that speaks for it,
# what it has left and the seconds to its reset.
Served = tuple[RateLimit, int, float]


# What a waiting decision is woken with: its results, served from the grants (their hits
# taken), or None: ask the store.
Woken = list[CheckResult] | Served | None


@dataclass(slots=True, eq=False)
class GrantWait:
    """A decision waiting for grants in flight. Its future is resolved with the decision's
    results, served from the grants (their hits taken), or with None: ask the store, for the
    counters reserved for it (`reserved`) and whatever else it lacks. With `alone`, served
    is `serve`'s answer instead of a result per check (no CheckResult, a frozen dataclass,
    per limit).

    With `then`, the answer goes to `then` instead, called as the decision is woken, and the
    future is the caller's, which `then` (or what it starts) settles with its own result:
    a transport answers from the lease book's call, without a Task to await the future.
    Either way the future done while the decision is queued means it was cancelled."""

    checks: Sequence[Check]
    future: asyncio.Future[Any]  # of `Woken`; with `then`, of what the caller answers
    reserved: set[str] = field(default_factory=set)
    alone: bool = False
    then: Callable[[Woken], None] | None = None


class LeaseBook:
    """The leases of one process, per counter key. `lease_max` is L: a grant covers at most
    L - 1 decisions beyond the one that asked for it."""

    def __init__(
        self,
        lease_max: int,
        *,
        refill: Callable[[list[Check]], None] | None = None,
        refill_mark: int | None = None,
    ) -> None:
        """`refill` is called with the checks of a grant request to make in the background
        (a lease ran low, no decision needs the store), sized by `refill_asked` when it is
        sent, whose answer goes to `refilled`;
        without it a lease is refilled only when a decision finds it empty. A lease is
        refilled once a decision leaves it at `refill_mark` decisions' hits or fewer: by
        default a grant's, L - 1 (measured against a quarter and a half of it: through
        Envoy at 32 connections, the fewest decisions waiting and store calls; 0: only
        when empty)."""
        self.lease_max = lease_max
        self._refill = refill
        self._refill_mark = lease_max - 1 if refill_mark is None else refill_mark
        # For /metrics: hits "granted" by the store and "returned" to it by a stopping process
        # (the decisions leases served are the limiter's admitted_from_lease).
        self.hits: Counter[str] = Counter()
        self._leases: dict[str, Lease] = {}
        # Counters with a grant in flight, or reserved for a waiter woken to ask for one: by
        # whom (the waiter), None when a store call is under way.
        self._asking: dict[str, GrantWait | None] = {}
        self._waiting: deque[GrantWait] = deque()

    def serve(self, checks: Sequence[Check], now: float) -> Served | None:
        """When leases serve every check: their hits taken, and the limit that speaks for the
        decision as (limit, remaining, seconds to its reset), the one `most_restrictive`
        picks (fewest left; on a tie the later reset); otherwise None and nothing taken. The
        fast path of `take`: no result object per check."""
        now_ms = int(now * 1000)
        leases = self._leases
        best: Served | None = None
        low = False
        for index, check in enumerate(checks):
            lease = leases.get(check.key)
            cost = check.cost
            # `Lease.take` and `_same` written out: two calls fewer per check on the path
            # every leased decision takes.
            if (
                lease is None
                or (lease.limit is not check.limit and lease.limit != check.limit)
                or lease.hits < cost
                or now_ms >= lease.deadline_ms
            ):
                for done in checks[:index]:
                    leases[done.key].put_back(done.cost)
                return None
            hits = lease.hits = lease.hits - cost
            if lease.step_ms:
                lease.deadline_ms += cost * lease.step_ms
            if hits <= lease.refill_at:
                low = True
            remaining = lease.remaining + hits
            reset = lease.reset_at - now
            # `most_restrictive`'s order among admitting limits: fewest left, on a tie the later reset.
            if best is None or remaining < best[1] or (remaining == best[1] and reset > best[2]):
                best = (lease.limit, remaining, reset if reset > 0.0 else 0.0)
        if low:
            self._start_refill(checks)
        return best

    def take(self, checks: Sequence[Check], now: float) -> Taken:
        """Each check's hits from its lease where it has them. A decision `take` serves
        completely may start refills, as one `serve` serves does."""
        now_ms = int(now * 1000)
        taken = Taken([], [])
        low = False
        for check in checks:
            lease = self._leases.get(check.key)
            if lease is not None and _same(lease.limit, check.limit) and lease.take(check.cost, now_ms):
                taken.leases.append((lease, check.cost))
                taken.results.append(lease.result(now))
                if lease.hits <= lease.refill_at:
                    low = True
            else:
                taken.results.append(None)
        if low and taken.complete:
            self._start_refill(checks)
        return taken

    def wait_for_grants(self, checks: Sequence[Check], taken: Taken) -> GrantWait | None:
        """When every check `taken` did not serve has a grant in flight: queue the decision
        for them, its hits put back (a waiting decision holds none); None when it is not worth
        waiting (the store is asked anyway)."""
        if not self._missing_in_flight(checks, taken):
            return None
        self.put_back(taken)
        wait = GrantWait(checks, asyncio.get_running_loop().create_future())
        self._waiting.append(wait)
        return wait

    def queue_for_grants(self, checks: Sequence[Check], now: float) -> GrantWait | None:
        """`wait_for_grants` for a decision known not to be served from leases, found without
        taking a hit: queued when every counter it lacks has a grant in flight, else None.
        Its `then` may be set once it is returned: no decision is woken before the loop turns."""
        if not self._still_waiting(checks, int(now * 1000)):
            return None
        wait = GrantWait(checks, asyncio.get_running_loop().create_future(), alone=True)
        self._waiting.append(wait)
        return wait

    def asking(self, checks: Sequence[Check], taken: Taken, wait: GrantWait | None = None) -> list[Check]:
        """The checks the store must answer: those not served from a lease, each asking for
        a grant when it may be leased and no other request for its counter is in flight (or
        when the counter was reserved for `wait`).

        A window lease running low (less than half a grant left, far from its limit) is
        topped up in the same round trip: its hit is put back (`taken` no longer holds it)
        and the store is asked for the decision's cost and enough to fill it to L - 1 again.
        Without it a decision's leases, granted together, drift apart (a second's ends with
        its window, a day's does not) and each runs out on a decision of its own: about
        one store call in 10 decisions instead of one in 15 with two limits at L = 16."""
        asked = []
        for index, (check, served) in enumerate(zip(checks, taken.results, strict=True)):
            key = check.key
            if served is not None:
                low = self._running_low(check)
                if low is not None:
                    low.put_back(check.cost)  # the store serves this check instead
                    taken.leases = [(held, cost) for held, cost in taken.leases if held is not low]
                    taken.results[index] = None
                    self._asking[key] = None
                    fill = (self.lease_max - 1) * check.cost - low.hits
                    asked.append(Check(key, check.limit, check.cost, fill))
                continue
            if self._leasable(check) and (
                key not in self._asking or (wait is not None and key in wait.reserved)
            ):
                self._asking[key] = None
                if wait is not None:
                    wait.reserved.discard(key)
                check = Check(key, check.limit, check.cost, (self.lease_max - 1) * check.cost)
            asked.append(check)
        return asked

    def answered(self, asked: Sequence[Check], results: Sequence[CheckResult] | None, now: float) -> None:
        """The store's answer to `asked` (None: no answer): keep the grants, then serve the
        waiting decisions from them."""
        for check in asked:
            if check.lease > 0:
                self._asking.pop(check.key, None)
        if results is not None:
            for check, result in zip(asked, results, strict=True):
                if result.leased > 0:
                    self.hits["granted"] += result.leased
                    self._keep(check, Lease.granted(check, result, now), now)
        self._serve_waiting(now, store_failed=results is None)

    def refilled(self, asked: Sequence[Check], results: Sequence[CheckResult] | None, now: float) -> None:
        """The store's answer to a refill (`refill`'s checks; None: no answer). The store took
        every check's cost and grant or, one of them refusing, nothing: each check's cost is
        then a lease hit too (no decision spent it), joined to what is left of its lease."""
        for check in asked:
            self._asking.pop(check.key, None)
        if results is not None and all(result.allowed for result in results):
            for check, result in zip(asked, results, strict=True):
                self.hits["granted"] += result.leased + check.cost
                self._keep(check, Lease.granted(check, result, now, spare=check.cost), now)
        self._serve_waiting(now, store_failed=results is None)

    def _start_refill(self, checks: Sequence[Check]) -> None:
        """Ask, in the background, for the next grant of each of these checks whose lease a
        served decision left at its refill mark, and of those within half a grant of their
        mark (a decision's leases, refilled together, run out together: a second's lease
        that began with its window otherwise drifts from a day's, and each then costs a
        request of its own), unless a grant for it is already in flight. One request for
        all of them, the decision's own checks: `refill_asked` sizes each when the request
        is sent. Each lease asks once; the lease the grant makes sets its own mark."""
        assert self._refill is not None  # no refill mark is set without it
        grant = self.lease_max - 1
        asked = []
        for check in checks:
            lease = self._leases[check.key]
            if lease.refill_at < 0 or 2 * (lease.hits - lease.refill_at) > grant * check.cost:
                continue
            lease.refill_at = -1
            if check.key in self._asking:
                continue
            self._asking[check.key] = None
            asked.append(check)
        if asked:
            self._refill(asked)

    def refill_asked(self, asked: Sequence[Check]) -> list[Check]:
        """`asked` (a refill `refill` was called with) as it is sent, the only place it is
        sized: each lease asked up to L - 1 + m decisions' hits (m the mark: L - 1 for a
        lease at its mark) from what it has now, the cost included. Decisions spent from it
        between (32 connections spend a grant within a turn of the loop) are asked for too,
        so the grant keeps up with them; never more held than L - 1 + m decisions' hits."""
        full = self.lease_max - 1 + self._refill_mark
        sent = []
        for check in asked:
            lease = self._leases.get(check.key)
            hits = 0 if lease is None else lease.hits
            sent.append(
                Check(check.key, check.limit, check.cost, max(0, full * check.cost - hits - check.cost))
            )
        return sent

    def done_waiting(self, wait: GrantWait, now: float) -> None:
        """The decision that waited is done (answered, failed or cancelled): the counters
        still reserved for it go to the next waiter."""
        if wait.then is None and not wait.future.done():
            wait.future.cancel()  # dropped from the queue when next served
        if wait.reserved:
            self._release(wait)
            self._serve_waiting(now, store_failed=False)

    def _release(self, wait: GrantWait) -> None:
        """The counters reserved for `wait` are no longer: the next waiter that lacks them
        is woken to ask instead."""
        for key in wait.reserved:
            if self._asking.get(key) is wait:
                del self._asking[key]
        wait.reserved.clear()

    def _serve_waiting(self, now: float, *, store_failed: bool) -> None:
        """Each waiting decision in turn: served from the leases, left waiting for grants
        still in flight, or woken to ask the store (every one of them when the store did not
        answer: each then meets the failure itself, as it would have without waiting).

        A woken decision's future is resolved, or its `then` called. What `then` raises
        answers that decision (the transport's failure answer) and gives back what was
        reserved for it: the rest of the queue is served on, and the grant or store call
        that woke it (another decision's) is not disturbed."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, deque()
        now_ms = int(now * 1000)
        for wait in waiting:
            if wait.future.done():
                continue  # its decision was cancelled
            # Served first, where `_still_waiting` would have said it need not wait: a
            # grant's arrival serves most of the queue, one call each instead of two.
            answer: Woken = self.serve(wait.checks, now) if wait.alone else None
            if answer is None:
                if not store_failed and self._still_waiting(wait.checks, now_ms):
                    self._waiting.append(wait)
                    continue
                taken = self.take(wait.checks, now)
                if taken.complete:
                    results: list[CheckResult] = taken.results  # type: ignore[assignment]  # complete: none is None
                    answer = served_answer(wait.checks, results) if wait.alone else results
                elif not store_failed and self._missing_in_flight(wait.checks, taken):
                    self.put_back(taken)
                    self._waiting.append(wait)
                    continue
                else:  # woken to ask the store (answer None)
                    self.put_back(taken)
                    if not store_failed:
                        self._reserve(wait, taken)
            then = wait.then
            if then is None:
                wait.future.set_result(answer)
                continue
            try:
                then(answer)
            except Exception as exc:
                self._release(wait)
                if not wait.future.done():
                    wait.future.set_exception(exc)

    def _reserve(self, wait: GrantWait, taken: Taken) -> None:
        """The counters a decision woken to ask lacks, for it alone: those behind it wait
        for its grant instead of all asking at once."""
        for check, served in zip(wait.checks, taken.results, strict=True):
            if served is None and self._leasable(check) and check.key not in self._asking:
                self._asking[check.key] = wait
                wait.reserved.add(check.key)

    def _still_waiting(self, checks: Sequence[Check], now_ms: int) -> bool:
        """Whether a waiting decision must go on waiting: some check's lease cannot serve it,
        and each such check has a grant in flight. Found without taking a hit (what `take`
        and `_missing_in_flight` would say, without the results and put-backs): behind a
        grant in flight the queue is long (every decision of 32 connections waits at L = 16),
        and each grant's arrival runs through all of it."""
        leases = self._leases
        asking = self._asking
        lacking = False
        for check in checks:
            lease = leases.get(check.key)
            if (
                lease is not None
                and lease.hits >= check.cost
                and now_ms < lease.deadline_ms
                and _same(lease.limit, check.limit)
            ):
                continue
            if check.key not in asking or not self._leasable(check):
                return False
            lacking = True
        return lacking

    def _missing_in_flight(self, checks: Sequence[Check], taken: Taken) -> bool:
        """Whether every check `taken` did not serve has a grant in flight."""
        for check, served in zip(checks, taken.results, strict=True):
            if served is None and (check.key not in self._asking or not self._leasable(check)):
                return False
        return True

    @staticmethod
    def put_back(taken: Taken) -> None:
        for lease, cost in taken.leases:
            lease.put_back(cost)

    def unused(self, now: float) -> list[Unused]:
        """Every lease's unused hits, the book emptied: what a stopping process gives back."""
        now_ms = int(now * 1000)
        found = [
            Unused(Check(key, lease.limit, 0), lease.hits, lease.bucket_tat_ms)
            for key, lease in self._leases.items()
            if lease.hits > 0 and (lease.step_ms > 0 or now_ms < lease.deadline_ms)
        ]
        self._leases.clear()
        return found

    def _running_low(self, check: Check) -> Lease | None:
        """This served check's lease, if it is a window lease worth topping up now. Far from
        its limit only (what the store had left at the grant is 8 grants or more): near it,
        asking could be refused for a decision the lease would have served."""
        lease = self._leases.get(check.key)
        if lease is None or lease.step_ms != 0 or check.key in self._asking or not self._leasable(check):
            return None
        full = (self.lease_max - 1) * check.cost
        if 2 * lease.hits >= full or lease.remaining < LEASE_SHARE * full:
            return None
        return lease

    def _leasable(self, check: Check) -> bool:
        limit = check.limit
        return check.cost > 0 and not limit.shadow and limit.period not in QUOTA_PERIODS

    def _keep(self, check: Check, lease: Lease, now: float) -> None:
        """`lease` replaces the counter's lease and takes over its last usable hits: a
        window's in the same window; a token bucket's in front of its own tokens, the first
        deadline the earlier of the old lease's and the one that keeps the new tokens' slots
        (token i may be used until deadline + i steps, never later than its own slot: the
        old tokens' slots come before the new ones'). A lease far from its limit (8 grants
        or more left) gets a refill mark when refills are on."""
        old = self._leases.get(check.key)
        if old is not None and old.hits > 0 and _same(old.limit, lease.limit):
            if old.step_ms == 0:
                if old.deadline_ms == lease.deadline_ms:
                    lease.hits += old.hits  # the old lease's last hits stay usable
            elif int(now * 1000) < old.deadline_ms:
                lease.deadline_ms = min(old.deadline_ms, lease.deadline_ms - old.hits * lease.step_ms)
                lease.hits += old.hits
        if (
            self._refill is not None
            and self._refill_mark > 0
            and lease.remaining >= LEASE_SHARE * (self.lease_max - 1) * check.cost
        ):
            lease.refill_at = self._refill_mark * check.cost
        self._leases[check.key] = lease


def served_answer(checks: Sequence[Check], served: Sequence[CheckResult]) -> Served:
    """What `serve` answers, from the results `take` gave a decision leases served (a
    waiting one): the limit that speaks for it as (limit, remaining, seconds to its reset),
    without a verdict object or header strings. Leases serve only enforced limits."""
    best: Served | None = None
    for check, result in zip(checks, served, strict=True):
        if best is None or _speaks_before(result.remaining, result.reset_seconds, best):
            best = (check.limit, result.remaining, result.reset_seconds)
    assert best is not None  # a decision with limits has a check
    return best


def _speaks_before(remaining: int, reset: float, best: Served) -> bool:
    """`most_restrictive`'s order among admitting limits: fewest left, on a tie the later reset."""
    return remaining < best[1] or (remaining == best[1] and reset > best[2])


def _same(a: RateLimit, b: RateLimit) -> bool:
    # A reloaded policy may change a limit under the same key: its lease is then not used.
    return a is b or a == b
