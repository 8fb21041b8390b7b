"""Instructions per decision of an in-process driver, counted by valgrind's callgrind: a
figure that does not move with what else the machine runs (CPU time does), so a lever can be
judged on a shared machine.

    python bench/instructions.py [--decisions N] DRIVER [DRIVER ARGS ...]

DRIVER is a bench script taking `--decisions N --repeat 1` (bench/fused_decision.py,
bench/rls_decision.py). It runs twice under callgrind, with N and 2N decisions; the
difference of the two totals divided by N is what one more decision costs, start-up, policy
loading and warm-up cancelling out. Only the driver's own process is counted (redis-server,
which it starts, is not traced). Takes about a minute per 10,000 decisions.

The traced process runs with a fixed PYTHONHASHSEED: hash randomisation would lay dicts and
sets out differently in the N and the 2N run. Interrupted (Ctrl-C, or a timeout's SIGTERM),
the traced driver is sent SIGINT and waited for, so that it stops the redis-server it
started (which runs in a session of its own, out of reach of a signal to the group).
bench/through_envoy_instructions.py counts `meshtoll serve` behind a real Envoy instead.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STOP_SECONDS = 120.0


def instructions(driver: list[str], decisions: int, out: Path) -> int:
    """The instructions one run of `driver` with `decisions` decisions executed."""
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, *driver, "--decisions", str(decisions), "--repeat", "1",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    # Its own session: a Ctrl-C in the terminal reaches this process alone, which passes it on.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    ) as traced:
        try:
            output, _ = traced.communicate()
        except BaseException:
            stop(traced)
            raise
    if traced.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({traced.returncode}):\n{output.decode(errors='replace')}"
        )
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{out}: no totals line")
    return int(found.group(1))


def stop(traced: subprocess.Popen[bytes]) -> None:
    """SIGINT, which a Python driver meets as KeyboardInterrupt, leaving its `with` blocks
    (its redis-server stopped); SIGKILL if it is still running after a while (valgrind runs
    the way out slowly too). Signals that come meanwhile (a timeout signals this process and
    then its group) do not cut the wait short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    traced.send_signal(signal.SIGINT)
    try:
        traced.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        traced.kill()
        traced.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=10_000, help="N (the second run makes 2N)")
    parser.add_argument("driver", nargs=argparse.REMAINDER, help="the driver script and its arguments")
    args = parser.parse_args(argv)
    if not args.driver:
        parser.error("name a driver script")
    # A timeout's SIGTERM unwinds like Ctrl-C: the traced driver is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="meshtoll-callgrind-") as directory:
        small = instructions(args.driver, args.decisions, Path(directory) / "small.out")
        large = instructions(args.driver, 2 * args.decisions, Path(directory) / "large.out")
    per_decision = (large - small) / args.decisions
    print(f"{per_decision:,.0f} instructions per decision ({' '.join(args.driver)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
