"""The one way meshtoll reaches Redis: a client by topology (the pipelining LeanRedis for a
standalone Redis, redis-py for Sentinel and Cluster), and Lua scripts sent as EVALSHA with
the NOSCRIPT fallback. The stores (redis.py, usage_redis.py) translate failures into
StorageUnavailable (transient) or StorageRefused (permanent) around these calls."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from meshtoll.errors import StorageRefused
from meshtoll.storage.resp import LeanRedis, encode
from meshtoll.storage.urls import RedisTarget


def lua_script(name: str) -> str:
    """The text of storage/lua/<name>."""
    return (resources.files("meshtoll") / "storage" / "lua" / name).read_text()


def lean_client(target: RedisTarget, timeout: float) -> LeanRedis:
    """The pipelining client for a standalone Redis, over TCP or its Unix socket."""
    return LeanRedis(target, timeout=timeout)


def redis_py_client(target: RedisTarget, timeout: float) -> tuple[Any, list[Any]]:
    """A redis-py client, and the Sentinel connections it was found through (closed with it)."""
    options: dict[str, Any] = {
        # One quick retry inside redis-py (a stale cluster slot map, a dropped connection):
        # safe, because the script recognises a decision that already ran by its marker.
        "retry": Retry(NoBackoff(), 1),
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "password": target.password,
        "username": target.username,
    }
    if target.topology == "standalone":
        return redis.asyncio.Redis.from_url(target.url, **options), []
    if target.topology == "sentinel":
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs={"socket_timeout": timeout}, **options)
        return sentinel.master_for(target.service, db=target.db), list(sentinel.sentinels)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(startup_nodes=nodes, ssl=target.tls, **options), []


class LeanScript:
    """A Lua script as the lean client sends it: EVALSHA built as one text."""

    def __init__(self, text: str, what: str) -> None:
        self.what = what  # for errors: "the decision script"
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest()
        self._head = f"$7\r\nEVALSHA\r\n$40\r\n{self.sha}\r\n"

    def evalsha(self, keys: list[str], arguments: list[int]) -> bytes:
        # The hot path's one allocation-heavy step, so built as one text: the fixed head
        # once, each key and number as a RESP bulk string, encoded in a single call.
        items = [*keys, *map(str, arguments)]
        body = "".join([f"${len(item)}\r\n{item}\r\n" for item in items])
        if not body.isascii():  # a key with non-ASCII text: lengths must count bytes
            return encode(["EVALSHA", self.sha, len(keys), *keys, *arguments])
        return f"*{len(items) + 3}\r\n{self._head}${len(str(len(keys)))}\r\n{len(keys)}\r\n{body}".encode()

    async def call(self, redis: LeanRedis, command: bytes) -> Any:
        """Send `command` (an EVALSHA of this script); its reply, or StorageRefused."""
        reply = await redis.call(command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # A restarted or flushed Redis forgot the script. NOSCRIPT means it did not run,
            # so the second attempt cannot count twice.
            await redis.call(encode(["SCRIPT", "LOAD", self.text]))
            reply = await redis.call(command)
        if isinstance(reply, hiredis.ReplyError):
            raise StorageRefused(f"Redis refused {self.what}: {reply}")
        return reply
