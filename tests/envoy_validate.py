"""Envoy's own verdict on a configuration file, for the tests that render one."""

from __future__ import annotations

import subprocess
from pathlib import Path


def assert_envoy_accepts(envoy_binary: Path, config: Path) -> None:
    """`envoy --mode validate`: the configuration parses, every extension exists in this Envoy
    and every field means what it says, without binding a port."""
    result = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
