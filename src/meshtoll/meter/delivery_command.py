"""`meshtoll usage push` and `meshtoll usage quarantine` on the command line: their flags
and the calls into meter/push.py and the sink state store. The CLI's parser adds them with
add_usage_delivery_commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from meshtoll.meter.deliver import Attempts
from meshtoll.meter.push import Window, push
from meshtoll.meter.quarantine_report import quarantine_document, quarantine_table
from meshtoll.policy import load_policy
from meshtoll.settings import Settings, add_redis_url_flag, settings_from, time_flag
from meshtoll.sinks.events import DEFAULT_CLOUDEVENTS_SOURCE
from meshtoll.sinks.names import STRIPE_APIS, TARGETS, BillingNames, DefaultNames
from meshtoll.storage import open_sink_state_store, usage_store
from meshtoll.targets import open_sink
from meshtoll.tenants.served import install_runtime_tenants

# A one-shot push gives up on a target that keeps failing (exit 1, what it delivered kept).
PUSH_ATTEMPTS = 8


def add_usage_delivery_commands(usage: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pushing = usage.add_parser(
        "push",
        help="deliver the ledger's records of a window to OpenMeter, Lago or Stripe, once "
        "(credentials from MESHTOLL_OPENMETER_TOKEN, MESHTOLL_LAGO_API_KEY, MESHTOLL_STRIPE_API_KEY)",
    )
    pushing.add_argument("--to", required=True, choices=TARGETS, help="the billing system")
    pushing.add_argument("--url", required=True, help="its API's base URL (e.g. https://api.stripe.com)")
    pushing.add_argument("--since", required=True, help="ISO date or time, UTC (inclusive)")
    pushing.add_argument("--until", default=None, help="ISO date or time, UTC (exclusive; default now)")
    pushing.add_argument("--tenant", default=None, help="one tenant (default: every tenant with usage)")
    add_redis_url_flag(pushing)
    pushing.add_argument(
        "--policy", type=Path, default=None, help="the policy naming tenants and meters (env MESHTOLL_POLICY)"
    )
    pushing.add_argument(
        "--cloudevents-source", default=DEFAULT_CLOUDEVENTS_SOURCE, help="OpenMeter's CloudEvents source"
    )
    pushing.add_argument("--stripe-api", choices=STRIPE_APIS, default="v2", help="v2 event stream or v1 form")
    pushing.add_argument("--timeout-seconds", type=float, default=10.0, help="bound on each call")
    pushing.set_defaults(command=_push)

    quarantine = usage.add_parser("quarantine", help="records a billing system refused").add_subparsers(
        title="quarantine commands"
    )
    listing = quarantine.add_parser("list", help="what a sink's target refused, with its answer")
    listing.add_argument("--sink", required=True, choices=TARGETS)
    add_redis_url_flag(listing)
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(command=_quarantine_list)
    replay = quarantine.add_parser(
        "replay", help="send quarantined records again (the running sink, or the next push, delivers them)"
    )
    replay.add_argument("--sink", required=True, choices=TARGETS)
    replay.add_argument(
        "--key", action="append", default=None, help="<tenant>:<request id>, repeatable (default: every one)"
    )
    add_redis_url_flag(replay)
    replay.set_defaults(command=_quarantine_replay)


def billing_names(policy: Path | None, redis_url: str) -> BillingNames:
    """The names the policy gives tenants and meters in billing systems: from `policy` or
    MESHTOLL_POLICY when either is given, with the billing blocks of the registry's run-time
    tenants, as `meshtoll serve` names them; the defaults otherwise (usage outlives the policy)."""
    chosen = policy or os.environ.get(Settings.env_name("policy"))
    if not chosen:
        return DefaultNames()
    compiled = load_policy(chosen)
    asyncio.run(install_runtime_tenants(compiled, redis_url))
    return compiled.billing


def _redis_url(args: argparse.Namespace, why: str) -> str:
    return settings_from({"redis_url": args.redis_url}).shared_redis_url(why)


def _push(args: argparse.Namespace) -> int:
    url = _redis_url(args, "usage push reads the shared ledger and the sink's checkpoint")
    since = time_flag(args.since, "--since")
    until = time.time() if args.until is None else time_flag(args.until, "--until")
    names = billing_names(args.policy, url)
    sink = open_sink(
        args.to,
        args.url,
        lambda: names,
        os.environ,
        cloudevents_source=args.cloudevents_source,
        stripe_api=args.stripe_api,
        timeout=args.timeout_seconds,
    )

    async def run() -> Counter[str]:
        state = open_sink_state_store(url)
        try:
            async with usage_store(url) as usage:
                tenants = [args.tenant] if args.tenant else await usage.tenants()
                attempts = Attempts(asyncio.sleep, random.random, limit=PUSH_ATTEMPTS)
                return await push(sink, usage, state, Window(since, until, tenants), attempts, time.time())
        finally:
            await sink.close()
            await state.close()

    outcomes = asyncio.run(run())
    print(
        f"{args.to}: {outcomes['delivered']} delivered, "
        f"{outcomes['skipped']} delivered or quarantined before, {outcomes['quarantined']} quarantined, "
        f"{outcomes['retried']} sent again after a failure"
    )
    return 0


def _quarantine_list(args: argparse.Namespace) -> int:
    url = _redis_url(args, "the quarantine is in the shared store")

    async def read() -> dict[str, object]:
        state = open_sink_state_store(url)
        try:
            return quarantine_document(args.sink, await state.quarantined(args.sink))
        finally:
            await state.close()

    document = asyncio.run(read())
    print(json.dumps(document, indent=2) if args.format == "json" else quarantine_table(document))
    return 0


def _quarantine_replay(args: argparse.Namespace) -> int:
    url = _redis_url(args, "the quarantine is in the shared store")

    async def replay() -> int:
        state = open_sink_state_store(url)
        try:
            return await state.replay(args.sink, args.key)
        finally:
            await state.close()

    moved = asyncio.run(replay())
    print(f"{moved} record(s) queued for {args.sink} again", file=sys.stdout)
    return 0
