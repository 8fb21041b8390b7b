"""The benchmark on a machine without its tools says what is missing and how to get it,
before it starts anything, instead of a traceback from deep inside a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_benchmark_without_wrk_says_how_to_get_it(tmp_path: Path) -> None:
    # A PATH with this Python and nothing else: no wrk (nor nginx, redis-server, Envoy).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    environment = {**os.environ, "PATH": str(tmp_path / "bin")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "a", "--duration", "1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "apt-get install wrk" in done.stderr
    assert "scripts/bench" in done.stderr
    assert "Traceback" not in done.stderr
