"""Command-line parsing only: each package adds its own commands (add_<x>_command, beside
what they run), and every error meshtoll raises on purpose is printed here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshtoll.errors import MeshtollError, PolicyError
from meshtoll.local.command import add_dev_command
from meshtoll.meter.command import add_billing_command, add_usage_command
from meshtoll.policy.command import add_policy_command
from meshtoll.ratelimit.command import add_quota_command
from meshtoll.render.command import add_render_command
from meshtoll.server.command import add_ratelimit_command, add_serve_command
from meshtoll.tenants.command import add_keys_command, add_tenants_command

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        result: int = args.command(args)
    except PolicyError as exc:
        print(f"policy rejected:\n{exc}", file=sys.stderr)
        return 1
    except MeshtollError as exc:
        print(f"meshtoll: {exc}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtoll",
        description="API-gateway features for an existing Envoy or Istio ingress: tenants, API keys, "
        "quotas and rate limits, metering and billing, through Envoy's own extension protocols",
    )
    commands = parser.add_subparsers(title="commands")
    add_serve_command(commands)
    add_ratelimit_command(commands)
    add_dev_command(commands)
    add_policy_command(commands)
    add_quota_command(commands)
    add_usage_command(commands)
    add_billing_command(commands)
    add_render_command(commands)
    add_tenants_command(commands)
    add_keys_command(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
