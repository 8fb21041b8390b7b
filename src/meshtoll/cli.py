"""Command-line parsing only: every command calls into the module that does the work."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meshtoll.errors import ConfigError, MeshtollError, PolicyError
from meshtoll.policy import load_policy
from meshtoll.settings import Settings, boolean, settings_from

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
    parser = argparse.ArgumentParser(prog="meshtoll", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the services Envoy calls")
    _settings_flags(serve)
    serve.set_defaults(command=_serve)

    ratelimit = commands.add_parser(
        "ratelimit",
        help="run the rate-limit service alone, configured like envoyproxy/ratelimit "
        "(its environment variables: RUNTIME_ROOT, REDIS_URL, GRPC_PORT, ...)",
    )
    ratelimit.set_defaults(command=_ratelimit)

    dev = commands.add_parser("dev", help="run the whole local stack: Envoy, meshtoll, Redis, demo upstream")
    dev.add_argument("--policy", type=Path, default=None, help="policy file (default: examples/policy.yaml)")
    dev.add_argument("--port", type=int, default=8080, help="Envoy's port for clients (HTTP ext_authz)")
    dev.add_argument("--admin-port", type=int, default=8090, help="meshtoll's admin port")
    dev.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis (shared with the usage and billing commands) instead of starting one "
        "(env MESHTOLL_REDIS_URL)",
    )
    dev.set_defaults(command=_dev)

    policy = commands.add_parser("policy", help="work with policy files").add_subparsers(
        title="policy commands"
    )
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(command=_policy_check)

    quota = commands.add_parser("quota", help="tenants' limits and their use").add_subparsers(
        title="quota commands"
    )
    show = quota.add_parser("show", help="each limit of a tenant with used / remaining / reset")
    show.add_argument("--tenant", required=True)
    show.add_argument("--policy", type=Path, default=None, help="policy file (env MESHTOLL_POLICY)")
    show.add_argument(
        "--redis-url", default=None, help="the Redis meshtoll serve uses (env MESHTOLL_REDIS_URL)"
    )
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.set_defaults(command=_quota_show)

    usage = commands.add_parser("usage", help="metered usage").add_subparsers(title="usage commands")
    usage_show = usage.add_parser("show", help="a tenant's requests and units in a period")
    usage_show.add_argument("--tenant", required=True)
    usage_show.add_argument("--period", default=None, help="YYYY-MM (default: the current month, UTC)")
    usage_show.add_argument(
        "--redis-url", default=None, help="the Redis meshtoll serve uses (env MESHTOLL_REDIS_URL)"
    )
    usage_show.add_argument("--format", choices=("table", "json"), default="table")
    usage_show.set_defaults(command=_usage_show)
    usage_export = usage.add_parser(
        "export", help="the usage ledger as JSON lines or CSV, for billing systems"
    )
    usage_export.add_argument("--since", required=True, help="ISO date or time, UTC (inclusive)")
    usage_export.add_argument("--until", required=True, help="ISO date or time, UTC (exclusive)")
    usage_export.add_argument("--format", choices=("cloudevents", "lago", "csv"), default="cloudevents")
    usage_export.add_argument(
        "--tenant", default=None, help="one tenant (default: every tenant with usage in the store)"
    )
    usage_export.add_argument(
        "--redis-url", default=None, help="the Redis meshtoll serve uses (env MESHTOLL_REDIS_URL)"
    )
    usage_export.set_defaults(command=_usage_export)

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
    bill.add_argument("--policy", type=Path, default=None, help="policy file (env MESHTOLL_POLICY)")
    bill.add_argument(
        "--redis-url", default=None, help="the Redis meshtoll serve uses (env MESHTOLL_REDIS_URL)"
    )
    bill.add_argument("--format", choices=("table", "json", "csv"), default="table")
    bill.set_defaults(command=_billing_invoice)

    from meshtoll.render.command import add_render_command

    add_render_command(commands)

    keys = commands.add_parser("keys", help="work with API keys").add_subparsers(title="keys commands")
    new = keys.add_parser("new", help="make a new API key and print its policy entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--id", dest="key_id", default=None, help="the key's name (default: TENANT-<random>)")
    new.set_defaults(command=_keys_new)
    return parser


def _settings_flags(serve: argparse.ArgumentParser) -> None:
    """One flag per Settings field: --field-name, its help and parser from the field. None
    when not given, so that settings_from can tell a flag from the environment."""
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        help_text = f"{meta['help']} (env {Settings.env_name(field.name)}, default {field.default})"
        if meta["parse"] is boolean:
            serve.add_argument(flag, dest=field.name, action="store_true", default=None, help=help_text)
        elif isinstance(field.default, tuple):  # a list: the flag repeats, each one adds
            serve.add_argument(
                flag,
                dest=field.name,
                action="extend",
                type=_flag_value(meta["parse"]),
                default=None,
                metavar=meta["metavar"],
                help=help_text,
            )
        else:
            serve.add_argument(
                flag,
                dest=field.name,
                type=_flag_value(meta["parse"]),
                default=None,
                metavar=meta["metavar"],
                help=help_text,
            )


def _flag_value(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse`, with argparse's error (the flag named) when the text is not a value."""

    def value(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"invalid value {text!r}") from None

    value.__name__ = getattr(parse, "__name__", "value")
    return value


def _serve(args: argparse.Namespace) -> int:
    from meshtoll.server.tls import load_service_tls

    settings = settings_from(vars(args))
    # Validate before any worker starts: a bad policy is one clear error, not a restart loop.
    load_policy(settings.policy)
    if settings.ratelimit_config is not None:
        from meshtoll.envoyproxy_ratelimit.config_files import load_descriptor_configs

        load_descriptor_configs(settings.ratelimit_config)
    load_service_tls(settings)
    if settings.workers == 1:
        from meshtoll.server.app import run
        from meshtoll.server.event_loop import run_on_event_loop

        run_on_event_loop(run(settings), settings.event_loop)
        return 0
    from meshtoll.server.workers import supervise

    return supervise(settings)


def _ratelimit(args: argparse.Namespace) -> int:
    from meshtoll.envoyproxy_ratelimit.environment import rls_settings_from
    from meshtoll.server.event_loop import run_on_event_loop
    from meshtoll.server.rls_app import configure_logging, run

    settings = rls_settings_from()
    configure_logging(settings)
    try:
        run_on_event_loop(run(settings), settings.event_loop)
    except PolicyError as exc:
        print(f"rate-limit configuration rejected:\n{exc}", file=sys.stderr)
        return 1
    return 0


def _dev(args: argparse.Namespace) -> int:
    from meshtoll.local.dev import run_dev

    redis_url = settings_from({"redis_url": args.redis_url}).redis_url
    return run_dev(policy=args.policy, port=args.port, admin_port=args.admin_port, redis_url=redis_url)


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


def _quota_show(args: argparse.Namespace) -> int:
    from meshtoll.errors import UnknownTenant
    from meshtoll.ratelimit.quota import quota_table, tenant_quota
    from meshtoll.storage import counter_store

    settings = settings_from({"policy": args.policy, "redis_url": args.redis_url})
    _needs_redis(settings, "quota show reads the shared counters")
    policy = load_policy(settings.policy)

    async def read() -> dict[str, object]:
        async with counter_store(settings.redis_url, timeout_ms=settings.redis_timeout_ms) as store:
            return await tenant_quota(policy, store, args.tenant, time.time())

    try:
        quota = asyncio.run(read())
    except UnknownTenant:
        print(f"meshtoll: no tenant {args.tenant!r} in {settings.policy}", file=sys.stderr)
        return 1
    print(json.dumps(quota, indent=2) if args.format == "json" else quota_table(quota))
    return 0


def _usage_show(args: argparse.Namespace) -> int:
    from meshtoll.meter.usage_report import usage_document, usage_table
    from meshtoll.storage import usage_store
    from meshtoll.usage.tallies import TenantUsage

    settings = settings_from({"redis_url": args.redis_url})
    _needs_redis(settings, "usage show reads the shared usage store")
    period = _month(args.period, "--period")

    async def read() -> TenantUsage:
        async with usage_store(settings.redis_url) as store:
            return await store.usage(args.tenant, period)

    usage = asyncio.run(read())
    print(json.dumps(usage_document(usage), indent=2) if args.format == "json" else usage_table(usage))
    return 0


def _usage_export(args: argparse.Namespace) -> int:
    from meshtoll.meter.export import export
    from meshtoll.storage import usage_store
    from meshtoll.usage.records import UsageRecord

    settings = settings_from({"redis_url": args.redis_url})
    _needs_redis(settings, "usage export reads the shared ledger")
    since, until = _utc_time(args.since, "--since"), _utc_time(args.until, "--until")

    async def read() -> list[UsageRecord]:
        async with usage_store(settings.redis_url) as store:
            # Every tenant with usage, from the store's own index: one that has left the
            # policy still owes what it used.
            tenants = [args.tenant] if args.tenant else await store.tenants()
            return [record for tenant in tenants for record in await store.ledger(tenant, since, until)]

    sys.stdout.write(export(asyncio.run(read()), args.format))
    return 0


def _needs_redis(settings: Settings, why: str) -> None:
    if settings.redis_url is None:
        raise ConfigError(f"{why}: give --redis-url or MESHTOLL_REDIS_URL")


def _utc_time(text: str, flag: str) -> float:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not an ISO date or time (e.g. 2026-11-01 or 2026-11-01T12:00)"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _month(text: str | None, flag: str) -> str:
    from meshtoll.errors import BadPeriod
    from meshtoll.meter.billing_periods import read_period

    try:
        return read_period(text, "month")
    except BadPeriod as exc:
        raise ConfigError(f"{flag} {exc}") from None


def _billing_invoice(args: argparse.Namespace) -> int:
    from meshtoll.errors import BadPeriod, NotBillable
    from meshtoll.meter.billing import (
        billable_tenants,
        invoice_document,
        invoice_table,
        invoices_csv,
        tenant_invoice,
    )
    from meshtoll.meter.pricing import Invoice
    from meshtoll.storage import usage_store

    settings = settings_from({"policy": args.policy, "redis_url": args.redis_url})
    _needs_redis(settings, "billing reads the shared usage store")
    policy = load_policy(settings.policy)

    async def bills(tenants: list[str]) -> list[Invoice]:
        async with usage_store(settings.redis_url) as store:
            return [await tenant_invoice(policy, store, tenant, args.period) for tenant in tenants]

    try:
        found = asyncio.run(bills(billable_tenants(policy, args.period) if args.all else [args.tenant]))
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


def _keys_new(args: argparse.Namespace) -> int:
    key = "mt_" + secrets.token_urlsafe(32)
    key_id = args.key_id or f"{args.tenant}-{secrets.token_hex(3)}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"API key (shown once, store it now): {key}")
    print(f"# add under tenants.{args.tenant}.api_keys:")
    print(f"- {{id: {key_id}, sha256: {digest}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
