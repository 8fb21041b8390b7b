"""`meshtoll dev`: the demo requests its banner suggests get the answers it promises."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.local.dev import DEMO_ACME_KEY, EXAMPLE_POLICY, demo_requests
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
    with running_dev(tmp_path) as (dev, url):
        reply = fetch(f"{url}/v1/items", headers={"x-api-key": DEMO_ACME_KEY})
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
    with running_dev(tmp_path, "--redis-url", redis_url) as (dev, url):
        assert redis_url in (tmp_path / "dev.log").read_text()
        assert len(_descendants(dev.pid)) == 3  # upstream, meshtoll, envoy: no Redis of its own
        chat = f"{url}/v1/chat/completions?tokens=321"
        assert fetch(chat, headers={"x-api-key": DEMO_ACME_KEY}).status == 200
        eventually(
            chat_units,
            lambda units: units == before + 321,
            timeout=30,  # a deadline, not an expectation: Envoy's log flush and the meter's
            message="the request's usage never reached the CLI",
        )


def test_meshtoll_dev_refuses_a_redis_it_cannot_reach(capsys: pytest.CaptureFixture[str]) -> None:
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    # Port 1: nothing listens there (not a port another test run could have taken).
    assert main(["dev", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    error = capsys.readouterr().err
    assert "--redis-url redis://127.0.0.1:1/0: Redis does not answer" in error
    # Run in-process, dev gives its caller's Ctrl-C back (pytest's, here).
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers


@contextlib.contextmanager
def running_dev(tmp_path: Path, *more: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`meshtoll dev` on ports of its own choice, in a process group of its own, ready, and
    the URL its banner gives for clients; killed if the test did not stop it."""
    log = (tmp_path / "dev.log").open("w")
    argv = [sys.executable, "-m", "meshtoll", "dev", "--port", "0", "--admin-port", "0"]
    dev = subprocess.Popen([*argv, *more], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def ready() -> bool:
            printed = (tmp_path / "dev.log").read_text()
            assert dev.poll() is None, printed
            return "the local stack is ready" in printed

        eventually(ready, timeout=30, message="meshtoll dev never became ready")
        banner = (tmp_path / "dev.log").read_text()
        found = re.search(r"Envoy, authz \+ limits \+ metering +(http://127\.0\.0\.1:\d+)", banner)
        assert found is not None, banner
        yield dev, found.group(1)
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
