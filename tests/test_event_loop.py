"""meshtoll's servers run on uvloop unless told otherwise or uvloop is missing, and its h2c
gRPC server answers a grpc.aio client's calls on it."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.grpc_transport import CHECK_METHOD, AuthorizationServicer
from meshtoll.authz.jwks import JwksCache
from meshtoll.envoyproxy_ratelimit.environment import rls_settings_from
from meshtoll.errors import ConfigError
from meshtoll.local.dev import DEMO_ACME_KEY
from meshtoll.policy.reload import PolicyHolder
from meshtoll.server.event_loop import run_on_event_loop, running_loop_name
from meshtoll.settings import Settings, settings_from
from meshtoll.transport.h2_server import serve_grpc
from meshtoll.transport.http_listener import listening_socket
from tests.serve import EXAMPLE_POLICY, running_serve


def loop_of(choice: str) -> str:
    names = []

    async def record() -> None:
        names.append(running_loop_name())

    run_on_event_loop(record(), choice)
    return names[0]


def test_uvloop_is_the_default_and_asyncio_can_be_chosen() -> None:
    assert Settings().event_loop == "uvloop"
    assert loop_of("uvloop") == "uvloop"
    assert loop_of("asyncio") == "asyncio"


def test_without_uvloop_installed_the_servers_run_on_asyncio(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` finds when it is missing
    with caplog.at_level(logging.WARNING, "meshtoll"):
        assert loop_of("uvloop") == "asyncio"
    assert "uvloop is not installed" in caplog.text


def test_the_event_loop_is_a_setting_of_both_servers() -> None:
    assert settings_from({}, {"MESHTOLL_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    assert settings_from({"event_loop": "uvloop"}, {"MESHTOLL_EVENT_LOOP": "asyncio"}).event_loop == "uvloop"
    with pytest.raises(ConfigError, match="event_loop: 'trio' is not one of uvloop, asyncio"):
        Settings(event_loop="trio")
    peer = {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": "127.0.0.1:6379"}
    assert rls_settings_from(peer).event_loop == "uvloop"
    assert rls_settings_from(peer | {"MESHTOLL_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="MESHTOLL_EVENT_LOOP='trio' is not valid"):
        rls_settings_from(peer | {"MESHTOLL_EVENT_LOOP": "trio"})


def test_the_h2c_server_answers_grpc_aio_ext_authz_checks_on_uvloop() -> None:
    answers: list[int] = []

    async def serve_and_call() -> None:
        authorizer = Authorizer(PolicyHolder.from_file(EXAMPLE_POLICY), JwksCache())
        sock = listening_socket("127.0.0.1", 0)
        async with (
            serve_grpc({CHECK_METHOD: AuthorizationServicer(authorizer).check}, sock),
            grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel,
        ):
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            for key in (DEMO_ACME_KEY, "not-a-key") * 50:
                request = external_auth_pb2.CheckRequest()
                http = request.attributes.request.http
                http.method, http.path, http.headers["x-api-key"] = "GET", "/v1/search", key
                request.attributes.source.address.socket_address.address = "127.0.0.1"
                answers.append((await check(request, timeout=5)).status.code)
            # Concurrent calls as well: one connection's streams, and grpc.aio's completion
            # queue, against uvloop's poller.
            replies = await asyncio.gather(*(check(request, timeout=5) for _ in range(100)))
            answers.extend(reply.status.code for reply in replies)
        answers.append(-1 if running_loop_name() != "uvloop" else 0)

    run_on_event_loop(serve_and_call(), "uvloop")
    assert answers[:2] == [code_pb2.OK, code_pb2.UNAUTHENTICATED]
    assert answers[:100] == answers[:2] * 50
    assert answers[100:200] == [code_pb2.UNAUTHENTICATED] * 100
    assert answers[-1] == 0  # it did run on uvloop


@pytest.mark.integration
@pytest.mark.parametrize(("flags", "expected"), [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")])
def test_meshtoll_serve_says_which_event_loop_it_runs_on(
    tmp_path: Path, flags: tuple[str, ...], expected: str
) -> None:
    with running_serve(tmp_path, *flags) as serving:
        assert f"meshtoll serving on {expected}:" in serving.child.log_tail()
