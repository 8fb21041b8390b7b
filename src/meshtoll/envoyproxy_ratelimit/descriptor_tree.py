"""One envoyproxy/ratelimit domain as a tree, read from its YAML and matched the way that
project matches (its config_impl.go), so that its own configuration files and test cases
give the same answers here.

Reading: each descriptor's key is `key`, or `key_value` when a value is given; a `*`
anywhere in it is a wildcard matching any run of characters (`bar*b`, `/api/*/action`).
A rate limit has `unit` and `requests_per_unit` (neither with `unlimited`; 0 refuses
everything), an optional `name` (none is invented) and `replaces` (not its own name). Per descriptor:
`shadow_mode`, `quota_mode`, `detailed_metric`, `value_to_metric`, `share_threshold`
(wildcards only: every value the wildcard matches shares one counter) and `metadata`.

Matching walks the entries level by level: `key_value` exactly, else the first wildcard
(in file order) matching `key_value`, else the bare `key`; a limit applies only at the last
entry, so a request with more or fewer entries than the configured depth matches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshtoll.counting.limits import RateLimit
from meshtoll.policy.document import Document, FieldPath
from meshtoll.policy.fields import Fields

UNITS = ("second", "minute", "hour", "day", "week", "month", "year")
_DESCRIPTOR_FIELDS = (
    "value",
    "rate_limit",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
    "descriptors",
)
_FLAGS = ("shadow_mode", "quota_mode", "detailed_metric", "value_to_metric", "share_threshold")


@dataclass(slots=True)
class Node:
    final_key: str  # "key" or "key_value", as envoyproxy/ratelimit's map key
    stats_key: str  # envoyproxy/ratelimit's FullKey: domain.key1_value1.subkey1
    limit: RateLimit | None = None
    unlimited: bool = False
    replaces: frozenset[str] = frozenset()
    quota: bool = False
    detailed_metric: bool = False
    value_to_metric: bool = False
    share_threshold: bool = False
    metadata: dict[str, Any] | None = None
    children: Level = field(default_factory=lambda: Level())


@dataclass(slots=True)
class Level:
    nodes: dict[str, Node] = field(default_factory=dict)  # final key -> node, wildcards too
    wildcards: list[tuple[tuple[str, ...], Node]] = field(
        default_factory=list
    )  # (pattern split on "*", node)

    def add(self, node: Node) -> bool:
        """False when the level already has a descriptor of that key."""
        if node.final_key in self.nodes:
            return False
        self.nodes[node.final_key] = node
        if "*" in node.final_key:
            self.wildcards.append((tuple(node.final_key.split("*")), node))
        return True


@dataclass(frozen=True, slots=True)
class DescriptorMatch:
    key: str  # the counter key less its window: domain_key1_value1_... (share_threshold: the pattern)
    limit: RateLimit | None  # None: `unlimited`, admitted without counting
    replaces: frozenset[str] = frozenset()
    quota: bool = False
    metadata: dict[str, Any] | None = None
    stats_key: str = ""  # envoyproxy/ratelimit's metric key, after detailed_metric and value_to_metric


def read_domain(document: Document) -> tuple[str | None, Level]:
    """A file's domain and tree; problems are recorded in the document."""
    fields = Fields(document)
    root = fields.mapping(document.root, (), required=("domain",), optional=("descriptors",)) or {}
    domain = fields.string(root["domain"], ("domain",)) if "domain" in root else None
    level = Level()
    add_descriptors(fields, level, root.get("descriptors"), ("descriptors",), domain or "")
    return domain, level


def add_descriptors(fields: Fields, level: Level, value: object, path: FieldPath, parent: str) -> None:
    """Read a `descriptors` list into `level` (a domain's, when merging files, already filled)."""
    for item, item_path in fields.items(value, path):
        raw = fields.mapping(item, item_path, required=("key",), optional=_DESCRIPTOR_FIELDS)
        if raw is None or "key" not in raw:
            continue
        key = fields.string(raw["key"], (*item_path, "key"))
        if key is None:
            continue
        text = _scalar_text(raw.get("value"))
        final_key = f"{key}_{text}" if text else key
        flags = {flag: fields.boolean(raw.get(flag, False), (*item_path, flag)) is True for flag in _FLAGS}
        node = Node(
            final_key,
            f"{parent}.{final_key}",
            quota=flags["quota_mode"],
            detailed_metric=flags["detailed_metric"],
            value_to_metric=flags["value_to_metric"],
            share_threshold=flags["share_threshold"],
        )
        if node.share_threshold and "*" not in final_key:
            fields.problem(
                (*item_path, "share_threshold"),
                f"share_threshold needs a wildcard value (containing '*'), but the key is {final_key!r}",
            )
        if "metadata" in raw:
            node.metadata = _metadata(fields, raw["metadata"], (*item_path, "metadata"))
        if "rate_limit" in raw:
            _rate_limit(fields, raw["rate_limit"], (*item_path, "rate_limit"), node, flags["shadow_mode"])
        add_descriptors(
            fields, node.children, raw.get("descriptors"), (*item_path, "descriptors"), node.stats_key
        )
        if not level.add(node):
            fields.problem(item_path, f"duplicate descriptor {final_key!r} at this level")


def _scalar_text(value: object) -> str:
    """A value as envoyproxy/ratelimit's YAML library reads it into a string: `true`, `5`, `0.5`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _metadata(fields: Fields, value: object, path: FieldPath) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        fields.problem(path, "expected a mapping")
        return None
    plain = _plain(value)
    assert isinstance(plain, dict)
    return plain


def _plain(value: object) -> object:
    # envoyproxy/ratelimit reads every key as text (`1:` is "1") and sends the whole as a protobuf Struct.
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _rate_limit(fields: Fields, value: object, path: FieldPath, node: Node, shadow: bool) -> None:
    optional = ("unit", "requests_per_unit", "unlimited", "name", "replaces")
    raw = fields.mapping(value, path, optional=optional) or {}
    name = raw.get("name")
    name = "" if name is None else _scalar_text(name)
    replaces = []
    for item, item_path in fields.items(raw.get("replaces"), (*path, "replaces")):
        entry = fields.mapping(item, item_path, optional=("name",)) or {}
        replaced = _scalar_text(entry.get("name"))
        if not replaced:
            fields.problem(item_path, "a replaces entry needs a name")
        elif replaced == name:
            fields.problem(item_path, f"the limit replaces its own name {name!r}")
        else:
            replaces.append(replaced)
    node.replaces = frozenset(replaces)
    unit = raw.get("unit")
    unit = unit.lower() if isinstance(unit, str) else unit
    if fields.boolean(raw.get("unlimited", False), (*path, "unlimited")):
        if unit in UNITS:
            fields.problem((*path, "unit"), "an unlimited rate_limit takes no unit")
        if "requests_per_unit" in raw:
            fields.problem((*path, "requests_per_unit"), "an unlimited rate_limit takes no requests_per_unit")
        node.unlimited = True
        return
    # envoyproxy/ratelimit reads a missing requests_per_unit as 0, which refuses everything: more likely a
    # mistake than a ban, so it is an error here (write 0 to ban).
    for required in ("unit", "requests_per_unit"):
        if required not in raw:
            fields.problem(path, f"missing required field '{required}'")
    if "unit" not in raw or "requests_per_unit" not in raw:
        return
    period = fields.choice(unit, (*path, "unit"), UNITS)
    requests = fields.integer(raw["requests_per_unit"], (*path, "requests_per_unit"))
    if period is not None and requests is not None:
        node.limit = RateLimit(requests, period, name=name, shadow=shadow)


def match(root: Level, domain: str, entries: Sequence[tuple[str, str]]) -> DescriptorMatch | None:
    """envoyproxy/ratelimit's GetLimit for a descriptor without an override."""
    level = root
    found: Node | None = None
    shared: dict[int, str] = {}  # entry index -> the wildcard value its counter uses
    metric_parts: list[str] = []
    for index, (key, value) in enumerate(entries):
        final_key = f"{key}_{value}"
        node = level.nodes.get(final_key)
        wildcard = None
        if node is None:
            for parts, candidate in level.wildcards:
                if _wildcard_matches(parts, final_key):
                    node, wildcard = candidate, candidate.final_key
                    break
        by_value = node is not None
        if node is None:
            node = level.nodes.get(key)
        if node is not None and wildcard is not None and node.share_threshold:
            shared[index] = wildcard.removeprefix(f"{key}_")
        metric_parts.append(_metric_part(key, value, node, wildcard, by_value, shared.get(index)))
        found = node if index == len(entries) - 1 else None
        if node is None or not node.children.nodes:
            break
        level = node.children
    if found is None or (found.limit is None and not found.unlimited):
        return None
    counted = tuple((key, shared.get(i, value)) for i, (key, value) in enumerate(entries))
    return DescriptorMatch(
        "_".join([domain, *(f"{key}_{value}" for key, value in counted)]),
        found.limit,
        found.replaces,
        found.quota,
        found.metadata,
        _stats_key(domain, entries, found, shared, metric_parts),
    )


def _wildcard_matches(parts: tuple[str, ...], text: str) -> bool:
    """`text` against a pattern split on "*": each * matches any run, the empty one too."""
    first, last = parts[0], parts[-1]
    if not text.startswith(first) or not text.endswith(last) or len(text) < sum(map(len, parts)):
        return False
    rest = text[len(first) : len(text) - len(last)]
    for part in parts[1:-1]:
        at = rest.find(part)
        if at < 0:
            return False
        rest = rest[at + len(part) :]
    return True


def _metric_part(
    key: str, value: str, node: Node | None, wildcard: str | None, by_value: bool, shared: str | None
) -> str:
    """One level of envoyproxy/ratelimit's value_to_metric key."""
    if node is None:
        return key
    if wildcard is not None:
        shown = shared or (value if node.value_to_metric else wildcard.removeprefix(f"{key}_"))
    elif by_value or node.value_to_metric:
        shown = value
    else:
        shown = ""
    return f"{key}_{shown}" if shown else key


def _stats_key(
    domain: str, entries: Sequence[tuple[str, str]], node: Node, shared: dict[int, str], parts: list[str]
) -> str:
    if node.detailed_metric:
        shown = [
            f"{key}_{shared[i]}" if i in shared else (f"{key}_{value}" if value else key)
            for i, (key, value) in enumerate(entries)
        ]
        return ".".join([domain, *shown])
    return ".".join([domain, *parts])


def limit_names(level: Level) -> set[str]:
    """Every rate limit name of a domain."""
    names: set[str] = set()
    for node in level.nodes.values():
        if node.limit is not None and node.limit.name:
            names.add(node.limit.name)
        names |= limit_names(node.children)
    return names


def dangling_replaces(level: Level, names: set[str]) -> list[str]:
    """Names replaced in a domain that no rate limit of it has (sorted): envoyproxy/ratelimit ignores
    them, meshtoll reports them, since a misspelt name silently disables a replacement."""
    found: set[str] = set()
    for node in level.nodes.values():
        found |= node.replaces - names
        found.update(dangling_replaces(node.children, names))
    return sorted(found)


def merge(into: Level, other: Level) -> list[str]:
    """MERGE_DOMAIN_CONFIG: `other`'s top-level descriptors join `into`; the keys already
    there are returned (a duplicate is an error, as in envoyproxy/ratelimit)."""
    return [node.final_key for node in other.nodes.values() if not into.add(node)]
