"""Fixtures that start real processes: Redis, Envoy, meshtoll and the demo upstream.

Each integration test module writes its policy once (tmp_path_factory, in a module
fixture) and calls `start_stack(policy)`; a second call with the same arguments in the same
module returns the running stack, and every stack stops when its module ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from meshtoll.local.devstack import (
    START_TIMEOUT_SECONDS,
    LocalStack,
    RedisServer,
    StackConfig,
    find_redis_server,
    rls_environment,
)
from meshtoll.local.envoy_process import find_envoy
from meshtoll.local.processes import Child, announced_ports, http_ok, read_ports
from meshtoll.storage import MemoryUsageStore
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.store import UsageStore
from tests.certs import TestPki, make_pki
from tests.envoy_harness import local_stack

ENVOY_OVERRIDE = "MESHTOLL_TEST_ENVOY"

# The fixtures that start Envoy, Redis or meshtoll: a test that uses one is an integration
# test and must say so, so that `pytest -m "not integration"` needs nothing but meshtoll.
PROCESS_FIXTURES = frozenset({"envoy_binary", "redis_url", "start_stack", "start_rls"})
# A store fixture's Redis variant, which reaches the session's Redis through getfixturevalue.
ON_REDIS = pytest.param("redis", marks=pytest.mark.integration)
# Every stack's meshtoll waits on Redis up to 1 s, not the 50 ms default: under load a round
# trip past 50 ms made the open failure policy admit uncounted, and a test about counting saw
# an extra 200. Still inside the time Envoy gives meshtoll in tests (envoy_harness.py), so
# meshtoll's failure policy answers before Envoy gives up. A test about timeouts gives its
# own, which is then left alone.
REDIS_TIMEOUT_FLAG = "--redis-timeout-ms"
STACK_REDIS_TIMEOUT_MS = "1000"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("integration") is None
        and PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that start Envoy, Redis or meshtoll through a fixture "
            f"({', '.join(sorted(PROCESS_FIXTURES))}) must be marked integration:\n  " + "\n  ".join(unmarked)
        )


class StartStack(Protocol):
    def __call__(
        self,
        policy: Path | None,
        *,
        mtls: bool = False,
        authz_stub: bool = False,
        redis: bool = True,
        workers: int = 1,
        redis_url: str | None = None,
        serve_args: tuple[str, ...] = (),
        api_key_query_param: str | None = None,
        traces_port: int | None = None,
        meshtoll_environment: tuple[tuple[str, str], ...] = (),
        shipped_timeouts: bool = False,
    ) -> LocalStack:
        """A running stack; `policy=None` runs no meshtoll, `redis=False` its in-memory store;
        `redis_url` another Redis than the session's; `serve_args` more serve flags;
        `api_key_query_param` the policy's, for Envoy to remove after HTTP ext_authz;
        `traces_port` an OTLP/HTTP collector Envoy traces to; `meshtoll_environment` more
        variables for meshtoll serve; `shipped_timeouts` Envoy's calls to meshtoll timed out
        as shipped rather than with test timeouts (tests/envoy_harness.py)."""
        ...


@pytest.fixture(scope="session")
def envoy_binary() -> Path:
    """The Envoy every through-Envoy test runs: MESHTOLL_TEST_ENVOY names another binary
    than the installed one (`scripts/test --envoy-matrix` sets it for each supported Envoy)."""
    chosen = os.environ.get(ENVOY_OVERRIDE)
    if chosen:
        return Path(chosen)
    return find_envoy()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the session; tests keep apart by tenant names or FLUSHDB."""
    if find_redis_server() is None:
        pytest.fail("redis-server is not installed; integration tests need a real Redis")
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis:
        yield redis.url


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def start_stack(
    tmp_path_factory: pytest.TempPathFactory,
    envoy_binary: Path,
    redis_url: str,
    pki: TestPki,
) -> Iterator[StartStack]:
    session_redis_url = redis_url
    running: dict[tuple[object, ...], LocalStack] = {}
    with ExitStack() as cleanup:

        def start(
            policy: Path | None,
            *,
            mtls: bool = False,
            authz_stub: bool = False,
            redis: bool = True,
            workers: int = 1,
            redis_url: str | None = None,
            serve_args: tuple[str, ...] = (),
            api_key_query_param: str | None = None,
            traces_port: int | None = None,
            meshtoll_environment: tuple[tuple[str, str], ...] = (),
            shipped_timeouts: bool = False,
        ) -> LocalStack:
            key = (
                policy,
                mtls,
                authz_stub,
                redis,
                workers,
                redis_url,
                serve_args,
                api_key_query_param,
                traces_port,
                meshtoll_environment,
                shipped_timeouts,
            )
            if key not in running:
                config = StackConfig(
                    policy=policy,
                    redis_url=(redis_url or session_redis_url) if redis else None,
                    serve_args=serve_args
                    if REDIS_TIMEOUT_FLAG in serve_args
                    else (*serve_args, REDIS_TIMEOUT_FLAG, STACK_REDIS_TIMEOUT_MS),
                    mtls=pki.server if mtls else None,
                    authz_stub=authz_stub,
                    workers=workers,
                    envoy_binary=envoy_binary,
                    work_dir=tmp_path_factory.mktemp("stack"),
                    api_key_query_param=api_key_query_param,
                    traces_port=traces_port,
                    meshtoll_environment=meshtoll_environment,
                )
                running[key] = cleanup.enter_context(local_stack(config, shipped_timeouts=shipped_timeouts))
            return running[key]

        yield start


@pytest.fixture(params=["memory", ON_REDIS])
async def usage_store(request: pytest.FixtureRequest) -> AsyncIterator[UsageStore]:
    """Each usage store in turn, for the tests both must pass (the Redis one on the
    session's Redis)."""
    if request.param == "memory":
        yield MemoryUsageStore()
        return
    found = RedisUsageStore(request.getfixturevalue("redis_url"))
    yield found
    await found.close()


@dataclass(frozen=True)
class RunningRls:
    """`meshtoll ratelimit` started with envoyproxy/ratelimit's environment variables."""

    grpc_port: int
    port: int
    debug_port: int
    child: Child


class StartRls(Protocol):
    def __call__(self, runtime_root: Path, **environment: str) -> RunningRls:
        """Running with RUNTIME_ROOT=`runtime_root`, RUNTIME_SUBDIRECTORY=ratelimit, the
        session's Redis, ports of its own choice; `environment` adds or overrides variables."""
        ...


@pytest.fixture(scope="module")
def start_rls(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[StartRls]:
    with ExitStack() as cleanup:

        def start(runtime_root: Path, **environment: str) -> RunningRls:
            work = tmp_path_factory.mktemp("rls")
            ports_file = work / "ratelimit.ports"
            env = {
                **rls_environment(runtime_root, redis_url),
                "LOG_LEVEL": "info",
                "MESHTOLL_PORTS_FILE": str(ports_file),
                **environment,
            }
            argv = [sys.executable, "-m", "meshtoll", "ratelimit"]
            child = Child("meshtoll ratelimit", argv, work / "ratelimit.log", env)
            cleanup.callback(child.stop)
            child.wait_ready(announced_ports(ports_file), timeout=START_TIMEOUT_SECONDS)
            ports = read_ports(ports_file)
            child.wait_ready(
                http_ok(f"http://127.0.0.1:{ports['port']}/healthcheck"), timeout=START_TIMEOUT_SECONDS
            )
            return RunningRls(ports["grpc_port"], ports["port"], ports["debug_port"], child)

        yield start
