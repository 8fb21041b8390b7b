"""Background work (watchers, the meter's flushes, reconciliation) never stops silently:
an unexpected failure is logged, counted and the work started again."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from meshtoll.server import lifecycle
from meshtoll.server.lifecycle import keep_running


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
