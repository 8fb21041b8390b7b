"""A file (or directory) that is loaded, watched and swapped in whole when a new version
validates: the policy and envoyproxy/ratelimit's configuration directory both live in one.

Readers take `current` once and keep that object, so a swap never changes a version under a
decision in flight. The source is polled by its resolved path and inode, which also catches
a Kubernetes ConfigMap update (an atomic swap of the `..data` symlink that leaves the
mounted file's own path and mtime looking unchanged). A rejected version is logged once,
counted in `rejected_versions`, kept as `last_rejection` (when, and its located problems,
for the dashboard's policy page), and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from meshtoll.errors import PolicyError, PolicyProblem

Loaded = TypeVar("Loaded")
Fingerprint = Hashable
Listener = Callable[[Loaded], Awaitable[None] | None]

# A generated file can be wrong in every entry: the log gets the first problems, not a
# hundred thousand lines at each poll of a broken version.
LOGGED_PROBLEMS = 50


@dataclass(frozen=True, slots=True)
class Rejection:
    """The last version that was not put in place: when, and why (no problems: it failed
    for a reason the loader did not locate, which the log has with its traceback)."""

    at: float
    problems: tuple[PolicyProblem, ...]


class Watched(Generic[Loaded]):
    """The active version of `path`; replaced whole, never mutated."""

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], Loaded],
        *,
        log: logging.Logger,
        fingerprint: Callable[[Path], Fingerprint | None],
        describe: Callable[[Loaded], str],
    ) -> None:
        """Loads the first version now; its errors (PolicyError) are the caller's."""
        self.path = path
        self._load = load
        self._log = log
        self._fingerprint = fingerprint
        self._describe = describe
        # Fingerprint first: a change that lands while loading is then seen as a change.
        self.loaded = fingerprint(path)  # the version `current` came from
        self.current = load(path)
        self.version = 1
        self.loaded_at = time.time()  # when `current` was put in place
        self.rejected_versions = 0
        self.last_rejection: Rejection | None = None
        self._listeners: list[Listener[Loaded]] = []
        self._preparers: list[Callable[[Loaded], Awaitable[None]]] = []
        self._building: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

    def on_change(self, listener: Listener[Loaded]) -> None:
        """`listener` is called (awaited, if it is a coroutine) with each new version."""
        self._listeners.append(listener)

    def before_replace(self, prepare: Callable[[Loaded], Awaitable[None]]) -> None:
        """`prepare` completes each new version before it becomes `current` (the policy's
        run-time tenants are installed into it); what it raises rejects the version."""
        self._preparers.append(prepare)

    def while_building(self, building: Callable[[], AbstractContextManager[object]]) -> None:
        """Each reload the watcher makes runs inside `building()`, from the load to the last
        listener, whether the version is put in place or rejected (the policy's: no full
        garbage collection walks a half-built version)."""
        self._building = building

    async def replace(self, value: Loaded) -> None:
        for prepare in self._preparers:
            await prepare(value)
        self.current = value
        self.version += 1
        self.loaded_at = time.time()
        for listener in self._listeners:
            try:
                heard = listener(value)
                if inspect.isawaitable(heard):
                    await heard
            except Exception:
                # The version is active already; one failing listener must neither keep the
                # others from hearing of it nor end the watcher that called us.
                self._log.exception("%s version %d: a listener failed", self.path, self.version)

    async def watch(self, interval: float) -> None:
        """Poll every `interval` seconds and reload on a change; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            current = self._fingerprint(self.path)
            if current is None or current == self.loaded:
                continue
            self.loaded = current
            with self._building():
                await self._reload()

    async def _reload(self) -> None:
        value = await load_off_loop(self._load, self.path, self._log, self._rejected)
        if value is None:
            self.rejected_versions += 1
            return
        try:
            await self.replace(value)
        except Exception:
            # The version could not be completed: the one in use stays, as for a version
            # that does not load, and the watcher goes on.
            self.rejected_versions += 1
            self._rejected(())
            self._log.exception(
                "%s: new version could not be put in place, the previous one stays", self.path
            )
            return
        self._log.info("%s reloaded: version %d, %s", self.path, self.version, self._describe(value))

    def _rejected(self, problems: Sequence[PolicyProblem]) -> None:
        self.last_rejection = Rejection(time.time(), tuple(problems))


def file_fingerprint(path: Path) -> Fingerprint | None:
    try:
        resolved = os.path.realpath(path)
        stat = os.stat(resolved)
    except OSError:
        return None
    return (resolved, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def directory_fingerprint(directory: Path) -> Fingerprint | None:
    try:
        resolved = os.path.realpath(directory)
        entries = sorted(os.scandir(resolved), key=lambda entry: entry.name)
        return (resolved, *((e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size) for e in entries))
    except OSError:
        return None


async def load_off_loop(
    load: Callable[[Path], Loaded],
    source: Path,
    logger: logging.Logger,
    rejected: Callable[[Sequence[PolicyProblem]], None] = lambda problems: None,
) -> Loaded | None:
    """Load a new version in a thread (a large policy takes seconds to compile); None, logged,
    when the version is rejected.

    Whatever the version holds, the watcher calling this must live on: a later version (a
    revoked key) still has to apply. So an exception the loader did not mean to raise is
    logged with its traceback and treated as a rejection, not passed up to end the watcher.
    """
    try:
        return await asyncio.to_thread(load, source)
    except PolicyError as exc:
        logger.error("%s: new version rejected, the previous one stays:\n%s", source, _first_problems(exc))
        rejected(exc.problems)
    except Exception:
        logger.exception("%s: new version failed to load (a meshtoll bug), the previous one stays", source)
        rejected(())
    return None


def _first_problems(error: PolicyError) -> str:
    lines = [str(problem) for problem in error.problems[:LOGGED_PROBLEMS]]
    if len(error.problems) > LOGGED_PROBLEMS:
        lines.append(f"... and {len(error.problems) - LOGGED_PROBLEMS} more problems")
    return "\n".join(lines)
