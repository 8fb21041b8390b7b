"""The metrics of a process group (`meshtoll serve --workers N`): whichever worker a scrape
reaches answers for all of them.

Each worker writes its collection to a file of its own in a directory the supervisor made,
once a second and when it stops; the worker that answers a scrape merges its live
collection with its siblings' files. The request path is untouched (its counts stay dict
increments), and the files outlive their writers: a worker that died keeps its counts in
the sum, and the worker started in its place writes a new file from zero, so nothing
vanishes or counts twice. What a worker killed outright counted in its last second is
lost with it. Gauges say what a process holds now, so only live workers' are merged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import orjson

from meshtoll.telemetry.families import Family, from_document, to_document
from meshtoll.telemetry.metrics import Metrics

log = logging.getLogger("meshtoll.telemetry")

SNAPSHOT_SECONDS = 1.0
_SUFFIX = ".json"


class WorkerGroup:
    def __init__(self, directory: Path, metrics: Metrics, *, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._metrics = metrics
        # The start time too: a later process given the same pid must not take over this file.
        self.path = directory / f"{self.pid}-{time.time_ns()}{_SUFFIX}"
        self._unreadable: set[Path] = set()

    def attach(self) -> None:
        """Make this process's /metrics answer for the group."""
        self._metrics.siblings = self.siblings
        self._metrics.workers = lambda: 1 + sum(1 for path, pid in self._files() if _alive(pid))

    def snapshot(self) -> bytes:
        return orjson.dumps(to_document(self._metrics.collect()))

    def write(self, document: bytes) -> None:
        # Whole or not at all: a sibling never reads a file half written.
        partial = self.path.with_suffix(".tmp")
        partial.write_bytes(document)
        os.replace(partial, self.path)

    async def run_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(SNAPSHOT_SECONDS)
                document = self.snapshot()  # read on the loop, where the counts change
                await asyncio.to_thread(self.write, document)
        finally:
            self.write(self.snapshot())  # a stopping worker's last counts stay in the sum

    def siblings(self) -> list[list[Family]]:
        """The other workers' last collections; a dead one's without its gauges."""
        found = []
        for path, pid in self._files():
            collection = self._read(path)
            if collection is None:
                continue
            if not _alive(pid):
                collection = [family for family in collection if family.kind != "gauge"]
            found.append(collection)
        return found

    def _files(self) -> list[tuple[Path, int]]:
        files = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            pid, _, _ = path.stem.partition("-")
            if path != self.path and pid.isdigit():
                files.append((path, int(pid)))
        return files

    def _read(self, path: Path) -> list[Family] | None:
        try:
            return from_document(orjson.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning("metrics of another worker not read from %s: %s", path, exc)
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
