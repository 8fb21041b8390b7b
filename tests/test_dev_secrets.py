"""`meshtoll dev --redis-url` with a password: never shown, never in a child's arguments,
and the stack still reaches that Redis."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.errors import ConfigError
from meshtoll.local.dev import DEMO_ACME_KEY
from meshtoll.local.devstack import find_redis_server
from meshtoll.local.processes import Child, Probe, free_ports, listens, retrying_lost_ports
from meshtoll.storage.urls import parse_redis_url, redact_redis_url
from tests.client import fetch
from tests.test_dev_stack import _descendants, running_dev
from tests.waiting import eventually

PASSWORD = "hunter2-Zq81xPw"
ACME = {"x-api-key": DEMO_ACME_KEY}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:pw%40x@127.0.0.1:6379/0", "redis://default:***@127.0.0.1:6379/0"),
        ("redis://:pw@h:1", "redis://:***@h:1"),
        ("rediss://user:pw@h:1/2", "rediss://user:***@h:1/2"),
        ("redis+sentinel://pw@a:1,b:2/main/1", "redis+sentinel://***@a:1,b:2/main/1"),
        ("redis://h:1/0?password=pw&cluster=true", "redis://h:1/0?password=***&cluster=true"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_a_redis_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    assert redact_redis_url(url) == shown


def test_a_bad_redis_url_is_reported_without_its_password() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_redis_url(f"redis://default:{PASSWORD}@127.0.0.1:notaport/0")
    assert PASSWORD not in str(bad.value)
    assert "redis://default:***@127.0.0.1:notaport/0" in str(bad.value)


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server that requires PASSWORD (from its config file, not its arguments)."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server is not installed; integration tests need a real Redis")
    config = tmp_path / "redis.conf"
    port = 0

    def start() -> tuple[Child, Probe]:
        nonlocal port
        (port,) = free_ports(1)
        config.write_text(
            f'bind 127.0.0.1\nport {port}\nrequirepass "{PASSWORD}"\nsave ""\nappendonly no\ndir "{tmp_path}"\n'
        )
        child = Child("redis-server", [str(binary), str(config)], tmp_path / "redis.log")
        started.append(child)
        return child, listens(child, port)

    started: list[Child] = []
    try:
        retrying_lost_ports(start, timeout=10)
        yield port
    finally:
        for child in started:
            child.stop()


@pytest.mark.integration
def test_meshtoll_dev_hides_the_redis_password_and_still_uses_it(
    tmp_path: Path, password_redis: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:{password_redis}/0"
    with running_dev(tmp_path, "--redis-url", url) as (dev, envoy):
        printed = (tmp_path / "dev.log").read_text()  # the banner and dev's log
        assert f"redis://default:***@127.0.0.1:{password_redis}/0" in printed
        children = _descendants(dev.pid)
        assert len(children) == 3  # upstream, meshtoll, envoy
        for pid in children:
            assert PASSWORD not in Path(f"/proc/{pid}/cmdline").read_text(), pid
        (serve,) = [pid for pid in children if b"\0serve\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        environment = Path(f"/proc/{serve}/environ").read_bytes().split(b"\0")
        assert f"MESHTOLL_REDIS_URL={url}".encode() in environment
        serve_log = Path(os.readlink(f"/proc/{serve}/fd/1"))

        reply = fetch(f"{envoy}/v1/chat/completions?tokens=77", headers=ACME)
        assert reply.status == 200
        eventually(
            lambda: chat_units(url, capsys),
            lambda units: units == 77,
            timeout=30,  # a deadline, not an expectation: Envoy's log flush and the meter's
            message="the request's usage never reached the password Redis",
        )
        assert PASSWORD not in serve_log.read_text()
    assert PASSWORD not in (tmp_path / "dev.log").read_text()


@pytest.mark.integration
def test_meshtoll_dev_refuses_a_wrong_redis_password_without_printing_it(
    password_redis: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev", "--redis-url", f"redis://default:wrong-{PASSWORD}@127.0.0.1:{password_redis}/0"]) == 1
    error = capsys.readouterr().err
    assert f"--redis-url redis://default:***@127.0.0.1:{password_redis}/0: Redis does not answer" in error
    assert PASSWORD not in error


def chat_units(url: str, capsys: pytest.CaptureFixture[str]) -> int:
    assert main(["usage", "show", "--tenant", "acme", "--redis-url", url, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    return sum(line["units"] for line in document["by_route"] if line["route"] == "chat")
