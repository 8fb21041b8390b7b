"""A billing sink's state on Redis (standalone, Sentinel or Cluster): every key of one sink
under one hash tag, and each write that moves the sink forward one Lua call that first
checks the lease (storage/lua/sink_*.lua). Off the request path: redis-py throughout."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson

from meshtoll.keys import sink_key
from meshtoll.sinks.state import Cursor, PushedWindow, Quarantined
from meshtoll.storage.redis_access import RedisFailures, lua_script, redis_py_client
from meshtoll.storage.urls import parse_redis_url

Answer = TypeVar("Answer")
_NO_ANSWER = RedisFailures("Redis did not answer")


class RedisSinkStateStore:
    def __init__(self, url: str, *, timeout_ms: int = 2000) -> None:
        self._client, self._sentinels = redis_py_client(parse_redis_url(url), timeout_ms / 1000)
        self._save = self._client.register_script(lua_script("sink_save.lua"))
        self._lease = self._client.register_script(lua_script("sink_lease.lua"))
        self._replay = self._client.register_script(lua_script("sink_replay.lua"))
        self._pushed = self._client.register_script(lua_script("sink_pushed.lua"))

    async def _answer(self, call: Callable[[], Awaitable[Answer]]) -> Answer:
        with _NO_ANSWER:
            return await call()

    async def lease(self, sink: str, owner: str, seconds: float) -> bool:
        keys = [sink_key(sink, "lease")]
        return bool(
            await self._answer(lambda: self._lease(keys=keys, args=[owner, max(1, int(seconds * 1000))]))
        )

    async def unlease(self, sink: str, owner: str) -> None:
        await self._answer(lambda: self._lease(keys=[sink_key(sink, "lease")], args=[owner, 0]))

    async def cursors(self, sink: str) -> dict[str, Cursor]:
        raw = await self._answer(lambda: self._client.hgetall(sink_key(sink, "cursors")))
        return {tenant.decode(): Cursor.from_document(orjson.loads(text)) for tenant, text in raw.items()}

    async def save(
        self,
        sink: str,
        owner: str,
        cursors: Mapping[str, Cursor],
        quarantine: Sequence[Quarantined] = (),
        settled: Sequence[str] = (),
    ) -> bool:
        keys = [sink_key(sink, what) for what in ("lease", "cursors", "quarantine", "replay")]
        arguments: list[Any] = [owner, len(cursors)]
        for tenant, cursor in cursors.items():
            arguments += (tenant, orjson.dumps(cursor.as_document()))
        arguments.append(len(quarantine))
        for item in quarantine:
            arguments += (item.key, orjson.dumps(item.as_document()))
        arguments += settled
        return bool(await self._answer(lambda: self._save(keys=keys, args=arguments)))

    async def quarantined(self, sink: str) -> list[Quarantined]:
        return await self._read_records(sink, "quarantine")

    async def _read_records(self, sink: str, what: str) -> list[Quarantined]:
        raw = await self._answer(lambda: self._client.hvals(sink_key(sink, what)))
        found = [Quarantined.from_document(orjson.loads(text)) for text in raw]
        return sorted(found, key=lambda item: (item.at, item.key))

    async def replay(self, sink: str, keys: Sequence[str] | None) -> int:
        names = [sink_key(sink, "quarantine"), sink_key(sink, "replay")]
        return int(await self._answer(lambda: self._replay(keys=names, args=list(keys or ()))))

    async def replays(self, sink: str, limit: int) -> list[Quarantined]:
        return (await self._read_records(sink, "replay"))[:limit]

    async def pushed(self, sink: str) -> list[PushedWindow]:
        text = await self._answer(lambda: self._client.get(sink_key(sink, "pushed")))
        return [] if text is None else [PushedWindow.from_document(item) for item in orjson.loads(text)]

    async def save_pushed(self, sink: str, owner: str, windows: Sequence[PushedWindow]) -> bool:
        keys = [sink_key(sink, "lease"), sink_key(sink, "pushed")]
        text = orjson.dumps([window.as_document() for window in windows])
        return bool(await self._answer(lambda: self._pushed(keys=keys, args=[owner, text])))

    async def close(self) -> None:
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()
