"""`meshtoll ratelimit` as a container replacing envoyproxy/ratelimit: it refuses a bad
initial configuration with located errors, and its health follows Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigHolder
from meshtoll.local.devstack import RedisServer, rls_environment
from tests.conftest import RunningRls, StartRls
from tests.waiting import eventually, eventually_async

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).parent / "fixtures" / "ratelimit" / "config"


def test_an_invalid_initial_configuration_refuses_to_start_with_located_errors(tmp_path: Path) -> None:
    (tmp_path / "ratelimit" / "config").mkdir(parents=True)
    shutil.copy(CONFIG / "non_string_key.yaml", tmp_path / "ratelimit" / "config")
    shutil.copy(CONFIG / "replaces_self.yaml", tmp_path / "ratelimit" / "config")
    environment = {
        **os.environ,
        "RUNTIME_ROOT": str(tmp_path),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": "127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "meshtoll", "ratelimit"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "rate-limit configuration rejected" in done.stderr
    assert "non_string_key.yaml:1" in done.stderr
    assert "replaces_self.yaml:10" in done.stderr
    assert "Traceback" not in done.stderr


def healthy(rls: RunningRls) -> tuple[int, int]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rls.port}/healthcheck", timeout=5) as reply:
            http = reply.status
    except urllib.error.HTTPError as error:
        http = error.code
    with grpc.insecure_channel(f"127.0.0.1:{rls.grpc_port}") as channel:
        checked = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="ratelimit")
        )
    return http, checked.status


def test_health_follows_redis(start_rls: StartRls, tmp_path: Path) -> None:
    (tmp_path / "ratelimit" / "config").mkdir(parents=True)
    shutil.copy(CONFIG / "basic_config.yaml", tmp_path / "ratelimit" / "config")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with RedisServer(tmp_path / "redis") as redis:
        port = redis.port
        rls = start_rls(tmp_path, REDIS_URL=f"127.0.0.1:{port}", REDIS_TIMEOUT="200ms")
        assert healthy(rls) == (200, serving)
    wait_for_health(rls, (500, not_serving))
    with RedisServer(tmp_path / "redis-again", port=port):
        wait_for_health(rls, (200, serving))


def wait_for_health(rls: RunningRls, wanted: tuple[int, int]) -> None:
    eventually(
        lambda: healthy(rls),
        lambda health: health == wanted,
        timeout=10,
        interval=0.2,
        message=f"the health check never answered {wanted} (HTTP status, gRPC status)",
    )


async def test_a_kubernetes_configmap_update_is_picked_up(tmp_path: Path) -> None:
    """A ConfigMap volume: each file a symlink through `..data`, which Kubernetes swaps to a
    new timestamped directory on update (RUNTIME_IGNOREDOTFILES as envoyproxy/ratelimit's manifests set it)."""

    def version(name: str, requests: int) -> None:
        (tmp_path / name).mkdir()
        text = f"domain: d\ndescriptors: [{{key: k, rate_limit: {{unit: second, requests_per_unit: {requests}}}}}]\n"
        (tmp_path / name / "config.yaml").write_text(text)
        (tmp_path / "..data_new").symlink_to(name)
        (tmp_path / "..data_new").rename(tmp_path / "..data")

    version("..2026_12_01_1", 1)
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    holder = DescriptorConfigHolder(tmp_path, ignore_dot_files=True)
    task = asyncio.create_task(holder.watch(0.02))
    try:
        assert requests_of(holder) == 1
        version("..2026_12_01_2", 7)
        await eventually_async(
            lambda: requests_of(holder),
            lambda requests: requests == 7,
            timeout=5,
            interval=0.02,
            message="the swapped ConfigMap version never became active",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def requests_of(holder: DescriptorConfigHolder) -> int | None:
    found = holder.current.match("d", [("k", "v")])
    return None if found is None or found.limit is None else found.limit.requests


def test_with_at_least_one_config_required_health_follows_each_reload(
    start_rls: StartRls, tmp_path: Path
) -> None:
    """envoyproxy/ratelimit's SetConfig with HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED: a reload to a
    configuration without a domain fails health, one with a domain restores it, and a
    rejected reload changes nothing."""
    directory = tmp_path / "ratelimit" / "config"
    directory.mkdir(parents=True)
    shutil.copy(CONFIG / "basic_config.yaml", directory)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    rls = start_rls(tmp_path, HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED="true")
    assert healthy(rls) == (200, serving)
    (directory / "basic_config.yaml").unlink()
    wait_for_health(rls, (500, not_serving))
    shutil.copy(CONFIG / "basic_config.yaml", directory)
    wait_for_health(rls, (200, serving))
    # The bad file lands before the good one goes, so that no poll sees an empty directory
    # (a valid configuration without domains); each version it can see is rejected.
    shutil.copy(CONFIG / "non_string_key.yaml", directory)  # rejected: the last good one stays
    (directory / "basic_config.yaml").unlink()
    eventually(
        lambda: "new version rejected" in rls.child.log_path.read_text(),
        timeout=30,  # a deadline on the next poll, not an expectation
        message="the configuration with a non-string key was never rejected",
    )
    assert healthy(rls) == (200, serving)


def test_it_will_not_share_a_grpc_port_that_meshtoll_serve_holds(tmp_path: Path) -> None:
    from tests.serve import running_serve

    (tmp_path / "ratelimit" / "config").mkdir(parents=True)
    shutil.copy(CONFIG / "basic_config.yaml", tmp_path / "ratelimit" / "config")
    with running_serve(tmp_path) as serving:
        environment = {
            **os.environ,
            **rls_environment(tmp_path, "redis://127.0.0.1:1", grpc_port=serving.grpc_port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "meshtoll", "ratelimit"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert str(serving.grpc_port) in done.stderr
    assert "Traceback" not in done.stderr
