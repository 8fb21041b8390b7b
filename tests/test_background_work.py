"""Background work (watchers, the meter's flushes, reconciliation) never stops silently:
an unexpected failure is logged, counted and the work started again; a stop closes every
listener before waiting for any."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from meshtoll.server import lifecycle
from meshtoll.server.lifecycle import keep_running, stop_serving


async def test_failed_background_work_is_logged_counted_and_started_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lifecycle, "BACKGROUND_RESTART_SECONDS", 0.01)
    runs: list[int] = []

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise KeyError("an admission written by a newer version")

    restarts: Counter[str] = Counter()
    await asyncio.wait_for(keep_running("reconciler", work, restarts), timeout=5)
    assert (len(runs), restarts["reconciler"]) == (3, 2)
    assert caplog.text.count("reconciler failed; starting it again") == 2


async def test_cancelling_background_work_ends_it() -> None:
    async def work() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(keep_running("watcher", work, Counter()))
    await asyncio.sleep(0)  # the task starts its work
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class GracefulListener:
    """A listener whose calls in flight take `grace` seconds to finish once it is closed."""

    def __init__(self, grace: float, events: list[str], name: str) -> None:
        self.grace = grace
        self.events = events
        self.name = name

    def close(self) -> None:
        self.events.append(f"{self.name} closed")

    async def wait_closed(self) -> None:
        await asyncio.sleep(self.grace)
        self.events.append(f"{self.name} done")


async def test_a_stop_closes_every_listener_before_their_graces_which_run_together() -> None:
    """With --uds-dir the Unix gRPC port must not accept during the TCP one's grace, nor take
    a second grace after it."""
    events: list[str] = []
    listeners = [GracefulListener(0.3, events, "tcp"), GracefulListener(0.3, events, "unix")]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stop_serving(listeners, [])
    assert events[:2] == ["tcp closed", "unix closed"]
    assert loop.time() - started < 0.55  # one grace, not two
