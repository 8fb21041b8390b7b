"""Hot reload under continuous traffic through a real Envoy: no request fails, bad versions
are rejected, and a revoked key stops working without a restart."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "reload-key"
CLIENTS = 4
WORKERS = 2
REJECTED = "new version rejected, the previous one stays"


def policy_text(extra_tenants: int, *, revoked: bool = False) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    others = "".join(f"  t{index}: {{plan: free}}\n" for index in range(extra_tenants))
    flag = ", revoked: true" if revoked else ""
    return (
        "plans: {free: {}}\n"
        f"tenants:\n  acme: {{plan: free, api_keys: [{{id: k, sha256: {digest}{flag}}}]}}\n{others}"
    )


def replace_file(path: Path, text: str) -> None:
    temporary = path.with_suffix(".next")
    temporary.write_text(text)
    os.replace(temporary, path)


def hammer(port: int, stop: threading.Event, statuses: Counter[int]) -> None:
    """Keep-alive requests as fast as one connection goes, until told to stop."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop.is_set():
        try:
            connection.request("GET", "/v1/x", headers={"x-api-key": KEY})
            response = connection.getresponse()
            response.read()
            statuses[response.status] += 1
        except (OSError, http.client.HTTPException):
            statuses[0] += 1
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.close()


def wait_for_every_worker(stack: LocalStack, logged: str, times: int, awaited: str) -> None:
    """Until meshtoll's log holds `logged` `times` times. The workers answer the admin port
    in turn, one at a time, but each logs each reload and each rejection it makes."""
    log = stack.work_dir / "meshtoll.log"
    eventually(
        lambda: log.read_text().count(logged),
        lambda count: count >= times,
        timeout=10,
        interval=0.05,
        message=f"{awaited}: {logged!r} was not logged {times} times",
    )


def policy_version(stack: LocalStack) -> int:
    version: int = fetch(f"{stack.meshtoll_admin_url}/api/policy").json()["version"]
    return version


def wait_for_version(stack: LocalStack, version: int) -> None:
    eventually(
        lambda: policy_version(stack),
        lambda active: active >= version,
        timeout=10,
        interval=0.05,
        message=f"policy version {version} never became active",
    )


def test_reloads_under_traffic_fail_no_request_and_bad_versions_are_kept_out(
    start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("reload") / "policy.yaml"
    path.write_text(policy_text(0))
    stack = start_stack(path, workers=WORKERS)
    # The stack is ready when one worker is: a worker still loading the first version when
    # the second lands would take it as its version 1 and never log "version 2".
    wait_for_every_worker(stack, "meshtoll serving on ", WORKERS, "every worker serving")
    port = stack.ports.envoy.listen_http_authz_port
    stop = threading.Event()
    per_client: list[Counter[int]] = [Counter() for _ in range(CLIENTS)]
    clients = [threading.Thread(target=hammer, args=(port, stop, counts)) for counts in per_client]
    for client in clients:
        client.start()
    try:
        for version in range(2, 5):
            replace_file(path, policy_text((version - 1) * 500))
            wait_for_every_worker(stack, f"reloaded: version {version}, ", WORKERS, "a good version")
            # Rejected (unknown plan); left in place until every worker has seen it.
            replace_file(path, "tenants: {acme: {plan: missing}}\n")
            wait_for_every_worker(stack, REJECTED, (version - 1) * WORKERS, "a bad version")
        replace_file(path, policy_text(2000))
        wait_for_every_worker(stack, "reloaded: version 5, ", WORKERS, "the last version")
    finally:
        stop.set()
        for client in clients:
            client.join()
    statuses = sum(per_client, Counter())
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 200, "too little traffic to prove anything"
    summary = fetch(f"{stack.meshtoll_admin_url}/api/policy").json()
    assert (summary["tenants"], summary["rejected_versions"]) == (1 + 2000, 3)


def test_revoking_a_key_takes_effect_without_a_restart(
    start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("revoke") / "policy.yaml"
    path.write_text(policy_text(0))
    stack = start_stack(path)
    url = stack.url("listen_grpc_authz_port", "/v1/x")
    assert fetch(url, headers={"x-api-key": KEY}).status == 200
    before = policy_version(stack)
    replace_file(path, policy_text(0, revoked=True))
    wait_for_version(stack, before + 1)
    reply = fetch(url, headers={"x-api-key": KEY})
    assert reply.status == 401
    assert reply.json()["error"] == "revoked_api_key"
