"""A seeded, bounded fuzz of the policy loader: thousands of mutations of the example policy,
each ending in a loaded policy or a PolicyError, quickly and in bounded memory."""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from meshtoll.errors import PolicyError
from meshtoll.policy import load_policy_text

EXAMPLE = (Path(__file__).parent.parent / "examples" / "policy.yaml").read_text()
SEED = 9  # issue 9; change it to explore, keep it fixed to reproduce
CASES = 3000
SECONDS_PER_CASE = 1.0
PEAK_BYTES = 64 * 2**20

_BOMB = "b0: &b0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]\n" for i in range(1, 9)
)
# YAML constructs that have crashed, or could crash, a loader, inserted anywhere.
CONSTRUCTS = (
    "&a ",
    "*a",
    "&a [*a, *a]",
    "<<: *a",
    "!!python/object:os.system ",
    "!!python/object/apply:os.system [ls]",
    "!!binary aGk=",
    "!!set {a, b}",
    "!!timestamp ",
    "2026-12-01",
    "!custom ",
    "~: 1",
    "null: x",
    "0.25: x",
    "true: x",
    "? [1, 2]\n: x",
    "? {a: b}\n: x",
    "9" * 5000,
    "-" + "9" * 300,
    "0x" + "f" * 200,
    "1e999",
    ".nan",
    "[" * 300,
    "{a: " * 80,
    "- " * 80,
    "\x00",
    "\x07",
    "\x1b[31m",
    "\x7f",
    "\x85",
    '"\\x00"',
    '"\\u0007"',
    '"\\n"',
    '"\\ud800"',
    "\ufeff",
    "\u2028",
    "\t",
    "\r",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:example.com,2000:\n",
    "'",
    '"',
    "|\n",
    ">\n",
    "#",
    ": ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "? ",
    '"1e30"',
    '"1E+999999999"',
    "x" * 2000,
)
_CHARACTERS = "\x00\t\n\r :-[]{},&*!|>'\"%@`#?~\\aZ09\x7f\u00e9\u2028\U0001f600"

Mutation = Callable[[random.Random, str], str]


def _flip(rng: random.Random, text: str) -> str:
    at = rng.randrange(len(text) or 1)
    return text[:at] + rng.choice(_CHARACTERS) + text[at + 1 :]


def _truncate(rng: random.Random, text: str) -> str:
    return text[: rng.randrange(len(text) + 1)]


def _insert(rng: random.Random, text: str) -> str:
    at = rng.randrange(len(text) + 1)
    if rng.random() < 0.5:  # at a line start, where a key would be
        at = text.rfind("\n", 0, at) + 1
    return text[:at] + rng.choice(CONSTRUCTS) + text[at:]


def _duplicate_line(rng: random.Random, text: str) -> str:
    lines = text.splitlines(keepends=True)
    at = rng.randrange(len(lines) or 1)
    return "".join(lines[: at + 1] + lines[at : at + 1] + lines[at + 1 :])


def _reindent(rng: random.Random, text: str) -> str:
    lines = text.splitlines(keepends=True)
    at = rng.randrange(len(lines) or 1)
    lines[at : at + 1] = [" " * rng.randrange(12) + line.lstrip(" ") for line in lines[at : at + 1]]
    return "".join(lines)


def _nest(rng: random.Random, text: str) -> str:
    depth = rng.choice((30, 70, 500, 5000))
    return text + "deep: " + "[" * depth + "]" * depth + "\n"


def _bomb(rng: random.Random, text: str) -> str:
    return _BOMB + text


MUTATIONS: tuple[Mutation, ...] = (
    _flip,
    _flip,
    _truncate,
    _insert,
    _insert,
    _insert,
    _duplicate_line,
    _reindent,
    _nest,
    _bomb,
)


def mutated(rng: random.Random) -> str:
    text = EXAMPLE
    for _ in range(rng.randint(1, 3)):
        text = rng.choice(MUTATIONS)(rng, text)
    return text


def test_no_mutated_policy_escapes_as_anything_but_a_policy_error() -> None:
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "rejected": 0, "unlocated": 0}
    slowest = (0.0, -1)
    for case in range(CASES):
        text = mutated(rng)
        # tracemalloc slows loading sixfold: memory is measured on every fifth case only.
        measured = case % 5 == 0
        if measured:
            tracemalloc.start()
        started = time.process_time()  # CPU time: a busy machine does not move it
        try:
            load_policy_text(text, "policy.yaml")
            outcomes["loaded"] += 1
        except PolicyError as exc:
            outcomes["rejected" if exc.problems else "unlocated"] += 1
        except Exception as exc:
            raise AssertionError(f"case {case} (seed {SEED}) raised {exc!r} on {text[:300]!r}") from exc
        finally:
            elapsed = time.process_time() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        slowest = max(slowest, (elapsed, case))
        assert peak < PEAK_BYTES, f"case {case} peaked at {peak / 2**20:.0f} MiB"
    assert slowest[0] < SECONDS_PER_CASE, f"case {slowest[1]} took {slowest[0]:.2f}s"
    assert outcomes["unlocated"] == 0, "a PolicyError without problems"
    # The mutations must exercise both ends, or the fuzz tests nothing.
    assert outcomes["loaded"] > CASES // 20
    assert outcomes["rejected"] > CASES // 2
