"""Hot reload: watch the policy file and swap in each new version that validates.

Decisions read `PolicyHolder.current` once and keep that object, so a swap never changes
a policy under a decision in flight. The file is polled by its resolved path and inode,
which also catches a Kubernetes ConfigMap update (an atomic swap of the `..data` symlink
that leaves the mounted file's own path and mtime looking unchanged).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from meshtoll.errors import PolicyError
from meshtoll.policy.compiled import CompiledPolicy
from meshtoll.policy.load import load_policy

log = logging.getLogger("meshtoll.policy")

Fingerprint = tuple[str, int, int, int]
Loaded = TypeVar("Loaded")


class PolicyHolder:
    """The active policy; replaced whole, never mutated."""

    def __init__(self, path: Path, policy: CompiledPolicy, loaded: Fingerprint | None) -> None:
        self.path = path
        self.current = policy
        self.loaded = loaded  # the file version `current` came from
        self.version = 1
        self.rejected_versions = 0
        self._listeners: list[Callable[[CompiledPolicy], None]] = []

    @classmethod
    def from_file(cls, path: Path) -> PolicyHolder:
        # Fingerprint first: a change that lands while loading is then seen as a change.
        loaded = fingerprint(path)
        return cls(path, load_policy(path), loaded)

    def on_change(self, listener: Callable[[CompiledPolicy], None]) -> None:
        self._listeners.append(listener)

    def replace(self, policy: CompiledPolicy) -> None:
        self.current = policy
        self.version += 1
        for listener in self._listeners:
            try:
                listener(policy)
            except Exception:
                # The version is active already; one failing listener must neither keep the
                # others from hearing of it nor end the watcher that called us.
                log.exception("policy version %d: a listener failed", self.version)


def fingerprint(path: Path) -> Fingerprint | None:
    try:
        resolved = os.path.realpath(path)
        stat = os.stat(resolved)
    except OSError:
        return None
    return (resolved, stat.st_ino, stat.st_mtime_ns, stat.st_size)


async def watch_policy(holder: PolicyHolder, interval: float) -> None:
    """Poll the file every `interval` seconds and reload it when it changes; runs forever."""
    seen = holder.loaded
    while True:
        await asyncio.sleep(interval)
        current = fingerprint(holder.path)
        if current is None or current == seen:
            continue
        seen = holder.loaded = current
        policy = await load_off_loop(load_policy, holder.path, log)
        if policy is None:
            holder.rejected_versions += 1
            continue
        holder.replace(policy)
        log.info("policy reloaded: version %d, %d tenants", holder.version, len(policy.tenants))


async def load_off_loop(
    load: Callable[[Path], Loaded], source: Path, logger: logging.Logger
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
    except Exception:
        logger.exception("%s: new version failed to load (a meshtoll bug), the previous one stays", source)
    return None


# A generated file can be wrong in every entry: the log gets the first problems, not a
# hundred thousand lines at each poll of a broken version.
LOGGED_PROBLEMS = 50


def _first_problems(error: PolicyError) -> str:
    lines = [str(problem) for problem in error.problems[:LOGGED_PROBLEMS]]
    if len(error.problems) > LOGGED_PROBLEMS:
        lines.append(f"... and {len(error.problems) - LOGGED_PROBLEMS} more problems")
    return "\n".join(lines)
