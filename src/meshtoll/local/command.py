"""`meshtoll dev` on the command line: the whole local stack in the foreground. The CLI's
parser adds it with add_dev_command."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshtoll.settings import settings_from


def add_dev_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser("dev", help="run the whole local stack: Envoy, meshtoll, Redis, demo upstream")
    dev.add_argument("--policy", type=Path, default=None, help="policy file (default: examples/policy.yaml)")
    dev.add_argument(
        "--port",
        type=int,
        default=8080,
        help="Envoy's port for clients (HTTP ext_authz); gRPC ext_authz on the next one; 0: ports of "
        "Envoy's own choice, shown when ready",
    )
    dev.add_argument("--admin-port", type=int, default=8090, help="meshtoll's admin port (0: its own choice)")
    dev.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis (shared with the usage and billing commands) instead of starting one "
        "(env MESHTOLL_REDIS_URL)",
    )
    dev.set_defaults(command=_dev)


def _dev(args: argparse.Namespace) -> int:
    from meshtoll.local.dev import run_dev

    redis_url = settings_from({"redis_url": args.redis_url}).redis_url
    return run_dev(policy=args.policy, port=args.port, admin_port=args.admin_port, redis_url=redis_url)
