"""Every Redis key meshtoll writes, in one place. Each key of a tenant carries it as a hash tag
(`{tenant}`), so that all of one tenant's keys live on one Redis Cluster shard and one Lua
call can touch them together. (envoyproxy/ratelimit's own key format, kept in strict
compatibility, lives with that compatibility in envoyproxy_ratelimit/strict.py.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshtoll.counting.limits import RateLimit


def counter_key(tenant: str, scope: str, limit: RateLimit) -> str:
    return f"meshtoll_{{{tenant}}}_{scope}_{limit.name}"


def usage_key(tenant: str, period: str) -> str:
    return f"meshtoll_{{{tenant}}}_usage_{period}"


def seen_key(tenant: str, week: int) -> str:
    """The set of request ids counted in one week (counted from the epoch): where replays
    are found."""
    return f"meshtoll_{{{tenant}}}_seen_w{week}"


def ledger_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_ledger"


def ledger_appended_key(tenant: str) -> str:
    """How many records the tenant's ledger has ever been appended (each entry's `last`)."""
    return f"meshtoll_{{{tenant}}}_ledger_appended"


def admissions_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_admissions"


def reported_units_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_reported_units"


def pending_key(tenant: str) -> str:
    return f"meshtoll_{{{tenant}}}_pending"


def admitted_tenants_key(bucket: int) -> str:
    """Request id -> tenant of the admissions stored in one ten-second bucket (counted from
    the epoch), for access-log entries that name no tenant. Global, not one tenant's: such
    an entry may be of any tenant, and one lookup must find it (on a Cluster, each bucket
    is one hash on one shard)."""
    return f"meshtoll_admitted_tenants_b{bucket}"


def sink_key(sink: str, what: str) -> str:
    """A billing sink's state (sinks/state.py): its lease, cursors, quarantine, replay queue
    and pushed windows. One hash tag per sink, so that a write guarded by the lease is one
    Lua call on one Cluster shard."""
    return f"meshtoll_{{sink_{sink}}}_{what}"


# The tenants with admissions awaiting settlement, so reconciliation never scans them all.
PENDING_TENANTS_KEY = "meshtoll_pending_tenants"


# The set of every tenant with usage: exports and invoices find them without the policy.
USAGE_TENANTS_KEY = "meshtoll_usage_tenants"


# The registry of run-time tenants (meshtoll.registry): every key carries the one hash tag
# {registry}, unlike the per-tenant tags above, because one change must check and write several
# of them atomically in one Lua call (storage/lua/registry.lua): on a Cluster the whole registry
# lives on the shard of that tag.
REGISTRY_TENANTS_KEY = "meshtoll_{registry}_tenants"  # hash: tenant -> its JSON record
REGISTRY_KEY_HASHES_KEY = "meshtoll_{registry}_key_hashes"  # hash: key SHA-256 (hex) -> tenant
REGISTRY_VERSION_KEY = "meshtoll_{registry}_version"  # string: +1 per change
REGISTRY_CHANGES_KEY = "meshtoll_{registry}_changes"  # stream: the change log instances follow
REGISTRY_AUDIT_KEY = "meshtoll_{registry}_audit"  # stream: one entry per change
REGISTRY_KEY_USE_KEY = "meshtoll_{registry}_key_use"  # hash: "<tenant>\n<key id>" -> last minute
REGISTRY_INSTANCES_KEY = "meshtoll_{registry}_instances"  # hash: instance id -> its JSON report
REGISTRY_HEARD_KEY = "meshtoll_{registry}_instances_heard"  # sorted set: instance id by last report


def key_use_field(tenant: str, key_id: str) -> str:
    return f"{tenant}\n{key_id}"
