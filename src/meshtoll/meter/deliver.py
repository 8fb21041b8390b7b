"""One batch to a billing target until every record is settled: delivered (new or known
before), or refused for good. What fails for now is tried again after a capped, jittered
backoff (sinks/backoff.py), honouring the target's Retry-After; the wait is the caller's
(the follower renews its lease while it waits, a push gives up after some attempts)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshtoll.errors import DeliveryStalled, LeaseLost
from meshtoll.sinks.backoff import DEFAULT_BACKOFF, Backoff
from meshtoll.sinks.delivery import Refusal, Retry, Sink
from meshtoll.sinks.state import LEASE_SECONDS, Quarantined, SinkStateStore
from meshtoll.usage.records import UsageRecord

log = logging.getLogger("meshtoll.sinks")


@dataclass(frozen=True, slots=True)
class Attempts:
    wait: Callable[[float], Awaitable[None]]  # sleeps that long (and may raise LeaseLost)
    random: Callable[[], float]
    backoff: Backoff = DEFAULT_BACKOFF
    limit: int | None = None  # attempts per batch before DeliveryStalled; None: no end


@dataclass(frozen=True, slots=True)
class Settled:
    delivered: tuple[int, ...]  # indexes into the batch
    refused: dict[int, Refusal]


async def deliver_all(
    sink: Sink, records: Sequence[UsageRecord], attempts: Attempts, outcomes: Counter[str]
) -> Settled:
    """Deliver `records` until each is delivered or refused; `outcomes` counts the records
    sent again (`retried`)."""
    delivered: list[int] = []
    refused: dict[int, Refusal] = {}
    pending = list(range(len(records)))
    attempt = 0
    while pending:
        result = await sink.deliver([records[index] for index in pending])
        delivered += (pending[index] for index in sorted(result.delivered))
        refused.update((pending[index], refusal) for index, refusal in result.refused.items())
        left = [pending[index] for index in result.pending(len(pending))]
        if not left:
            break
        retry = result.retry or Retry("no answer for some")
        attempt += 1
        if attempts.limit is not None and attempt >= attempts.limit:
            raise DeliveryStalled(
                f"{sink.target} still failing after {attempt} attempts ({retry.reason}); "
                f"{len(left)} record(s) not delivered yet"
            )
        delay = attempts.backoff.delay(attempt - 1, retry.after, attempts.random)
        log.warning(
            "%s: %d record(s) not taken (%s); again in %.1f s", sink.target, len(left), retry.reason, delay
        )
        outcomes["retried"] += len(left)
        await attempts.wait(delay)
        pending = left
    return Settled(tuple(delivered), refused)


async def settle(
    sink: Sink,
    records: Sequence[UsageRecord],
    attempts: Attempts,
    outcomes: Counter[str],
    held_back: Mapping[int, Refusal],
) -> dict[int, Refusal]:
    """Deliver the records of a batch not `held_back` (refused before sending); every
    refusal by index, those held back included. `outcomes` counts `delivered`."""
    refused = dict(held_back)
    sendable = [index for index in range(len(records)) if index not in held_back]
    if sendable:
        settled = await deliver_all(sink, [records[index] for index in sendable], attempts, outcomes)
        outcomes["delivered"] += len(settled.delivered)
        refused.update((sendable[index], refusal) for index, refusal in settled.refused.items())
    return refused


def quarantined(
    sink: Sink, refused: Iterable[tuple[UsageRecord, Refusal]], now: float, outcomes: Counter[str]
) -> list[Quarantined]:
    """Refused records as the quarantine keeps them, each logged and counted."""
    found = [Quarantined(record, refusal, now) for record, refusal in refused]
    for item in found:
        reason, answer = item.refusal.reason, item.refusal.answer
        log.warning("%s sink: quarantined %s (%s: %s)", sink.target, item.key, reason, answer)
    outcomes["quarantined"] += len(found)
    return found


async def deliver_replays(
    sink: Sink, state: SinkStateStore, owner: str, attempts: Attempts, outcomes: Counter[str], now: float
) -> int:
    """Deliver a batch of the records replayed from the quarantine: delivered ones leave the
    replay queue, refused ones go back to the quarantine with the new answer. How many were
    in the batch (0: the queue is empty). Raises LeaseLost when the lease has gone."""
    items = await state.replays(sink.target, sink.max_batch)
    if not items:
        return 0
    records = [item.record for item in items]
    refused = await settle(sink, records, attempts, outcomes, {})
    again = quarantined(
        sink, [(records[index], refusal) for index, refusal in refused.items()], now, outcomes
    )
    done = [item.key for index, item in enumerate(items) if index not in refused]
    if not await state.save(sink.target, owner, {}, again, done):
        raise LeaseLost(sink.target)
    return len(items)


async def renew(state: SinkStateStore, target: str, owner: str) -> None:
    """Extend the sink's lease, or raise LeaseLost when another instance holds it now."""
    if not await state.lease(target, owner, LEASE_SECONDS):
        raise LeaseLost(f"another instance holds the {target} sink's lease now")


def waiting_with_lease(
    state: SinkStateStore, target: str, owner: str, sleep: Callable[[float], Awaitable[None]]
) -> Callable[[float], Awaitable[None]]:
    """A wait between attempts that keeps the lease: it sleeps in steps of a third of it."""

    async def wait(seconds: float) -> None:
        left = seconds
        while left > 0:
            step = min(left, LEASE_SECONDS / 3)
            await sleep(step)
            left -= step
            await renew(state, target, owner)

    return wait
