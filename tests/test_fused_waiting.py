"""The fused authz decision that waits for this process's grant in flight (every decision does,
at 32 connections and L = 16): served from the grant in arrival order, one store call per
grant, woken to ask the store when the grant cannot serve it, and, cancelled while it waits
(Envoy gave up on the call), neither admitted nor charged. Through the HTTP transport the
same, answered from the lease book's call instead of a Task, and an answer that fails there
is its client's failure answer alone. Memory store behind a gate that stands for a Redis
round trip; the clock injected."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.authz.verdict import Allow, CheckRequest, Deny, Verdict
from meshtoll.counting.limits import Check, CheckResult, RateLimit
from meshtoll.policy.reload import PolicyHolder
from meshtoll.ratelimit.leases import Woken, served_answer
from meshtoll.ratelimit.limiter import Limiter
from meshtoll.ratelimit.verdict import admitted_headers, limit_verdict
from meshtoll.storage import MemoryCounterStore, MemoryUsageStore
from meshtoll.transport.http_listener import listening_socket
from meshtoll.transport.http_server import serve_http
from meshtoll.usage.recorder import AdmissionRecorder

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC).timestamp()
KEY = "k-fused-waiting"


class GatedStore(MemoryCounterStore):
    """Answers once the test opens the gate, a loop turn later: decisions pile up behind a
    grant in flight as they do behind a Redis round trip under load."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls = 0

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        self.calls += 1
        await self.gate.wait()
        await asyncio.sleep(0)
        return await super().check(checks, now)


class Fused:
    def __init__(self, directory: Path, lease_max: int) -> None:
        policy = directory / "policy.yaml"
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        policy.write_text(
            "plans: {metered: {limits: [{requests: 1000, per: minute}, "
            "{requests: 100000, per: day, name: daily}]}}\n"
            f"tenants: {{acme: {{plan: metered, api_keys: [{{id: ci, sha256: {digest}}}]}}}}\n"
            "routes: [{prefix: /v1/, name: v1}]\n"
        )
        self.store = GatedStore()
        self.usage = MemoryUsageStore()
        self.recorder = AdmissionRecorder(self.usage)
        # Refilled only once empty: these tests count the grants that waiting decisions are
        # served from, which a refill started at the mark (tests/test_leases.py) would add to.
        self.limiter = Limiter(self.store, lease_max=lease_max, refill_mark=0, clock=lambda: T0)
        self.policy = PolicyHolder.from_file(policy)
        self.authorizer = Authorizer(
            self.policy, JwksCache(), limiter=self.limiter, recorder=self.recorder, clock=lambda: T0
        )

    async def decide_after_one_asks(self, count: int) -> list[asyncio.Future[Verdict]]:
        """`count` decisions: the first started until it asks the store, then the others,
        which find its grant in flight (so they wait for it from the start)."""
        first = self.decide("r0")
        await asyncio.sleep(0)
        assert self.store.calls == 1
        return [first, *(self.decide(f"r{n}") for n in range(1, count))]

    def decide(self, request_id: str) -> asyncio.Future[Verdict]:
        request = CheckRequest("GET", "/v1/items", {"x-api-key": KEY, "x-request-id": request_id}, "10.0.0.1")
        verdict = self.authorizer.check(request)
        assert isinstance(verdict, Awaitable), "a decision without a lease awaits the store or a grant"
        return asyncio.ensure_future(verdict)

    async def admitted_ids(self) -> set[str]:
        await self.recorder.flush()
        found = await self.usage.pending([("acme", f"r{n}") for n in range(20)])
        return {request_id for _, request_id in found}

    async def used(self) -> list[int]:
        """Each limit's hits in the store once every unused leased hit went back."""
        await self.limiter.release_leases()
        checks = self.policy.current.limits.checks("acme", "v1", where="authz")
        looked = await self.store.check([Check(c.key, c.limit, cost=0) for c in checks], T0)
        return [result.used for result in looked]


def remaining(verdict: Verdict) -> int:
    assert isinstance(verdict, Allow)
    assert verdict.rate_limit is not None
    return verdict.rate_limit[1]


async def test_waiting_decisions_are_served_from_the_grant_in_order_one_store_call_per_grant(
    tmp_path: Path,
) -> None:
    fused = Fused(tmp_path, lease_max=4)
    decisions = await fused.decide_after_one_asks(12)
    fused.store.gate.set()
    verdicts = await asyncio.gather(*decisions)
    assert all(isinstance(verdict, Allow) for verdict in verdicts)
    # Each grant covers 3 decisions beyond its asker's: 12 decisions, 3 store calls.
    assert fused.store.calls == 3
    assert [remaining(verdict) for verdict in verdicts] == list(range(999, 987, -1))
    assert fused.limiter.outcomes["admitted"] == 12
    assert fused.limiter.outcomes["admitted_from_lease"] == 9
    assert await fused.admitted_ids() == {f"r{n}" for n in range(12)}
    assert await fused.used() == [12, 12]


async def test_a_decision_cancelled_while_it_waits_is_neither_admitted_nor_charged(tmp_path: Path) -> None:
    fused = Fused(tmp_path, lease_max=4)
    asking, gave_up, served = await fused.decide_after_one_asks(3)
    await asyncio.sleep(0)  # both wait for the grant
    gave_up.cancel()  # Envoy's call timed out, or its connection closed
    fused.store.gate.set()
    assert isinstance(await asking, Allow)
    assert isinstance(await served, Allow)
    assert remaining(await served) == 998  # the cancelled decision took no hit
    assert await fused.admitted_ids() == {"r0", "r2"}
    assert await fused.used() == [2, 2]


async def test_a_waiting_decision_the_grant_cannot_serve_asks_the_store_itself(tmp_path: Path) -> None:
    fused = Fused(tmp_path, lease_max=2)  # a grant of one decision beyond its asker's
    decisions = await fused.decide_after_one_asks(5)
    fused.store.gate.set()
    verdicts = await asyncio.gather(*decisions)
    assert [remaining(verdict) for verdict in verdicts] == [999, 998, 997, 996, 995]
    assert fused.store.calls == 3  # r0 asks, r1 is served; r2 is woken to ask, r3 served; r4
    assert await fused.admitted_ids() == {f"r{n}" for n in range(5)}
    assert await fused.used() == [5, 5]


async def test_a_decision_cancelled_once_woken_to_ask_hands_its_turn_to_the_next(tmp_path: Path) -> None:
    """Woken to ask the store, the counters reserved for it, and cancelled before it runs
    again (Envoy gave up just then): the next waiter gets the turn instead of waiting on."""
    fused = Fused(tmp_path, lease_max=2)
    asking, served, gives_up, next_one = await fused.decide_after_one_asks(4)
    # Queued by `check` itself; their Tasks have not run yet. Cancelled from the callback
    # that runs as it is woken, before its Task resumes (that Task's callback comes later).
    book = fused.limiter._leases  # the queue, to reach that moment
    assert book is not None
    woken = list(book._waiting)[1]
    woken.future.add_done_callback(lambda _: gives_up.cancel())
    fused.store.gate.set()
    assert isinstance(await asking, Allow)
    assert isinstance(await served, Allow)
    for _ in range(20):  # loop turns, enough for the next one to ask the store and be answered
        await asyncio.sleep(0)
    assert gives_up.cancelled()
    assert next_one.done(), "the next waiter still waits for a grant nobody asks for"
    assert remaining(next_one.result()) == 997  # r0 999, r1 998; nothing taken for r2
    assert await fused.admitted_ids() == {"r0", "r1", "r3"}
    assert await fused.used() == [3, 3]


@pytest.mark.parametrize(
    "answers", [[(5, 10.0), (7, 1.0)], [(7, 1.0), (5, 10.0)], [(5, 1.0), (5, 30.0)], [(9, 2.0)]]
)
def test_a_served_waiters_answer_is_the_general_verdicts(answers: list[tuple[int, float]]) -> None:
    """A waiting decision a grant served reports the limit, remaining and reset the general
    verdict would for the same results."""
    checks = [Check(f"waiting_{{t}}_{n}", RateLimit(10 + n, "minute")) for n in range(len(answers))]
    results = [CheckResult(True, 10 - left, left, reset, 0.0) for left, reset in answers]
    general = limit_verdict(checks, results)
    limit, left, reset = served_answer(checks, results)
    assert admitted_headers(limit, left, reset) == general.headers
    assert general.deciding is not None
    assert limit == general.deciding[0].limit


class Answering(HttpAuthzHandler):
    """The HTTP transport; its answer to `failing` (a request id) fails as it is built."""

    failing = ""

    def _response(self, verdict: Allow | Deny, request: CheckRequest) -> bytes:
        if request.request_id == self.failing:
            raise RuntimeError("the answer could not be built")
        return super()._response(verdict, request)


def http_decide(fused: Fused, handler: HttpAuthzHandler, request_id: str) -> asyncio.Future[bytes]:
    reply = handler("GET", "/v1/items", {"x-api-key": KEY, "x-request-id": request_id}, "10.0.0.1")
    assert not isinstance(reply, bytes), "a decision without a lease awaits the store or a grant"
    return asyncio.ensure_future(reply)


async def http_after_one_asks(
    fused: Fused, handler: HttpAuthzHandler, count: int
) -> list[asyncio.Future[bytes]]:
    first = http_decide(fused, handler, "r0")
    await asyncio.sleep(0)
    assert fused.store.calls == 1
    return [first, *(http_decide(fused, handler, f"r{n}") for n in range(1, count))]


def http_remaining(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return int(answer.split(b"ratelimit-remaining: ")[1].split(b"\r\n")[0])


async def test_over_http_a_waiting_decision_is_answered_from_the_grant_without_a_task(tmp_path: Path) -> None:
    fused = Fused(tmp_path, lease_max=4)
    decisions = await http_after_one_asks(fused, Answering(fused.authorizer), 12)
    # What the server is handed for a decision waiting for the grant: a future the lease
    # book's call settles, not a Task running coroutines.
    assert not any(isinstance(decision, asyncio.Task) for decision in decisions[1:])
    fused.store.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*decisions), 5)
    assert [http_remaining(answer) for answer in answers] == list(range(999, 987, -1))
    assert fused.store.calls == 3
    assert await fused.admitted_ids() == {f"r{n}" for n in range(12)}
    assert await fused.used() == [12, 12]


async def test_over_http_a_decision_whose_connection_closes_while_it_waits_is_neither_admitted_nor_charged(
    tmp_path: Path,
) -> None:
    fused = Fused(tmp_path, lease_max=4)
    asking, gave_up, served = await http_after_one_asks(fused, Answering(fused.authorizer), 3)
    gave_up.cancel()  # as the server does when the connection closes
    fused.store.gate.set()
    assert http_remaining(await asking) == 999
    assert http_remaining(await served) == 998  # the cancelled decision took no hit
    assert await fused.admitted_ids() == {"r0", "r2"}
    assert await fused.used() == [2, 2]


async def test_over_http_a_decision_woken_to_ask_whose_connection_closes_hands_its_turn_on(
    tmp_path: Path,
) -> None:
    """Woken to ask the store, the counters reserved for it, and its connection closed at
    once: its Task stops before it asks, and the next waiter gets the turn."""
    fused = Fused(tmp_path, lease_max=2)
    handler = Answering(fused.authorizer)
    asking, served, gives_up, next_one = await http_after_one_asks(fused, handler, 4)
    book = fused.limiter._leases  # the queue, to reach that moment
    assert book is not None
    woken = list(book._waiting)[1]
    wake = woken.then
    assert wake is not None  # the transport answers from the lease book's call

    def closes_as_woken(answer: Woken) -> None:
        wake(answer)
        gives_up.cancel()

    woken.then = closes_as_woken
    fused.store.gate.set()
    assert http_remaining(await asking) == 999
    assert http_remaining(await served) == 998
    assert http_remaining(await asyncio.wait_for(next_one, 5)) == 997  # nothing taken for r2
    assert gives_up.cancelled()
    assert await fused.admitted_ids() == {"r0", "r1", "r3"}
    assert await fused.used() == [3, 3]


class HeldStore(GatedStore):
    """The first call as GatedStore's; each later one held until the test answers it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[asyncio.Future[list[CheckResult]], Sequence[Check], float]] = []

    async def check(self, checks: Sequence[Check], now: float) -> list[CheckResult]:
        if self.calls == 0:
            return await super().check(checks, now)
        self.calls += 1
        answer: asyncio.Future[list[CheckResult]] = asyncio.get_running_loop().create_future()
        self.held.append((answer, checks, now))
        return await answer


async def test_over_http_a_decision_whose_connection_closes_as_the_store_answers_it_is_neither_admitted_nor_billed(
    tmp_path: Path,
) -> None:
    """Woken to ask the store, and its connection closed in the very loop turn the store's
    answer arrives: the decision's Task is cancelled only a callback later, by which time it
    has its answer; it must still not be admitted (Envoy never hears of it)."""
    fused = Fused(tmp_path, lease_max=2)
    fused.store = fused.limiter.store = store = HeldStore()
    asking, served, gives_up = await http_after_one_asks(fused, Answering(fused.authorizer), 3)
    store.gate.set()
    assert http_remaining(await asking) == 999
    assert http_remaining(await served) == 998
    while not store.held:  # r2, woken to ask, has sent its own call
        await asyncio.sleep(0)
    answer, checks, now = store.held.pop()
    answer.set_result(await MemoryCounterStore.check(store, checks, now))
    gives_up.cancel()  # the server's connection_lost, in the same turn
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    for _ in range(5):  # the Task's own steps, had it gone on
        await asyncio.sleep(0)
    assert await fused.admitted_ids() == {"r0", "r1"}
    assert fused.limiter.outcomes["admitted"] == 2


async def test_over_http_an_answer_that_fails_in_the_lease_books_call_answers_its_client_and_no_other(
    tmp_path: Path,
) -> None:
    """The answer built in the lease book's call (the grant's arrival, in the asking
    decision's Task) fails for one waiter: the server gets the failure for that one (its
    500), and the asker and the waiters after it are answered."""
    fused = Fused(tmp_path, lease_max=4)
    handler = Answering(fused.authorizer)
    handler.failing = "r2"
    decisions = await http_after_one_asks(fused, handler, 6)
    fused.store.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*decisions, return_exceptions=True), 5)
    assert isinstance(answers[2], RuntimeError)
    assert [http_remaining(a) for a in answers if isinstance(a, bytes)] == [999, 998, 996, 995, 994]


async def test_through_the_server_a_failed_answer_is_its_500_and_the_server_serves_on(tmp_path: Path) -> None:
    fused = Fused(tmp_path, lease_max=4)
    handler = Answering(fused.authorizer)
    handler.failing = "r1"
    sock = listening_socket("127.0.0.1", 0)
    server = await serve_http(handler, sock)
    port = sock.getsockname()[1]

    async def ask(request_id: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/items HTTP/1.1\r\nx-api-key: {KEY}\r\nx-request-id: {request_id}\r\n\r\n".encode()
        )
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()

    try:
        first = asyncio.ensure_future(ask("r0"))
        while fused.store.calls < 1:
            await asyncio.sleep(0.001)
        waiting = [asyncio.ensure_future(ask(f"r{n}")) for n in (1, 2)]
        while len(fused.limiter._leases._waiting) < 2:  # type: ignore[union-attr]  # leases are on
            await asyncio.sleep(0.001)
        fused.store.gate.set()
        assert (await first).startswith(b"HTTP/1.1 200 ")
        assert (await waiting[0]).startswith(b"HTTP/1.1 500 ")
        assert (await waiting[1]).startswith(b"HTTP/1.1 200 ")
        assert (await ask("r3")).startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()
        await server.wait_closed()
