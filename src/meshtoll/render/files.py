"""Which `meshtoll render` target renders which files, where; what it prints as one YAML
stream when no directory is given; and the check that what is checked in is what the
defaults render."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshtoll.render.compose import compose_files
from meshtoll.render.envoy import envoy_files
from meshtoll.render.istio import istio_files, istio_objects
from meshtoll.render.kubernetes import kubernetes_files, kubernetes_objects
from meshtoll.render.monitoring import monitoring_files
from meshtoll.render.params import DeployParams

Files = dict[str, str]  # file name -> its text


def _all(params: DeployParams, files: Files) -> Files:
    return files


@dataclass(frozen=True, slots=True)
class Target:
    directory: str  # where its files go under the output root
    render: Callable[[DeployParams], Files]
    # What its YAML stream carries, by source file: the objects to apply, where it has files
    # to adapt or merge rather than apply (`left_out` says which, and that --out writes them).
    streamed: Callable[[DeployParams, Files], Files] = _all
    left_out: str = ""


TARGETS: dict[str, Target] = {
    "istio": Target(
        "deploy/istio",
        istio_files,
        istio_objects,
        "mesh-config.yaml (istiod's meshConfig: merge it into yours, as its comment says)",
    ),
    "k8s": Target(
        "deploy/k8s",
        kubernetes_files,
        kubernetes_objects,
        "the kustomization files, the overlays and secret.example.yaml",
    ),
    "envoy": Target("deploy/envoy", envoy_files),
    "compose": Target(".", compose_files),
    "monitoring": Target("deploy/monitoring", monitoring_files),
}


def rendered(targets: list[str], params: DeployParams) -> dict[Path, str]:
    """Every file of `targets`, by its path relative to the output root."""
    files: dict[Path, str] = {}
    for name in targets:
        target = TARGETS[name]
        files |= {Path(target.directory) / file: text for file, text in target.render(params).items()}
    return files


def stream(targets: list[str], params: DeployParams) -> str:
    """One YAML stream of what `targets` render to apply, each part headed by the file it
    would be written to (as `helm template` heads its own), for `| kubectl apply -f -`."""
    parts = []
    for name in targets:
        target = TARGETS[name]
        for file, text in target.streamed(params, target.render(params)).items():
            parts.append(f"# Source: {Path(target.directory) / file}\n{text}")
    return "---\n".join(parts)


def write(files: dict[Path, str], root: Path) -> list[Path]:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(files)


def stale(files: dict[Path, str], root: Path) -> list[Path]:
    """The files under `root` that differ from (or lack) their rendering."""
    return sorted(
        relative
        for relative, text in files.items()
        if not (root / relative).is_file() or (root / relative).read_text(encoding="utf-8") != text
    )


def run_render(targets: list[str], params: DeployParams, out: Path | None, check: bool) -> int:
    """Print the stream (no `out`), write the files under `out`, or, with `check`, list the
    files under `out` (default: here) that differ and fail; 0 when all is well."""
    if check:
        root = out or Path(".")
        differing = stale(rendered(targets, params), root)
        for path in differing:
            print(f"stale: {root / path} (run `meshtoll render {' '.join(targets)} --out {root}`)")
        return 1 if differing else 0
    if out is None:
        sys.stdout.write(stream(targets, params))
        for name in targets:
            if TARGETS[name].left_out:
                print(
                    f"meshtoll render {name}: left out {TARGETS[name].left_out}; --out DIR writes them",
                    file=sys.stderr,
                )
        return 0
    for path in write(rendered(targets, params), out):
        print(out / path)
    return 0
