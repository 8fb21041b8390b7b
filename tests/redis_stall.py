"""A Redis that holds still until the test lets it go: its process stopped (SIGSTOP), so it
accepts connections (the kernel's backlog) and answers nothing, not even a SELECT or a
PING. A call that fails inside the block failed while Redis was stalled: it gave up on its
own timeout, whatever the machine's load, with no wall-clock window to assert."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio

# How long a call that should give up on its own timeout (tens of ms) may take before the
# test calls it hung: a bound on a hang, far past any load, never a measurement.
HANG_SECONDS = 15.0


@asynccontextmanager
async def stalled(client: redis.asyncio.Redis) -> AsyncIterator[None]:
    """Redis, as `client` reaches it, answers nothing inside the block; after it, everything
    it was sent meanwhile."""
    pid = int((await client.info("server"))["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
