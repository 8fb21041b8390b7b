"""A billing sink's state in memory: for a single process without Redis, and the reference
the Redis store's contract tests run against."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from meshtoll.sinks.state import Cursor, PushedWindow, Quarantined


class MemorySinkStateStore:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, tuple[str, float]] = {}  # sink -> (owner, until)
        self._cursors: dict[str, dict[str, Cursor]] = {}
        self._quarantine: dict[str, dict[str, Quarantined]] = {}
        self._replay: dict[str, dict[str, Quarantined]] = {}
        self._pushed: dict[str, list[PushedWindow]] = {}

    def _holds(self, sink: str, owner: str) -> bool:
        holder = self._leases.get(sink)
        return holder is not None and holder[0] == owner and holder[1] > self._clock()

    async def lease(self, sink: str, owner: str, seconds: float) -> bool:
        holder = self._leases.get(sink)
        if holder is not None and holder[0] != owner and holder[1] > self._clock():
            return False
        self._leases[sink] = (owner, self._clock() + seconds)
        return True

    async def unlease(self, sink: str, owner: str) -> None:
        if self._holds(sink, owner):
            del self._leases[sink]

    async def cursors(self, sink: str) -> dict[str, Cursor]:
        return dict(self._cursors.get(sink, {}))

    async def save(
        self,
        sink: str,
        owner: str,
        cursors: Mapping[str, Cursor],
        quarantine: Sequence[Quarantined] = (),
        settled: Sequence[str] = (),
    ) -> bool:
        if not self._holds(sink, owner):
            return False
        self._cursors.setdefault(sink, {}).update(cursors)
        replay = self._replay.setdefault(sink, {})
        for item in quarantine:
            self._quarantine.setdefault(sink, {})[item.key] = item
            replay.pop(item.key, None)
        for key in settled:
            replay.pop(key, None)
        return True

    async def quarantined(self, sink: str) -> list[Quarantined]:
        return sorted(self._quarantine.get(sink, {}).values(), key=lambda item: (item.at, item.key))

    async def replay(self, sink: str, keys: Sequence[str] | None) -> int:
        quarantine = self._quarantine.get(sink, {})
        chosen = list(quarantine) if keys is None else [key for key in keys if key in quarantine]
        for key in chosen:
            self._replay.setdefault(sink, {})[key] = quarantine.pop(key)
        return len(chosen)

    async def replays(self, sink: str, limit: int) -> list[Quarantined]:
        found = sorted(self._replay.get(sink, {}).values(), key=lambda item: (item.at, item.key))
        return found[:limit]

    async def pushed(self, sink: str) -> list[PushedWindow]:
        return list(self._pushed.get(sink, []))

    async def save_pushed(self, sink: str, owner: str, windows: Sequence[PushedWindow]) -> bool:
        if not self._holds(sink, owner):
            return False
        self._pushed[sink] = list(windows)
        return True

    async def close(self) -> None:
        return None
