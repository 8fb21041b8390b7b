"""/metrics after known traffic through a real Envoy: counters equal what was sent, latency
histograms have the samples, Prometheus' reference parser (and promtool) read every family
with its type, nothing names a tenant by default, and with --workers 2 a scrape of the admin
port answers for both workers, even after each was stopped and started again."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from meshtoll.local.devstack import LocalStack
from tests.client import fetch
from tests.conftest import StartStack
from tests.scraped import OPENMETRICS, scrape, text_families, value
from tests.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "k-observed"
WORKERS_KEY = "k-observed-workers"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("observed") / "policy.yaml"
    path.write_text(f"""
plans:
  metered: {{limits: [{{requests: 100000, per: minute}}]}}
tenants:
  observed: {{plan: metered, api_keys: [{{id: observed, sha256: {sha(KEY)}}}]}}
  grouped: {{plan: metered, api_keys: [{{id: grouped, sha256: {sha(WORKERS_KEY)}}}]}}
routes:
  - {{prefix: /v1/, name: v1}}
""")
    return path


@pytest.fixture(scope="module")
def stack(start_stack: StartStack, policy: Path) -> LocalStack:
    return start_stack(policy)


def decisions(stack: LocalStack, transport: str, outcome: str) -> float:
    families = scrape(stack.meshtoll_admin_url)
    return value(
        families,
        "meshtoll_authz_decisions",
        "meshtoll_authz_decisions_total",
        transport=transport,
        outcome=outcome,
    )


def latencies(stack: LocalStack, service: str, transport: str) -> float:
    name = "meshtoll_decision_duration_seconds"
    return value(
        scrape(stack.meshtoll_admin_url), name, f"{name}_count", service=service, transport=transport
    )


def send(stack: LocalStack, listener: str, count: int, key: str = KEY) -> list[int]:
    return [fetch(stack.url(listener, "/v1/items"), headers={"x-api-key": key}).status for _ in range(count)]


def test_counters_and_histograms_equal_the_traffic_sent(stack: LocalStack) -> None:
    before = {
        "http": decisions(stack, "http", "allow"),
        "refused": decisions(stack, "http", "invalid_api_key"),
        "grpc": decisions(stack, "grpc", "allow"),
        "latency_http": latencies(stack, "authz", "http"),
        "latency_grpc": latencies(stack, "authz", "grpc"),
    }
    assert send(stack, "listen_http_authz_port", 20) == [200] * 20
    assert send(stack, "listen_http_authz_port", 5, key="not-a-key") == [401] * 5
    assert send(stack, "listen_grpc_authz_port", 7) == [200] * 7
    after = {
        "http": decisions(stack, "http", "allow"),
        "refused": decisions(stack, "http", "invalid_api_key"),
        "grpc": decisions(stack, "grpc", "allow"),
        "latency_http": latencies(stack, "authz", "http"),
        "latency_grpc": latencies(stack, "authz", "grpc"),
    }
    assert {name: after[name] - before[name] for name in before} == {
        "http": 20,
        "refused": 5,
        "grpc": 7,
        "latency_http": 25,
        "latency_grpc": 7,
    }
    families = scrape(stack.meshtoll_admin_url)
    # The fused limits asked Redis (leases served the rest): its round trips were timed.
    round_trips = "meshtoll_redis_round_trip_seconds"
    assert value(families, round_trips, f"{round_trips}_count") > 0
    assert value(families, "meshtoll_redis_up") == 1


def test_the_meter_counts_and_times_the_entries_envoy_sends(stack: LocalStack) -> None:
    received = "meshtoll_meter_entries_received"
    before = value(scrape(stack.meshtoll_admin_url), received, f"{received}_total")
    assert send(stack, "listen_full_port", 4) == [200] * 4
    eventually(
        lambda: value(scrape(stack.meshtoll_admin_url), received, f"{received}_total") - before,
        lambda seen: seen == 4,
        timeout=10,
        message="the meter never counted the 4 access-log entries",
    )
    assert latencies(stack, "meter", "grpc") > 0


def test_every_family_reads_typed_by_the_reference_parser_and_promtool(
    stack: LocalStack, tmp_path: Path
) -> None:
    send(stack, "listen_http_authz_port", 2)
    reply = fetch(f"{stack.meshtoll_admin_url}/metrics")
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = scrape(stack.meshtoll_admin_url)
    untyped = sorted(
        name for name, family in families.items() if family.type not in ("counter", "gauge", "histogram")
    )
    assert untyped == []
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: scripts/test installs Debian's prometheus package"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=reply.body, capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_openmetrics_is_negotiated_by_the_accept_header(stack: LocalStack) -> None:
    send(stack, "listen_http_authz_port", 1)
    reply = fetch(f"{stack.meshtoll_admin_url}/metrics", headers={"accept": OPENMETRICS})
    assert reply.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert reply.body.endswith(b"# EOF\n")
    families = scrape(stack.meshtoll_admin_url, OPENMETRICS)
    assert families["meshtoll_authz_decisions"].type == "counter"
    assert families["meshtoll_decision_duration_seconds"].type == "histogram"


def test_no_series_names_a_tenant_by_default(stack: LocalStack) -> None:
    send(stack, "listen_http_authz_port", 1)
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    families = scrape(stack.meshtoll_admin_url)
    assert all("tenant" not in sample.labels for family in families.values() for sample in family.samples)
    assert "observed" not in text


def test_a_client_cannot_make_a_label_value(stack: LocalStack) -> None:
    """Headers, paths and keys a client chooses never become label values."""
    for n in range(3):
        fetch(
            stack.url("listen_http_authz_port", f"/v1/forged-{n}"),
            headers={
                "x-api-key": f"forged-key-{n}",
                "x-meshtoll-tenant": f"forged-{n}",
                "traceparent": "forged",
            },
        )
    text = fetch(f"{stack.meshtoll_admin_url}/metrics").body.decode()
    assert "forged" not in text


def worker_pids(stack: LocalStack) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    supervisor = stack.children["meshtoll"].pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def reporting_workers(stack: LocalStack) -> float | None:
    """meshtoll_workers, or None while the worker a scrape reaches cannot answer it yet (still
    loading the policy: 503) or any more (stopping as it came)."""
    try:
        reply = fetch(f"{stack.meshtoll_admin_url}/metrics")
    except OSError:
        return None
    return value(text_families(reply.body.decode()), "meshtoll_workers") if reply.status == 200 else None


def grouped_allows(stack: LocalStack) -> float:
    return decisions(stack, "http", "allow") + decisions(stack, "grpc", "allow")


def test_with_two_workers_a_scrape_answers_for_the_group_across_restarts(
    start_stack: StartStack, policy: Path
) -> None:
    stack = start_stack(policy, workers=2)
    assert send(stack, "listen_http_authz_port", 12, key=WORKERS_KEY) == [200] * 12
    assert send(stack, "listen_grpc_authz_port", 8, key=WORKERS_KEY) == [200] * 8
    eventually(
        lambda: grouped_allows(stack),
        lambda seen: seen == 20,
        timeout=10,
        message="20 decisions in the group",
    )
    # Stop each worker in turn (SIGTERM: it writes its last counts), and let the supervisor
    # start another: then no process holds a decision of its own, and every count a scrape
    # shows comes from the files of workers that have stopped.
    originals = worker_pids(stack)
    assert len(originals) == 2
    for pid in sorted(originals):
        os.kill(pid, signal.SIGTERM)
        eventually(
            lambda: worker_pids(stack),
            lambda pids: len(pids) == 2 and pid not in pids,  # noqa: B023 (awaited before the loop moves on)
            timeout=20,
            message=f"the supervisor never replaced worker {pid}",
        )
    eventually(
        lambda: reporting_workers(stack),
        lambda seen: seen == 2,
        timeout=30,
        message="both new workers reporting",
    )
    # Neither vanished nor doubled, whichever worker answers.
    assert [grouped_allows(stack) for _ in range(6)] == [20] * 6
    assert send(stack, "listen_http_authz_port", 5, key=WORKERS_KEY) == [200] * 5
    eventually(
        lambda: grouped_allows(stack),
        lambda seen: seen == 25,
        timeout=10,
        message="25 decisions in the group",
    )
