"""A starting `meshtoll serve` answers at once: while its policy loads, the HTTP authz port
refuses with 503 `not_ready` rather than leaving a request queued until after Envoy's
ext_authz timeout (when its admission would bill a request nobody served). A worker of a
group leaves the port to its siblings until it is ready."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from meshtoll.local.processes import http_ok
from tests.client import fetch
from tests.serve import running_serve, start_serve

pytestmark = pytest.mark.integration

TENANTS = 60_000  # a policy that takes this machine a few seconds to load


def large_policy(path: Path) -> Path:
    lines = ["plans: {pro: {}}", "tenants:"]
    lines += [
        f"  t{n}: {{plan: pro, api_keys: [{{id: k{n}, sha256: {hashlib.sha256(str(n).encode()).hexdigest()}}}]}}"
        for n in range(TENANTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_http_authz_port_refuses_at_once_while_the_policy_loads(tmp_path: Path) -> None:
    serving = start_serve(tmp_path, policy=large_policy(tmp_path / "policy.yaml"))
    child, http_authz_port, admin_port = serving.child, serving.http_authz_port, serving.admin_port
    try:
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/healthz"), timeout=30)
        assert fetch(f"http://127.0.0.1:{admin_port}/readyz").status == 503, (
            "the policy loaded too fast to test"
        )
        # Answered while the policy loads, not kept until it has loaded: a request held
        # until then would be decided, and key "1" (tenant t1's) allowed. No wall-time bound:
        # a loaded machine answers late either way, and the refusal is what must hold.
        reply = fetch(f"http://127.0.0.1:{http_authz_port}/v1/items", headers={"x-api-key": "1"}, timeout=30)
        assert (reply.status, reply.json()["error"]) == (503, "not_ready")
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/readyz"), timeout=60)
        allowed = fetch(f"http://127.0.0.1:{http_authz_port}/v1/items", headers={"x-api-key": "1"})
        assert allowed.status == 200
    finally:
        child.stop()


def test_the_grpc_port_refuses_at_once_while_the_policy_loads(tmp_path: Path) -> None:
    """The gRPC port as the HTTP authz port: a Check held in the queue until the policy
    loaded would be decided, and admitted, after Envoy's timeout had answered its client."""
    serving = start_serve(tmp_path, policy=large_policy(tmp_path / "policy.yaml"))
    child, admin_port = serving.child, serving.admin_port
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method="GET", path="/v1/items", headers={"x-api-key": "1"}
                )
            )
        )
    )
    try:
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/healthz"), timeout=30)
        assert fetch(f"http://127.0.0.1:{admin_port}/readyz").status == 503, (
            "the policy loaded too fast to test"
        )
        with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as channel:
            check = channel.unary_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                response_deserializer=external_auth_pb2.CheckResponse.FromString,
            )
            # No wall-time bound, as above: the refusal is what must hold.
            with pytest.raises(grpc.RpcError) as refused:
                check(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in (refused.value.details() or "")
            child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/readyz"), timeout=60)
            # The same connection, now decided: key "1" is tenant t1's.
            assert check(request, timeout=30).status.code == 0
    finally:
        child.stop()


def test_a_worker_still_loading_leaves_the_http_authz_port_to_the_workers_serving(tmp_path: Path) -> None:
    """With --workers, a worker takes connections from the port the group shares only once
    it can decide them: a restarted or slower worker refusing 503 `not_ready` while its
    siblings serve would fail requests they could have decided. Asked while every worker
    still loads, the request waits for the first one ready and is decided."""
    serving = start_serve(tmp_path, "--workers", "2", policy=large_policy(tmp_path / "policy.yaml"))
    child, http_authz_port, admin_port = serving.child, serving.http_authz_port, serving.admin_port
    try:
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin_port}/healthz"), timeout=30)
        assert fetch(f"http://127.0.0.1:{admin_port}/readyz").status == 503, (
            "the policy loaded too fast to test"
        )
        replies = [
            fetch(f"http://127.0.0.1:{http_authz_port}/v1/items", headers={"x-api-key": "1"}, timeout=60)
            for _ in range(4)
        ]
        assert [reply.status for reply in replies] == [200] * 4, [reply.body[:200] for reply in replies]
    finally:
        child.stop()


def test_decision_ports_open_beyond_loopback_without_client_certificates_are_warned_about(
    tmp_path: Path,
) -> None:
    # Bound to every address (as in a pod), no traffic sent: the warning is in the log.
    for name in ("open", "local"):
        (tmp_path / name).mkdir()
    with running_serve(tmp_path / "open", host="0.0.0.0") as serving:
        assert "decision ports listen on 0.0.0.0 without client certificates" in serving.child.log_tail()
    with running_serve(tmp_path / "local") as serving:
        assert "without client certificates" not in serving.child.log_tail()
