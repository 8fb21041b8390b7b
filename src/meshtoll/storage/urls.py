"""Redis connection URLs, for standalone, Sentinel and Cluster deployments.

redis://[user:password@]host:port[/db]                 standalone
rediss://...                                            standalone over TLS
redis+sentinel://[password@]host:port[,host:port...]/service[/db]
redis+cluster://[password@]host:port[,host:port...]    cluster (seed nodes)
redis://host:port?cluster=true                          cluster too
unix://[[user:]password@]/path/to/redis.sock[?db=N]     standalone on a Unix socket (redis-py's form)

A Unix socket is for a Redis on the same host (a sidecar in meshtoll's pod): no port to
reach. It saves no CPU that the benchmark could measure (bench/README.md, "uvloop, Unix sockets").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from meshtoll.errors import ConfigError

Topology = Literal["standalone", "sentinel", "cluster"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    topology: Topology
    url: str  # for standalone: the redis(s):// URL itself
    nodes: tuple[tuple[str, int], ...]  # sentinel or cluster seed nodes
    service: str = ""  # the Sentinel's master name
    db: int = 0
    password: str | None = None
    username: str | None = None
    tls: bool = False
    unix_socket: str | None = None  # the socket's path, for a standalone Redis on this host


def parse_redis_url(url: str) -> RedisTarget:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "redis+sentinel", "redis+cluster", "unix"):
        raise _bad(url, "scheme must be redis, rediss, redis+sentinel, redis+cluster or unix")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if ":" in credentials else ("", "", credentials)
    if scheme == "unix":
        return _unix_target(url, hosts, unquote(username) or None, unquote(password) or None)
    nodes = tuple(_node(url, item) for item in hosts.split(",") if item)
    if not nodes:
        raise _bad(url, "no host")
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    cluster = scheme == "redis+cluster" or parse_qs(parts.query).get("cluster", ["false"])[0] == "true"
    common = {
        "password": unquote(password) or None,
        "username": unquote(username) or None,
        "tls": scheme == "rediss",
    }
    if scheme == "redis+sentinel":
        if not path:
            raise _bad(url, "a Sentinel URL names the service: .../service_name[/db]")
        return RedisTarget("sentinel", url, nodes, service=path[0], db=_db(url, path[1:]), **common)  # type: ignore[arg-type]
    if cluster:
        return RedisTarget("cluster", url, nodes, **common)  # type: ignore[arg-type]
    if len(nodes) > 1:
        raise _bad(url, "several hosts need redis+sentinel:// or redis+cluster://")
    return RedisTarget("standalone", url, nodes, db=_db(url, path), **common)  # type: ignore[arg-type]


def _unix_target(url: str, hosts: str, username: str | None, password: str | None) -> RedisTarget:
    parts = urlsplit(url)
    if hosts:
        raise _bad(url, "a unix:// URL names a path, not a host: unix:///path/to/redis.sock")
    if not parts.path.startswith("/"):
        raise _bad(url, "a unix:// URL needs the socket's absolute path: unix:///path/to/redis.sock")
    query = parse_qs(parts.query)
    db = _db(url, query.get("db", [])[:1])
    if "password" in query:  # redis-py's other place for it
        password = query["password"][0]
    return RedisTarget(
        "standalone", url, (), db=db, password=password, username=username, unix_socket=unquote(parts.path)
    )


def _node(url: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return (host.strip("[]") or "localhost", int(port or 6379))
    except ValueError:
        raise _bad(url, f"{text!r} is not host:port") from None


def _db(url: str, path: list[str]) -> int:
    if not path:
        return 0
    try:
        return int(path[0])
    except ValueError:
        raise _bad(url, f"database {path[0]!r} is not a number") from None


def _bad(url: str, what: str) -> ConfigError:
    # Shown redacted: these messages end up on terminals and in logs.
    return ConfigError(f"Redis URL {redact_redis_url(url)!r}: {what}")


def redact_redis_url(url: str) -> str:
    """`url` with its password shown as ***, for logs, banners and error messages.

    Credentials without a colon count as a password, as parse_redis_url reads them; a
    `password=` query parameter (which redis-py also accepts) is masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a Redis URL that cannot be parsed>"
    credentials, at, hosts = parts.netloc.rpartition("@")
    if credentials:
        username, colon, _ = credentials.partition(":")
        credentials = f"{username}:***" if colon else "***"
    query = "&".join(
        "password=***" if item.partition("=")[0].lower() == "password" else item
        for item in parts.query.split("&")
    )
    return urlunsplit((parts.scheme, f"{credentials}{at}{hosts}", parts.path, query, parts.fragment))
