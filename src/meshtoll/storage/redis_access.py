"""The one way meshtoll reaches Redis: a client by topology (the pipelining LeanRedis for a
standalone Redis, redis-py for Sentinel and Cluster), and Lua scripts sent as EVALSHA with
the NOSCRIPT fallback; and the one translation of a failed call into meshtoll's errors
(RedisFailures), which both stores (redis.py, usage_redis.py) put around these calls: a
script Redis refuses is StorageRefused (permanent), everything else StorageUnavailable."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from importlib import resources
from types import TracebackType
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from meshtoll.errors import ConnectionLost, StorageUnavailable
from meshtoll.storage.resp import BulkStrings, LeanRedis, ScriptErrors, encode
from meshtoll.storage.urls import RedisTarget

# What a call to Redis raises when it fails, from either client: redis-py's errors, the
# socket's (timeouts and TLS errors are OSErrors too), the lean client's lost connection.
REDIS_FAILURES = (redis.exceptions.RedisError, OSError, ConnectionLost)


class RedisFailures:
    """A `with` block whose Redis or network failure leaves it as StorageUnavailable, the
    message starting with `what`. Built once and reused, since decisions enter one: a class
    rather than a generator-based context manager, which would allocate per use."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if isinstance(error, REDIS_FAILURES):
            raise self.unavailable(error) from None

    def unavailable(self, error: BaseException) -> StorageUnavailable:
        """The StorageUnavailable a Redis or network failure becomes (for a caller that
        catches REDIS_FAILURES itself, with no `with` block's two calls on its hot path)."""
        return StorageUnavailable(f"{self._what}: {type(error).__name__}: {error}")


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


# EVALSHA heads kept per script: one per number of keys and arguments (a decision of one
# check, of two, ...).
_SHAPES_KEPT = 64


class LeanScript:
    """A Lua script as the lean client sends it: EVALSHA built as one text from parts built
    once (the command's head per number of keys and arguments, each repeating item's RESP
    frame)."""

    def __init__(self, text: str, what: str) -> None:
        self.what = what  # for errors: "the decision script"
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest()
        self.errors = ScriptErrors(what, encode(["SCRIPT", "LOAD", self.text]))
        self._heads: dict[tuple[int, int], str] = {}
        self._frames = BulkStrings()

    def evalsha(self, keys: Sequence[str], arguments: Sequence[int]) -> bytes:
        # The hot path's one allocation-heavy step: remembered frames joined, one encode.
        head = self._heads.get((len(keys), len(arguments))) or self._head(len(keys), len(arguments))
        get, frame = self._frames.get, self._frames.frame
        return "".join(
            [head, *[get(key) or frame(key) for key in keys], *[get(n) or frame(n) for n in arguments]]
        ).encode()

    def _head(self, keys: int, arguments: int) -> str:
        count = f"${len(str(keys))}\r\n{keys}\r\n"
        head = f"*{3 + keys + arguments}\r\n$7\r\nEVALSHA\r\n$40\r\n{self.sha}\r\n{count}"
        if len(self._heads) >= _SHAPES_KEPT:
            self._heads.clear()  # a client's request may name any number of descriptors
        self._heads[keys, arguments] = head
        return head

    def call(self, redis: LeanRedis, command: bytes) -> Awaitable[Any]:
        """Send `command` (an EVALSHA of this script); its reply, or StorageRefused. After
        NOSCRIPT the connection loads the script and sends the call again (RespProtocol).
        Not a coroutine: the reply's future itself, one frame less to resume."""
        return redis.call(command, self.errors)
