"""Run-time tenants as the policy's own Tenant values: a registry record's `spec` is checked
by the policy file's schema (`schema.build_tenant`: the same rules, the same messages), and
its keys become ApiKeys with their expiry. No second list of tenant fields exists: a field
the file's tenants gain (billing, say) is a run-time tenant's field too."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import orjson

from meshtoll.errors import PolicyError, PolicyProblem
from meshtoll.policy.document import Document
from meshtoll.policy.model import ApiKey, Plan, Tenant
from meshtoll.policy.schema import build_tenant, name_problem
from meshtoll.policy.screening import screen_values
from meshtoll.registry.records import KeyRecord, TenantRecord

# A run-time tenant's keys are made by meshtoll (or imported by hash), through their own
# endpoints; in a spec they would bypass that.
KEYS_FIELD = "api_keys"
# Distinct specs a RuntimeTenantReader remembers before it starts afresh.
SPECS_REMEMBERED = 10_000
_TEMPLATE_NAME = "tenant"  # specs are checked under this name; each record's is checked alone
_TENANT_FIELDS = tuple(field.name for field in dataclasses.fields(Tenant))


def check_spec(
    name: str, spec: object, plans: Mapping[str, Plan]
) -> tuple[Tenant | None, list[PolicyProblem]]:
    """The tenant `spec` describes, or None; and every problem of it, each at its field path
    in the spec (`allow.ip[1]`), with no file or line (the spec is not a file)."""
    document = Document(file="", root=spec, text="", _lines={})
    problem = name_problem(name)
    if problem is not None:
        document.problem(("name",), problem)
    for path, message in screen_values(spec):
        document.problem(path, message)
    if isinstance(spec, dict) and KEYS_FIELD in spec:
        document.problem((KEYS_FIELD,), "keys are made with POST /api/tenants/<tenant>/keys, not given here")
    if document.problems:
        return None, document.problems
    tenant = build_tenant(document, name, spec, (), plans)
    return (tenant if not document.problems else None), document.problems


def runtime_tenant(record: TenantRecord, plans: Mapping[str, Plan]) -> Tenant:
    """The record as a Tenant with its keys; PolicyError with its problems otherwise (a record
    that was valid when committed can stop being so: its plan left the policy file)."""
    return RuntimeTenantReader().tenant(record, plans)


class RuntimeTenantReader:
    """runtime_tenant for many records: a spec is checked once however many tenants have it
    (most share a handful: a plan and a status), which halves what loading 100,000 costs."""

    def __init__(self) -> None:
        self._plans: Mapping[str, Plan] | None = None
        self._checked: dict[bytes, tuple[Tenant | None, list[PolicyProblem]]] = {}

    def tenant(self, record: TenantRecord, plans: Mapping[str, Plan]) -> Tenant:
        problem = name_problem(record.name)
        if problem is not None:
            raise PolicyError([PolicyProblem("", None, "name", problem)])
        if plans is not self._plans or len(self._checked) >= SPECS_REMEMBERED:
            self._plans, self._checked = plans, {}  # another policy file, another answer
        spec = orjson.dumps(record.spec, option=orjson.OPT_SORT_KEYS)
        checked = self._checked.get(spec)
        if checked is None:
            checked = self._checked[spec] = check_spec(_TEMPLATE_NAME, record.spec, plans)
        template, problems = checked
        if template is None:
            raise PolicyError(problems)
        try:
            keys = tuple(api_key(key) for key in record.keys)
        except ValueError as exc:
            raise PolicyError([PolicyProblem("", None, "keys", f"a key record is damaged: {exc}")]) from None
        # Every field the schema knows comes along (a constructor of named fields would drop
        # one added later), with the tenant's own name and keys.
        values = {field: getattr(template, field) for field in _TENANT_FIELDS}
        return Tenant(**{**values, "name": record.name, "api_keys": keys})


def api_key(key: KeyRecord) -> ApiKey:
    """A registry key as a decision sees it. A revoked key stays indexed (401 revoked_api_key,
    not invalid_api_key); ValueError when its hash is not 64 hex digits."""
    digest = bytes.fromhex(key.sha256)
    if len(digest) != 32:
        raise ValueError(f"key {key.id!r}: its sha256 is not 32 bytes")
    return ApiKey(key.id, digest, key.revoked_at is not None, key.expires_at)
