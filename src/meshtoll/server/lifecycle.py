"""What every meshtoll server process (`meshtoll serve`, `meshtoll ratelimit`) does around
its servers: background work that never stops silently, and an orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("meshtoll")

BACKGROUND_RESTART_SECONDS = 1.0
# Background work: a watcher, a flush, reconciliation; runs until cancelled.
Work = Callable[[], Coroutine[Any, Any, None]]


class Listener(Protocol):
    def close(self) -> None: ...

    def wait_closed(self) -> Awaitable[None]: ...


def announce_ports(path: Path | None, ports: Mapping[str, int]) -> None:
    """Write the ports a server bound to `path` as one JSON object, whole or not at all (a
    reader polling for the file never sees half of it): how whoever started it with port 0
    learns the kernel's choice, and that this process, not another, holds them."""
    if path is None:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(dict(ports)))
    partial.replace(path)


async def keep_running(name: str, work: Work, restarts: Counter[str]) -> None:
    """Run background work (a watcher, the meter's flushes, reconciliation) until it returns
    or is cancelled. An unexpected exception is logged, counted and the work started again a
    second later: billing and reloading must never stop silently while /readyz says ready."""
    while True:
        try:
            await work()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            restarts[name] += 1
            log.exception("%s failed; starting it again in %.0f s", name, BACKGROUND_RESTART_SECONDS)
            await asyncio.sleep(BACKGROUND_RESTART_SECONDS)


async def stop_serving(listeners: Sequence[Listener], tasks: Sequence[asyncio.Task[None]]) -> None:
    """Stop serving, letting calls in flight finish (a gRPC port's streams get their grace,
    transport/h2_server.py): every listener closed first, then their calls awaited together,
    so that none accepts during another's grace and the graces run at once, not one after the
    other; then end the background work (whose own clean-up, a last flush among it, runs as
    it is cancelled)."""
    for listener in listeners:
        listener.close()
    await asyncio.gather(*(listener.wait_closed() for listener in listeners))
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    draining: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start, serve until SIGINT or SIGTERM, then (after `draining`, for a service whose
    health should say so before its ports close) stop, whatever happened on the way."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled.set)
    try:
        await start()
        await signalled.wait()
        if draining is not None:
            await draining()
    finally:
        await stop()
