"""The billing sinks of `meshtoll serve --usage-sink TARGET=URL`: one follower of the usage
ledger per target (meter/follower.py), sharing the sink state store, their counts and lag on
/metrics. Every worker and replica runs them; the lease lets one deliver at a time."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from meshtoll.meter.follower import LedgerFollower
from meshtoll.policy.reload import PolicyHolder
from meshtoll.settings import Settings
from meshtoll.sinks.names import Target
from meshtoll.sinks.state import SinkStateStore
from meshtoll.storage import open_sink_state_store
from meshtoll.targets import CREDENTIAL_VARIABLES, open_sink
from meshtoll.telemetry.metrics import Labelled, Metrics
from meshtoll.usage.store import UsageStore

log = logging.getLogger("meshtoll.sinks")


@dataclass(frozen=True, slots=True)
class UsageSinks:
    state: SinkStateStore
    followers: tuple[LedgerFollower, ...]

    async def close(self) -> None:
        for follower in self.followers:
            await follower.sink.close()
        await self.state.close()


def build_usage_sinks(
    settings: Settings, policy: PolicyHolder, usage: UsageStore, metrics: Metrics
) -> UsageSinks:
    state = open_sink_state_store(settings.redis_url)
    # Unique per process: workers of one pod and replicas compete for each sink's lease.
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = settings.usage_sink_since or month_start(time.time())
    followers = []
    for name, url in settings.usage_sinks:
        target: Target = name  # type: ignore[assignment]  # Settings checked it
        if not os.environ.get(CREDENTIAL_VARIABLES[target]):
            log.warning(
                "%s sink: %s is not set; calls go without a credential", target, CREDENTIAL_VARIABLES[target]
            )
        sink = open_sink(
            target,
            url,
            lambda: policy.current.billing,
            os.environ,
            cloudevents_source=settings.cloudevents_source,
            stripe_api=settings.stripe_api,  # type: ignore[arg-type]  # Settings checked it
            timeout=settings.usage_sink_timeout_seconds,
        )
        followers.append(
            LedgerFollower(
                sink,
                usage,
                state,
                owner=owner,
                start=start,
                clock=time.time,
                sleep=asyncio.sleep,
                random=random.random,
            )
        )
    _export(metrics, followers)
    return UsageSinks(state, tuple(followers))


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def _export(metrics: Metrics, followers: list[LedgerFollower]) -> None:
    if not followers:
        return

    def records() -> Iterable[Labelled]:
        return [
            ({"sink": follower.name, "outcome": outcome}, count)
            for follower in followers
            for outcome, count in list(follower.outcomes.items())
        ]

    def delivering() -> Iterable[Labelled]:
        return [({"sink": follower.name}, 1 if follower.delivering else 0) for follower in followers]

    # Only the instance that holds a sink's lease knows how far behind it is.
    def lag_records() -> Iterable[Labelled]:
        return [({"sink": f.name}, f.behind_records) for f in followers if f.delivering]

    def lag_seconds() -> Iterable[Labelled]:
        return [({"sink": f.name}, f.behind_seconds) for f in followers if f.delivering]

    metrics.count_labelled(
        "meshtoll_usage_sink_records",
        "usage records by billing sink and outcome: delivered (the target holds it, new or known), "
        "retried (sent again after a failure), quarantined (refused for good, or unconfirmed past the "
        "target's dedup window), skipped (delivered by a usage push)",
        records,
    )
    metrics.gauge_labelled(
        "meshtoll_usage_sink_delivering",
        "1 where this process holds the sink's lease and delivers, 0 where another does",
        delivering,
    )
    metrics.gauge_labelled(
        "meshtoll_usage_sink_lag_records", "records appended to the ledger and not delivered yet", lag_records
    )
    metrics.gauge_labelled(
        "meshtoll_usage_sink_lag_seconds",
        "how long ago the oldest record not delivered yet was appended (0: caught up)",
        lag_seconds,
    )
