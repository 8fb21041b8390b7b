"""The event loop meshtoll's servers run on: uvloop by default, asyncio's own on request or
when uvloop is not installed.

uvloop (libuv, in C) takes less CPU per socket event than asyncio's selector loop, and the
HTTP ext_authz fast path is mostly socket events: see bench/README.md ("uvloop, Unix sockets") for
what it measured. grpc.aio's client runs on it unchanged (tests/test_event_loop.py holds gRPC
calls on it, to serve's h2c server). Only meshtoll's own servers choose it here; the demo
upstream and the benchmark's stubs stay on asyncio, so that baselines do not move with this
setting.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("meshtoll")

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """uvloop's loop factory when `choice` is "uvloop" and it is installed; None (asyncio's
    default loop) otherwise."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        log.warning("uvloop is not installed: running on asyncio's own event loop")
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def running_loop_name() -> str:
    """ "uvloop" or "asyncio": the package of the running event loop, for the start-up log."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def run_on_event_loop(main: Coroutine[Any, Any, T], choice: str) -> T:
    """asyncio.run(main) on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
