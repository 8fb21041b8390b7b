"""`meshtoll dev`: the whole local stack in the foreground, with a banner of what to try."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.exceptions

from meshtoll.errors import ConfigError
from meshtoll.local.devstack import LocalStack, RedisServer, StackConfig, find_redis_server
from meshtoll.policy import load_policy
from meshtoll.storage.redis_access import redis_py_client
from meshtoll.storage.urls import parse_redis_url, redact_redis_url

log = logging.getLogger("meshtoll.local.dev")

# Packaged with meshtoll (a link to the repository's examples/ in a checkout).
EXAMPLE_POLICY = (Path(__file__).parent.parent / "examples" / "policy.yaml").resolve()

# The demo credentials of examples/policy.yaml (which stores only their hashes); a test
# checks that each still gets the answer the banner promises.
DEMO_ACME_KEY = "mt_demo_acme_5f0c1e9a7b2d4e6f"
DEMO_GLOBEX_KEY = "mt_demo_globex_8a3b6c1d0e2f4a5b"
DEMO_REVOKED_KEY = "mt_demo_revoked_1a2b3c4d5e6f7a8b"


@dataclass(frozen=True, slots=True)
class DemoRequest:
    expect: str  # the status, and the error code of a denial
    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()


def demo_requests(http: str, grpc: str) -> list[DemoRequest]:
    """What the banner suggests trying against examples/policy.yaml."""
    acme = (("x-api-key", DEMO_ACME_KEY),)
    return [
        DemoRequest(
            "200: the upstream's echo shows the x-meshtoll-* headers",
            "GET",
            f"{http}/v1/search?q=envoy",
            acme,
        ),
        DemoRequest(
            "200, through the gRPC ext_authz listener",
            "GET",
            f"{grpc}/anything",
            (("authorization", f"Bearer {DEMO_GLOBEX_KEY}"),),
        ),
        DemoRequest(
            "200: the ext_proc hook bills the body's usage.total_tokens (250 units)",
            "GET",
            f"{http}/v1/chat/completions?tokens=250",
            acme,
        ),
        DemoRequest("401 missing_credentials", "GET", f"{http}/v1/search"),
        DemoRequest("401 revoked_api_key", "GET", f"{http}/v1/search", (("x-api-key", DEMO_REVOKED_KEY),)),
        DemoRequest("403 route_not_allowed", "GET", f"{http}/v2/items", acme),
        DemoRequest("403 method_not_allowed", "DELETE", f"{http}/v1/items", acme),
    ]


def run_dev(policy: Path | None, port: int, admin_port: int, redis_url: str | None = None) -> int:
    """`redis_url`: a Redis to share with other tools (the usage and billing commands);
    None starts a throwaway one (or keeps state in memory without redis-server). Its
    password is never shown, and reaches `meshtoll serve` by its environment, not argv."""
    policy = policy or EXAMPLE_POLICY
    stop = threading.Event()
    with ExitStack() as running:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, lambda *_: stop.set())
            # Given back when dev returns: run in-process (the tests do), it must not leave
            # its caller deaf to Ctrl-C. (None: a handler not set from Python, left as it is.)
            if previous is not None:
                running.callback(signal.signal, signum, previous)
        if redis_url is not None:
            check_redis_reachable(redis_url)
            log.info("Redis: %s (given)", redact_redis_url(redis_url))
        elif find_redis_server() is not None:
            redis_url = running.enter_context(RedisServer()).url
            log.info("Redis: %s", redis_url)
        else:
            log.info("Redis: redis-server not found, so meshtoll keeps its state in memory")
        fixed = {
            "listen_full_port": port,
            # Beside the port given; with 0, Envoy chooses both (the banner shows them).
            "listen_grpc_authz_port": port + 1 if port else 0,
            "meshtoll_admin_port": admin_port,
        }
        stack = running.enter_context(
            LocalStack(
                StackConfig(
                    policy=policy,
                    redis_url=redis_url,
                    fixed_ports=fixed,
                    api_key_query_param=load_policy(policy).policy.auth.api_key_query_param,
                )
            )
        )
        print(banner(stack, policy, redis_url), flush=True)
        stop.wait()
        log.info("stopping the local stack")
    return 0


def check_redis_reachable(url: str) -> None:
    """Fail before anything starts when the given Redis cannot be used."""
    client, sentinels = redis_py_client(parse_redis_url(url), 2.0)  # a bad URL: ConfigError
    try:
        asyncio.run(_ping(client, sentinels))
    except (redis.exceptions.RedisError, OSError) as exc:
        raise ConfigError(f"--redis-url {redact_redis_url(url)}: Redis does not answer ({exc})") from None


async def _ping(client: Any, sentinels: list[Any]) -> None:
    try:
        await client.ping()
    finally:
        for connection in (client, *sentinels):
            await connection.aclose()


def banner(stack: LocalStack, policy: Path, redis_url: str | None) -> str:
    shown = None if redis_url is None else redact_redis_url(redis_url)
    http = stack.url("listen_full_port", "")
    grpc = stack.url("listen_grpc_authz_port", "")
    lines = [
        "",
        "meshtoll dev: the local stack is ready (Ctrl-C stops everything)",
        f"  Envoy, authz + limits + metering   {http}",
        f"  Envoy, gRPC ext_authz              {grpc}",
        f"  meshtoll admin                     {stack.meshtoll_admin_url}/readyz",
        f"  policy                             {policy}  (edit it: changes apply within a second)",
        f"  Redis                              {shown or 'none (in-memory state)'}",
        "",
    ]
    if redis_url is not None:
        # A URL with a password stays off the screen (and out of shell history): the commands
        # then read it from the environment.
        given = f" --redis-url {redis_url}" if shown == redis_url else ""
        lines += [
            "Usage and invoices, a couple of seconds after the requests"
            + ("" if given else " (with MESHTOLL_REDIS_URL set to your Redis URL)")
            + ":",
            f"  meshtoll usage show --tenant acme{given}",
            f"  meshtoll billing invoice --tenant acme --policy {policy}{given}",
            "",
        ]
    if policy.resolve() != EXAMPLE_POLICY:
        lines.append(f"Try: curl -i -H 'x-api-key: <a key of your policy>' {http}/")
        return "\n".join(lines)
    lines.append("Try:")
    for demo in demo_requests(http, grpc):
        flags = "".join(f" -H '{name}: {value}'" for name, value in demo.headers)
        method = "" if demo.method == "GET" else f" -X {demo.method}"
        lines += [f"  # {demo.expect}", f"  curl -i{method}{flags} {demo.url}"]
    return "\n".join(lines)
