"""The packages of meshtoll import each other in one direction only: each layer below may be
imported by the ones above it, never the other way, and no two modules import each other
(type-only imports included: a cycle there is a cycle in the design)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "meshtoll"

# Bottom to top: a unit may import units of its own layer's left or of any layer below,
# nothing above. Modules at the top of the package count as units of their own.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "wire"),  # the exception tree; the contract with Envoy
    (
        "counting",
        "keys",
        "api_keys",
        "usage",
        "registry",
        "sinks",
        "watched",
    ),  # pure cores: limits, Redis key formats, API key formats, usage, run-time tenants, delivery, reload
    (
        "telemetry",
        "storage",
        "policy",
        "transport",
        "targets",
    ),  # metrics and traces; adapters of the cores; the policy file; billing APIs
    ("settings",),
    ("tenants", "ratelimit"),  # run-time tenants followed, changed, listed; the limiter
    ("envoyproxy_ratelimit", "authz", "meter"),  # a drop-in for envoyproxy/ratelimit; the services
    ("extproc",),
    ("server",),  # wiring and running every service
    ("local", "render"),  # the local stack; deployment files
    ("cli", "__main__"),
)
ORDER = [unit for layer in LAYERS for unit in layer]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[str]:
    """Every meshtoll module `path` imports, wherever in the file the import stands."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("meshtoll."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meshtoll"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (SOURCE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                is_package = (SOURCE.parent / candidate.replace(".", "/") / "__init__.py").exists()
                yield candidate if is_module or is_package else node.module


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "meshtoll"


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}
IMPORTS = {name: sorted(set(imported_modules(path)) - {name}) for name, path in MODULES.items()}


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(name) for name in MODULES} - {"meshtoll"}
    assert sorted(units - set(ORDER)) == []
    assert sorted(set(ORDER) - units) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = unit_of(module)
    if here == "meshtoll":
        return
    upward = [
        target
        for target in IMPORTS[module]
        if unit_of(target) not in (here, "meshtoll") and ORDER.index(unit_of(target)) > ORDER.index(here)
    ]
    assert upward == [], f"{module} imports from above its layer"


def test_no_two_modules_import_each_other_even_through_others() -> None:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in IMPORTS.get(module, []):
            if target not in MODULES:
                continue
            if state.get(target) == "open":
                cycles.append(
                    [*trail[trail.index(target) :], target] if target in trail else [module, target]
                )
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []
