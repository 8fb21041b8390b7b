"""`meshtoll policy check` on the command line: a policy file validated. The CLI's parser
adds it with add_policy_command (`meshtoll keys` is meshtoll.tenants.command's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshtoll.errors import PolicyError
from meshtoll.policy.load import load_policy


def add_policy_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="work with policy files").add_subparsers(
        title="policy commands"
    )
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(command=_policy_check)


def _policy_check(args: argparse.Namespace) -> int:
    try:
        compiled = load_policy(args.file)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    policy = compiled.policy
    print(
        f"{args.file}: ok ({len(policy.plans)} plans, {len(policy.tenants)} tenants, "
        f"{len(compiled.keys_by_sha256)} API keys, {len(policy.routes)} routes)"
    )
    return 0
