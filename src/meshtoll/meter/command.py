"""`meshtoll usage show|export` and `meshtoll billing invoice` on the command line: what the
meter keeps, read from the shared usage store, as tables, JSON, CSV or billing systems'
events. The CLI's parser adds them with add_usage_command and add_billing_command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from meshtoll.errors import BadPeriod, ConfigError, NotBillable
from meshtoll.meter.billing import (
    billable_tenants,
    invoice_document,
    invoice_table,
    invoices_csv,
    tenant_invoice,
)
from meshtoll.meter.billing_periods import read_period
from meshtoll.meter.delivery_command import add_usage_delivery_commands, billing_names
from meshtoll.meter.export import FORMATS, export
from meshtoll.meter.pricing import Invoice
from meshtoll.meter.usage_report import usage_document, usage_table
from meshtoll.policy import load_policy
from meshtoll.settings import add_policy_flag, add_redis_url_flag, settings_from, time_flag
from meshtoll.sinks.events import DEFAULT_CLOUDEVENTS_SOURCE
from meshtoll.storage import usage_store
from meshtoll.tenants.served import install_runtime_tenants
from meshtoll.usage.records import UsageRecord
from meshtoll.usage.tallies import TenantUsage


def add_usage_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser("usage", help="metered usage").add_subparsers(title="usage commands")
    show = usage.add_parser("show", help="a tenant's requests and units in a period")
    show.add_argument("--tenant", required=True)
    show.add_argument("--period", default=None, help="YYYY-MM (default: the current month, UTC)")
    add_redis_url_flag(show)
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.set_defaults(command=_usage_show)
    exported = usage.add_parser("export", help="the usage ledger as JSON lines or CSV, for billing systems")
    exported.add_argument("--since", required=True, help="ISO date or time, UTC (inclusive)")
    exported.add_argument("--until", required=True, help="ISO date or time, UTC (exclusive)")
    exported.add_argument(
        "--format",
        choices=FORMATS,
        default="cloudevents",
        help="cloudevents: a CloudEvent a line; cloudevents-batch: one JSON array (OpenMeter's batch "
        "body); lago: an {event} a line; lago-batch: an {events} of at most 100 a line; csv",
    )
    exported.add_argument(
        "--tenant", default=None, help="one tenant (default: every tenant with usage in the store)"
    )
    exported.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="the policy whose billing: blocks and meters name tenants and meters (env "
        "MESHTOLL_POLICY; without either, each tenant under its own name, the default meters)",
    )
    exported.add_argument(
        "--cloudevents-source", default=DEFAULT_CLOUDEVENTS_SOURCE, help="the CloudEvents source"
    )
    add_redis_url_flag(exported)
    exported.set_defaults(command=_usage_export)
    add_usage_delivery_commands(usage)


def add_billing_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    billing = commands.add_parser("billing", help="invoices").add_subparsers(title="billing commands")
    bill = billing.add_parser("invoice", help="a tenant's invoice for a period, from metered usage")
    who = bill.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--all", action="store_true", help="every tenant whose plan has a price")
    bill.add_argument(
        "--period",
        default=None,
        help="YYYY-MM, or YYYY for prices billed by the year; with --all, the tenants billed by "
        "such periods (default: each tenant's current period, UTC)",
    )
    add_policy_flag(bill)
    add_redis_url_flag(bill)
    bill.add_argument("--format", choices=("table", "json", "csv"), default="table")
    bill.set_defaults(command=_billing_invoice)


def _usage_show(args: argparse.Namespace) -> int:
    redis_url = settings_from({"redis_url": args.redis_url}).shared_redis_url(
        "usage show reads the shared usage store"
    )
    period = _month(args.period, "--period")

    async def read() -> TenantUsage:
        async with usage_store(redis_url) as store:
            return await store.usage(args.tenant, period)

    usage = asyncio.run(read())
    print(json.dumps(usage_document(usage), indent=2) if args.format == "json" else usage_table(usage))
    return 0


def _usage_export(args: argparse.Namespace) -> int:
    redis_url = settings_from({"redis_url": args.redis_url}).shared_redis_url(
        "usage export reads the shared ledger"
    )
    since, until = time_flag(args.since, "--since"), time_flag(args.until, "--until")

    async def read() -> list[UsageRecord]:
        async with usage_store(redis_url) as store:
            # Every tenant with usage, from the store's own index: one that has left the
            # policy still owes what it used.
            tenants = [args.tenant] if args.tenant else await store.tenants()
            return [record for tenant in tenants for record in await store.ledger(tenant, since, until)]

    names = billing_names(args.policy, redis_url)
    sys.stdout.write(export(asyncio.run(read()), args.format, names, args.cloudevents_source))
    return 0


def _billing_invoice(args: argparse.Namespace) -> int:
    settings = settings_from({"policy": args.policy, "redis_url": args.redis_url})
    redis_url = settings.shared_redis_url("billing reads the shared usage store")
    policy = load_policy(settings.policy)

    async def bills() -> list[Invoice]:
        # Run-time tenants are billed like the file's: by the plan the registry gives them.
        await install_runtime_tenants(policy, redis_url, None if args.all else args.tenant)
        tenants = billable_tenants(policy, args.period) if args.all else [args.tenant]
        async with usage_store(redis_url) as store:
            return [await tenant_invoice(policy, store, tenant, args.period) for tenant in tenants]

    try:
        found = asyncio.run(bills())
    except BadPeriod as exc:
        raise ConfigError(f"--period {exc}") from None
    except NotBillable as exc:
        print(f"meshtoll: {exc}", file=sys.stderr)
        return 1
    if args.format == "csv":
        print(invoices_csv(found), end="")
    elif args.format == "json":
        documents = [invoice_document(bill) for bill in found]
        print(json.dumps(documents if args.all else documents[0], indent=2))
    else:
        print("\n\n".join(invoice_table(bill) for bill in found))
    return 0


def _month(text: str | None, flag: str) -> str:
    try:
        return read_period(text, "month")
    except BadPeriod as exc:
        raise ConfigError(f"{flag} {exc}") from None
