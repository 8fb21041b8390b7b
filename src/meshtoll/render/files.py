"""Which `meshtoll render` target writes which files, where; and the check that what is
checked in is what the defaults render."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from meshtoll.render.compose import compose_files
from meshtoll.render.envoy import envoy_files
from meshtoll.render.istio import istio_files
from meshtoll.render.kubernetes import kubernetes_files
from meshtoll.render.params import DeployParams

# target -> (its directory under the output root, the files it renders there)
TARGETS: dict[str, tuple[str, Callable[[DeployParams], dict[str, str]]]] = {
    "istio": ("deploy/istio", istio_files),
    "k8s": ("deploy/k8s", kubernetes_files),
    "envoy": ("deploy/envoy", envoy_files),
    "compose": (".", compose_files),
}


def rendered(targets: list[str], params: DeployParams) -> dict[Path, str]:
    """Every file of `targets`, by its path relative to the output root."""
    files: dict[Path, str] = {}
    for target in targets:
        directory, render = TARGETS[target]
        files |= {Path(directory) / name: text for name, text in render(params).items()}
    return files


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


def run_render(targets: list[str], params: DeployParams, root: Path, check: bool) -> int:
    """Write the files (or, with `check`, list the stale ones and fail); 0 when all is well."""
    files = rendered(targets, params)
    if not check:
        for path in write(files, root):
            print(root / path)
        return 0
    differing = stale(files, root)
    for path in differing:
        print(f"stale: {root / path} (run `meshtoll render {' '.join(targets)}`)")
    return 1 if differing else 0
