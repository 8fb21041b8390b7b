"""`meshtoll tenants list|show|create|update|delete` and `meshtoll keys new|roll|revoke|list`:
the admin API's changes from the command line, made on the registry in Redis (--redis-url)
and checked against the policy file (--policy) as an instance checks them. `keys new`
without a store keeps printing a key and the entry that puts its hash in the policy file.
The CLI's parser adds them with add_tenants_command and add_keys_command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from meshtoll.api_keys import generate_key, key_sha256
from meshtoll.errors import TenantChangeRefused
from meshtoll.policy import CompiledPolicy, load_policy
from meshtoll.settings import add_policy_flag, add_redis_url_flag, settings_from
from meshtoll.storage import open_tenant_registry
from meshtoll.tenants.documents import file_tenant_document, key_document, runtime_tenant_document
from meshtoll.tenants.service import TenantService

Result = TypeVar("Result")
if TYPE_CHECKING:  # not subscriptable at run time
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def add_tenants_command(commands: Commands) -> None:
    tenants = commands.add_parser(
        "tenants", help="run-time tenants, in the registry in Redis"
    ).add_subparsers(title="tenants commands")
    listed = _store_command(tenants, "list", "every tenant: the policy file's and the registry's", _list)
    listed.add_argument("--plan", default=None)
    listed.add_argument("--status", default=None, choices=("active", "suspended"))
    listed.add_argument("--format", choices=("table", "json"), default="table")
    shown = _store_command(tenants, "show", "one tenant as JSON, with its keys (never a key itself)", _show)
    shown.add_argument("name")
    created = _store_command(
        tenants, "create", "a run-time tenant, checked as the policy file's are", _create
    )
    created.add_argument("name")
    created.add_argument("--plan", required=True)
    _field_flags(created)
    updated = _store_command(tenants, "update", "change a run-time tenant's fields", _update)
    updated.add_argument("name")
    updated.add_argument("--plan", default=None)
    _field_flags(updated)
    updated.add_argument("--remove", action="append", default=[], metavar="FIELD", help="drop a field")
    updated.add_argument("--if-match", type=int, default=None, help="refuse unless at this version")
    deleted = _store_command(
        tenants, "delete", "delete a run-time tenant (its usage stays billable)", _delete
    )
    deleted.add_argument("name")
    deleted.add_argument("--if-match", type=int, default=None, help="refuse unless at this version")


def add_keys_command(commands: Commands) -> None:
    keys = commands.add_parser("keys", help="API keys").add_subparsers(title="keys commands")
    new = keys.add_parser(
        "new",
        help="issue a key to a run-time tenant (with --redis-url), or else make a key and print its "
        "policy-file entry",
    )
    _key_flags(new, "the key's id (default: TENANT-<random>)", required=False)
    new.add_argument("--expires-at", default=None, help="RFC 3339 time from which the key is refused")
    add_policy_flag(new)
    add_redis_url_flag(new)
    new.set_defaults(command=_keys_new)
    rolled = _store_command(keys, "roll", "a new key now; the old one works --overlap-seconds more", _roll)
    _key_flags(rolled, "the key to roll", required=True)
    rolled.add_argument("--overlap-seconds", type=int, required=True)
    rolled.add_argument("--new-id", default=None, help="the new key's id (default: TENANT-<random>)")
    revoked = _store_command(keys, "revoke", "refuse a key from now on (401 revoked_api_key)", _revoke)
    _key_flags(revoked, "the key to revoke", required=True)
    listed = _store_command(keys, "list", "a tenant's keys: ids, hints, times (never the key)", _keys_list)
    listed.add_argument("--tenant", required=True)


def _store_command(
    commands: Commands, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help)
    add_policy_flag(parser)
    add_redis_url_flag(parser)
    parser.set_defaults(command=run)
    return parser


def _key_flags(parser: argparse.ArgumentParser, key_help: str, *, required: bool) -> None:
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--id", dest="key_id", default=None, required=required, help=key_help)


def _field_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", default=None, choices=("active", "suspended"))
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='any other tenant field as the policy file has it, e.g. \'allow={"ip": ["10.0.0.0/8"]}\'',
    )


def _run(
    args: argparse.Namespace, act: Callable[[TenantService, CompiledPolicy], Awaitable[Result]]
) -> Result:
    settings = settings_from({"policy": args.policy, "redis_url": args.redis_url})
    redis_url = settings.shared_redis_url("run-time tenants live in the registry in Redis")
    policy = load_policy(settings.policy)

    async def run() -> Result:
        registry = open_tenant_registry(redis_url)
        try:
            return await act(TenantService(registry, lambda: policy), policy)
        finally:
            await registry.close()

    return asyncio.run(run())


def _refused(refused: TenantChangeRefused) -> int:
    print(f"meshtoll: {refused.code}: {refused.message}", file=sys.stderr)
    for field, message in refused.problems:
        print(f"  {field or '(body)'}: {message}", file=sys.stderr)
    return 1


def _changed(args: argparse.Namespace, act: Callable[[TenantService, CompiledPolicy], Awaitable[Any]]) -> int:
    try:
        print(json.dumps(_run(args, act), indent=2))
    except TenantChangeRefused as refused:
        return _refused(refused)
    return 0


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in args.field:
        name, equals, text = item.partition("=")
        try:
            fields[name] = json.loads(text) if equals else None
        except json.JSONDecodeError as exc:
            raise TenantChangeRefused("invalid_tenant", f"--field {item!r} is not NAME=JSON: {exc}") from None
    for name in ("plan", "status"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "cli"


def _list(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> list[dict[str, Any]]:
        snapshot = await service.registry.snapshot()
        found = [file_tenant_document(compiled) for compiled in policy.tenants.values()]
        found += [
            runtime_tenant_document(record)
            for record in snapshot.records
            if record.name not in policy.tenants
        ]
        return sorted(found, key=lambda tenant: str(tenant["name"]))

    tenants = [
        tenant
        for tenant in _run(args, act)
        if args.plan in (None, tenant["plan"]) and args.status in (None, tenant["status"])
    ]
    if args.format == "json":
        print(json.dumps(tenants, indent=2))
        return 0
    print(f"{'tenant':<30} {'source':<8} {'plan':<16} {'status':<10} keys")
    for tenant in tenants:
        name, source, plan, status = (tenant[field] for field in ("name", "source", "plan", "status"))
        print(f"{name:<30} {source:<8} {plan:<16} {status:<10} {len(tenant['keys'])}")
    return 0


def _show(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        compiled = policy.tenants.get(args.name)
        if compiled is not None:
            return file_tenant_document(compiled)
        record = await service.get(args.name)
        use = await service.registry.key_use(args.name, [key.id for key in record.keys])
        return runtime_tenant_document(record, use)

    return _changed(args, act)


def _create(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        return runtime_tenant_document(await service.create({"name": args.name, **_fields(args)}, _actor()))

    return _changed(args, act)


def _update(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        patch = {**_fields(args), **dict.fromkeys(args.remove)}
        return runtime_tenant_document(await service.update(args.name, patch, args.if_match, _actor()))

    return _changed(args, act)


def _delete(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        return {"deleted": args.name, "version": await service.delete(args.name, args.if_match, _actor())}

    return _changed(args, act)


def _keys_new(args: argparse.Namespace) -> int:
    if settings_from({"redis_url": args.redis_url}).redis_url is None:
        return _print_policy_entry(args)

    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        body = {"id": args.key_id, "expires_at": args.expires_at}
        issued = await service.issue_key(
            args.tenant, {k: v for k, v in body.items() if v is not None}, _actor()
        )
        return {**key_document(issued.record), "key": issued.key, "version": issued.tenant.version}

    try:
        issued = _run(args, act)
    except TenantChangeRefused as refused:
        return _refused(refused)
    print(f"API key (shown once, store it now): {issued['key']}", file=sys.stderr)
    print(json.dumps(issued, indent=2))
    return 0


def _print_policy_entry(args: argparse.Namespace) -> int:
    key = generate_key()
    key_id = args.key_id or f"{args.tenant}-{secrets.token_hex(3)}"
    print(f"API key (shown once, store it now): {key}")
    print(f"# add under tenants.{args.tenant}.api_keys:")
    print(f"- {{id: {key_id}, sha256: {key_sha256(key).hex()}}}")
    return 0


def _roll(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        body: dict[str, Any] = {"overlap_seconds": args.overlap_seconds}
        if args.new_id is not None:
            body["id"] = args.new_id
        issued = await service.roll_key(args.tenant, args.key_id, body, _actor())
        old = issued.tenant.key(args.key_id)
        rolled = None if old is None else key_document(old)
        return {
            **key_document(issued.record),
            "key": issued.key,
            "rolled": rolled,
            "version": issued.tenant.version,
        }

    return _changed(args, act)


def _revoke(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        record = await service.revoke_key(args.tenant, args.key_id, _actor())
        key = record.key(args.key_id)
        return {**(key_document(key) if key is not None else {}), "version": record.version}

    return _changed(args, act)


def _keys_list(args: argparse.Namespace) -> int:
    async def act(service: TenantService, policy: CompiledPolicy) -> dict[str, Any]:
        compiled = policy.tenants.get(args.tenant)
        if compiled is not None:
            return {"tenant": args.tenant, "source": "file", "keys": file_tenant_document(compiled)["keys"]}
        record = await service.get(args.tenant)
        use = await service.registry.key_use(args.tenant, [key.id for key in record.keys])
        return {
            "tenant": args.tenant,
            "source": "runtime",
            "keys": runtime_tenant_document(record, use)["keys"],
        }

    return _changed(args, act)
