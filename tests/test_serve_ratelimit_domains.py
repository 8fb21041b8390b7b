"""`meshtoll serve` answering envoyproxy/ratelimit domains next to its own policy: the
its per-limit statistics on the admin port's /metrics, and the compatibility chosen per
domain (`--ratelimit-compat` for all, `--ratelimit-compat-domain NAME=MODE` for one)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from meshtoll.errors import ConfigError
from meshtoll.settings import settings_from
from tests.client import fetch
from tests.serve import EXAMPLE_POLICY, Serving, running_serve

pytestmark = pytest.mark.integration

OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


def config(domain: str) -> str:
    return f"""
domain: {domain}
descriptors:
  - key: one
    rate_limit: {{unit: minute, requests_per_unit: 1}}
  - key: five
    rate_limit: {{unit: minute, requests_per_unit: 5}}
"""


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = tmp_path_factory.mktemp("ratelimit-config")
    for domain in ("peer", "billing"):
        (found / f"{domain}.yaml").write_text(config(domain))
    return found


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, directory: Path) -> Iterator[Serving]:
    with running_serve(tmp_path_factory.mktemp("serve"), "--ratelimit-config", str(directory)) as found:
        yield found


@pytest.fixture(scope="module")
def rls(serving: Serving) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


@pytest.fixture(scope="module")
def mixed(
    tmp_path_factory: pytest.TempPathFactory, directory: Path
) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    """Strict for every domain but `billing`."""
    flags = ("--ratelimit-config", str(directory), "--ratelimit-compat", "strict")
    with (
        running_serve(
            tmp_path_factory.mktemp("serve"), *flags, "--ratelimit-compat-domain", "billing=meshtoll"
        ) as found,
        grpc.insecure_channel(f"127.0.0.1:{found.grpc_port}") as channel,
    ):
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def ask(
    rls: rls_pb2_grpc.RateLimitServiceStub, domain: str, *keys: tuple[str, str]
) -> rls_pb2.RateLimitResponse:
    descriptors = [
        ratelimit_pb2.RateLimitDescriptor(entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)])
        for k, v in keys
    ]
    return rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors))


def test_per_limit_statistics_are_on_the_admin_metrics(
    serving: Serving, rls: rls_pb2_grpc.RateLimitServiceStub
) -> None:
    codes = [ask(rls, "peer", ("one", "stats")).overall_code for _ in range(3)]
    assert codes == [OK, OVER_LIMIT, OVER_LIMIT]
    text = fetch(f"{serving.admin_url}/metrics").body.decode()
    assert 'ratelimit_service_rate_limit_total_hits{domain="peer",key1="one"} 3' in text
    assert 'ratelimit_service_rate_limit_over_limit{domain="peer",key1="one"} 2' in text
    assert 'ratelimit_service_rate_limit_within_limit{domain="peer",key1="one"} 1' in text
    assert "meshtoll_" in text  # meshtoll's own metrics stay


def remaining_after_a_refusal(rls: rls_pb2_grpc.RateLimitServiceStub, domain: str, value: str) -> int:
    """`five` asked beside `one` twice (the second time `one` refuses), then alone."""
    for _ in range(2):
        ask(rls, domain, ("one", value), ("five", value))
    return int(ask(rls, domain, ("five", value)).statuses[0].limit_remaining)


def test_a_domain_can_keep_meshtolls_all_or_nothing_while_the_others_are_strict(
    mixed: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    # strict: the refused request counted `five` too (3 hits of 5); meshtoll: it consumed nothing.
    assert remaining_after_a_refusal(mixed, "peer", "mixed") == 2
    assert remaining_after_a_refusal(mixed, "billing", "mixed") == 3


def test_every_domain_is_strict_by_default(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    assert remaining_after_a_refusal(rls, "billing", "default") == 2


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("billing=lenient", "'lenient' is not one of strict, meshtoll"),
        ("=meshtoll", "NAME=strict or NAME=meshtoll"),
        ("billing", "NAME=strict or NAME=meshtoll"),
        ("billing=meshtoll,billing=strict", "'billing' is given twice"),
    ],
)
def test_a_bad_per_domain_compatibility_is_refused_before_serving(
    directory: Path, flag: str, said: str
) -> None:
    argv = [sys.executable, "-m", "meshtoll", "serve", "--policy", str(EXAMPLE_POLICY)]
    argv += ["--ratelimit-config", str(directory), "--ratelimit-compat-domain", flag]
    environment = {**os.environ, "MESHTOLL_REDIS_URL": ""}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=environment)
    assert done.returncode != 0
    assert said in done.stderr
    assert "Traceback" not in done.stderr


def test_the_per_domain_compatibility_comes_from_flags_or_its_environment_variable() -> None:
    environ = {"MESHTOLL_RATELIMIT_COMPAT_DOMAINS": "billing=meshtoll, peer=strict"}
    assert settings_from({}, environ).ratelimit_compat_domains == (
        ("billing", "meshtoll"),
        ("peer", "strict"),
    )
    flags = {"ratelimit_compat_domains": [("billing", "strict")]}
    assert settings_from(flags, environ).ratelimit_compat_domains == (("billing", "strict"),)
    with pytest.raises(ConfigError, match="MESHTOLL_RATELIMIT_COMPAT_DOMAINS"):
        settings_from({}, {"MESHTOLL_RATELIMIT_COMPAT_DOMAINS": "billing"})
