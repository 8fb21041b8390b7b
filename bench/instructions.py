"""Instructions per decision of an in-process driver, counted by valgrind's callgrind: a
figure that does not move with what else the machine runs (CPU time does), so a lever can be
judged on a shared machine.

    python bench/instructions.py [--decisions N] DRIVER [DRIVER ARGS ...]

DRIVER is a bench script taking `--decisions N --repeat 1` (bench/fused_decision.py,
bench/rls_decision.py). It runs twice under callgrind, with N and 2N decisions; the
difference of the two totals divided by N is what one more decision costs, start-up, policy
loading and warm-up cancelling out. Only the driver's own process is counted (redis-server,
which it starts, is not traced). Takes about a minute per 10,000 decisions.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def instructions(driver: list[str], decisions: int, out: Path) -> int:
    """The instructions one run of `driver` with `decisions` decisions executed."""
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, *driver, "--decisions", str(decisions), "--repeat", "1",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{out}: no totals line")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=10_000, help="N (the second run makes 2N)")
    parser.add_argument("driver", nargs=argparse.REMAINDER, help="the driver script and its arguments")
    args = parser.parse_args(argv)
    if not args.driver:
        parser.error("name a driver script")
    with tempfile.TemporaryDirectory(prefix="meshtoll-callgrind-") as directory:
        small = instructions(args.driver, args.decisions, Path(directory) / "small.out")
        large = instructions(args.driver, 2 * args.decisions, Path(directory) / "large.out")
    per_decision = (large - small) / args.decisions
    print(f"{per_decision:,.0f} instructions per decision ({' '.join(args.driver)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
