"""`meshtoll dev`: the demo requests its banner suggests get the answers it promises."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.local.dev import DEMO_ACME_KEY, EXAMPLE_POLICY, demo_requests
from meshtoll.local.processes import free_ports
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration


def test_every_suggested_demo_request_gets_the_promised_answer(start_stack: StartStack) -> None:
    stack = start_stack(EXAMPLE_POLICY)
    http, grpc = stack.url("listen_full_port", ""), stack.url("listen_grpc_authz_port", "")
    for demo in demo_requests(http, grpc):
        reply = fetch(demo.url, method=demo.method, headers=dict(demo.headers))
        status, _, code = demo.expect.partition(" ")
        assert reply.status == int(status[:3]), (demo, reply)
        if reply.status != 200:
            assert reply.json()["error"] == code, (demo, reply)
        else:
            assert reply.json()["headers"]["x-meshtoll-tenant"] in ("acme", "globex")


def test_meshtoll_dev_serves_and_stops_every_child_on_sigterm(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)  # the gRPC listener takes port + 1
    with running_dev(tmp_path, port, admin_port) as dev:
        reply = fetch(f"http://127.0.0.1:{port}/v1/items", headers={"x-api-key": DEMO_ACME_KEY})
        assert reply.status == 200
        children = _descendants(dev.pid)
        assert len(children) >= 4  # redis, upstream, meshtoll, envoy
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=20) == 0
        assert not [pid for pid in children if _alive(pid)], "a child outlived meshtoll dev"


def test_meshtoll_dev_on_a_given_redis_shares_usage_with_the_cli(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def chat_units() -> int:
        assert main(["usage", "show", "--tenant", "acme", "--redis-url", redis_url, "--format", "json"]) == 0
        document = json.loads(capsys.readouterr().out)
        return sum(line["units"] for line in document["by_route"] if line["route"] == "chat")

    before = chat_units()
    port, admin_port = free_ports(2)
    with running_dev(tmp_path, port, admin_port, "--redis-url", redis_url) as dev:
        assert redis_url in (tmp_path / "dev.log").read_text()
        assert len(_descendants(dev.pid)) == 3  # upstream, meshtoll, envoy: no Redis of its own
        url = f"http://127.0.0.1:{port}/v1/chat/completions?tokens=321"
        assert fetch(url, headers={"x-api-key": DEMO_ACME_KEY}).status == 200
        eventually(
            chat_units,
            lambda units: units == before + 321,
            timeout=2,
            message="the request's usage never reached the CLI",
        )


def test_meshtoll_dev_refuses_a_redis_it_cannot_reach(capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    assert main(["dev", "--redis-url", f"redis://127.0.0.1:{port}/0"]) == 1
    error = capsys.readouterr().err
    assert f"--redis-url redis://127.0.0.1:{port}/0: Redis does not answer" in error


@contextlib.contextmanager
def running_dev(tmp_path: Path, port: int, admin_port: int, *more: str) -> Iterator[subprocess.Popen[bytes]]:
    """`meshtoll dev` in a process group of its own, ready; killed if the test did not stop it."""
    log = (tmp_path / "dev.log").open("w")
    argv = [sys.executable, "-m", "meshtoll", "dev", "--port", str(port), "--admin-port", str(admin_port)]
    dev = subprocess.Popen([*argv, *more], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def ready() -> bool:
            printed = (tmp_path / "dev.log").read_text()
            assert dev.poll() is None, printed
            return "the local stack is ready" in printed

        eventually(ready, timeout=30, message="meshtoll dev never became ready")
        yield dev
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGTERM)
            try:
                dev.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
        log.close()


def _descendants(pid: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += [int(child), *_descendants(int(child))]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
