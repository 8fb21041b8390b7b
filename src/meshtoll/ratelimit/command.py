"""`meshtoll quota show` on the command line: each limit of a tenant with its use, read from
the shared counters without consuming. The CLI's parser adds it with add_quota_command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from meshtoll.errors import UnknownTenant
from meshtoll.policy import load_policy
from meshtoll.ratelimit.quota import quota_table, tenant_quota
from meshtoll.settings import add_policy_flag, add_redis_url_flag, settings_from
from meshtoll.storage import counter_store
from meshtoll.tenants.served import install_runtime_tenants


def add_quota_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quota = commands.add_parser("quota", help="tenants' limits and their use").add_subparsers(
        title="quota commands"
    )
    show = quota.add_parser("show", help="each limit of a tenant with used / remaining / reset")
    show.add_argument("--tenant", required=True)
    add_policy_flag(show)
    add_redis_url_flag(show)
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.set_defaults(command=_quota_show)


def _quota_show(args: argparse.Namespace) -> int:
    settings = settings_from({"policy": args.policy, "redis_url": args.redis_url})
    redis_url = settings.shared_redis_url("quota show reads the shared counters")
    policy = load_policy(settings.policy)

    async def read() -> dict[str, object]:
        await install_runtime_tenants(policy, redis_url, args.tenant)
        async with counter_store(redis_url, timeout_ms=settings.redis_timeout_ms) as store:
            return await tenant_quota(policy, store, args.tenant, time.time())

    try:
        quota = asyncio.run(read())
    except UnknownTenant:
        print(f"meshtoll: no tenant {args.tenant!r} in {settings.policy} or the registry", file=sys.stderr)
        return 1
    print(json.dumps(quota, indent=2) if args.format == "json" else quota_table(quota))
    return 0
