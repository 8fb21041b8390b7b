"""`meshtoll policy check` and `meshtoll keys new` on the command line: a policy file
validated, and a new API key with the entry that puts its hash in the policy. The CLI's
parser adds them with add_policy_command and add_keys_command."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path

from meshtoll.api_keys import generate_key
from meshtoll.errors import PolicyError
from meshtoll.policy.load import load_policy


def add_policy_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="work with policy files").add_subparsers(
        title="policy commands"
    )
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(command=_policy_check)


def add_keys_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="work with API keys").add_subparsers(title="keys commands")
    new = keys.add_parser("new", help="make a new API key and print its policy entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--id", dest="key_id", default=None, help="the key's name (default: TENANT-<random>)")
    new.set_defaults(command=_keys_new)


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


def _keys_new(args: argparse.Namespace) -> int:
    key = generate_key()
    key_id = args.key_id or f"{args.tenant}-{secrets.token_hex(3)}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"API key (shown once, store it now): {key}")
    print(f"# add under tenants.{args.tenant}.api_keys:")
    print(f"- {{id: {key_id}, sha256: {digest}}}")
    return 0
