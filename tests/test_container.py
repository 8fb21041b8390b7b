"""The container image and docker-compose.yml, proven without a Docker engine: the
Dockerfile's shape, its entrypoint run with its environment, the compose file against the
Compose specification, and the compose Envoy's configuration in a real Envoy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from meshtoll.local.dev import EXAMPLE_POLICY, demo_requests
from meshtoll.local.processes import Child, free_ports, http_ok
from meshtoll.render.container import READY_CHECK
from meshtoll.render.params import ENVOY_IMAGE
from meshtoll.settings import settings_from
from tests.envoy_validate import assert_envoy_accepts

ROOT = Path(__file__).parent.parent
COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def image_environment() -> dict[str, str]:
    environment: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            environment |= dict(pair.split("=", 1) for pair in rest.split())
    return environment


def healthcheck_command() -> list[str]:
    (rest,) = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    command: list[str] = json.loads(rest.partition("CMD")[2])
    return command


def test_the_image_is_multi_stage_on_a_pinned_slim_python_and_runs_as_non_root() -> None:
    steps = instructions()
    stages = [rest for keyword, rest in steps if keyword == "FROM"]
    assert len(stages) == 2
    assert stages[0].endswith("AS build")
    (base,) = [rest for keyword, rest in steps if keyword == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    # Runtime dependencies only: the final stage installs meshtoll's wheels, no extras.
    installs = [rest for keyword, rest in final_stage() if keyword == "RUN" and "pip install" in rest]
    assert installs == [
        "pip install --no-cache-dir --no-index --find-links /wheels meshtoll && rm -rf /wheels"
    ]


def test_the_entrypoint_is_meshtoll_serve_configured_by_the_environment() -> None:
    (entrypoint,) = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["meshtoll", "serve"]
    environment = image_environment()
    settings = settings_from({}, environment)  # every MESHTOLL_* variable parses
    assert str(settings.policy) == environment["MESHTOLL_POLICY"]
    assert settings.host == "0.0.0.0"


def test_the_healthcheck_is_the_compose_files_and_asks_for_readiness() -> None:
    assert healthcheck_command() == ["python", "-c", READY_CHECK]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["meshtoll"]["healthcheck"]["test"] == ["CMD", "python", "-c", READY_CHECK]


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    # Draft 7 explicitly: the specification's $schema URL is not one jsonschema resolves.
    jsonschema.Draft7Validator(schema).validate(compose)
    broken = {**compose, "services": {**compose["services"], "redis": {"image": "redis", "helthcheck": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_compose_starts_each_service_after_what_it_needs_is_healthy() -> None:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"redis", "meshtoll", "upstream", "envoy"}
    for name, service in services.items():
        for needed, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, name
            assert "healthcheck" in services[needed], needed
    assert services["envoy"]["image"] == ENVOY_IMAGE
    for volume in services["envoy"]["volumes"] + services["meshtoll"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).exists(), volume


@pytest.mark.integration
def test_the_compose_envoy_is_the_version_the_tests_run(envoy_binary: Path) -> None:
    if os.environ.get("MESHTOLL_TEST_ENVOY"):
        pytest.skip("another Envoy than the installed one was chosen")
    version = subprocess.run(
        [str(envoy_binary), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"/{ENVOY_IMAGE.rpartition(':v')[2]}/" in version


@pytest.mark.integration
def test_the_compose_envoy_configuration_passes_envoy_validation(envoy_binary: Path) -> None:
    assert_envoy_accepts(envoy_binary, ROOT / "deploy" / "envoy" / "envoy.yaml")


@pytest.mark.integration
def test_the_image_entrypoint_serves_with_the_image_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meshtoll serve` with the Dockerfile's environment, except where this machine is not
    the image: the policy file the image copies is read from the repository, and the ports
    are free ones (other tests run beside). The HEALTHCHECK command then reports ready."""
    for name in [name for name in os.environ if name.startswith("MESHTOLL_")]:
        monkeypatch.delenv(name)  # no setting of this shell may reach the child
    environment = image_environment()
    environment["MESHTOLL_POLICY"] = str(ROOT / "deploy" / "k8s" / "base" / "policy.yaml")
    environment["MESHTOLL_HOST"] = "127.0.0.1"
    grpc, http, admin = free_ports(3)
    environment |= {
        "MESHTOLL_GRPC_PORT": str(grpc),
        "MESHTOLL_HTTP_AUTHZ_PORT": str(http),
        "MESHTOLL_ADMIN_PORT": str(admin),
    }
    env = dict(environment)
    (entrypoint,) = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    command = [sys.executable, "-m", "meshtoll", *json.loads(entrypoint)[1:]]
    child = Child("meshtoll serve (image entrypoint)", command, tmp_path / "serve.log", env)
    try:
        child.wait_ready(http_ok(f"http://127.0.0.1:{admin}/readyz"), timeout=30)
        program, *arguments = healthcheck_command()
        assert program == "python"  # the image's; this venv's here
        check = subprocess.run(
            [sys.executable, *arguments], env=env, capture_output=True, timeout=10, check=False
        )
        assert check.returncode == 0, check.stderr
    finally:
        child.stop()


def test_compose_offers_what_meshtoll_dev_offers() -> None:
    # The same policy (its demo keys), and the same two client ports the banner's curl lines use.
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    (policy_mount,) = services["meshtoll"]["volumes"]
    assert (ROOT / policy_mount.split(":")[0]).resolve() == EXAMPLE_POLICY.parent
    published = {int(item.rsplit(":", 1)[1]) for item in services["envoy"]["ports"]}
    dev_ports = {
        urlsplit(request.url).port
        for request in demo_requests("http://127.0.0.1:8080", "http://127.0.0.1:8081")
    }
    assert published == dev_ports == {8080, 8081}
    assert all(item.startswith("127.0.0.1:") for item in services["envoy"]["ports"])


def test_the_image_runs_the_rate_limit_service_alone_as_bin_ratelimit(tmp_path: Path) -> None:
    """A Deployment written for envoyproxy/ratelimit sets `command: ["/bin/ratelimit"]`."""
    (run,) = [rest for keyword, rest in final_stage() if keyword == "RUN" and "/bin/ratelimit" in rest]
    script = tmp_path / "ratelimit"
    subprocess.run(["sh", "-c", run.replace("/bin/ratelimit", str(script))], check=True)
    assert script.read_text().splitlines() == ["#!/bin/sh", 'exec meshtoll ratelimit "$@"']
    assert os.access(script, os.X_OK)
