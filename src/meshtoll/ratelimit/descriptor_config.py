"""envoyproxy/ratelimit configuration files, read unchanged, and matched the way it matches.

Every `*.yaml`/`*.yml` of a directory holds one `domain` and its nested `descriptors`
(`key`, optional `value` — exact, or a prefix ending in `*` —, `rate_limit: {unit,
requests_per_unit, unlimited, name, replaces}`, `shadow_mode`, `detailed_metric`).
Matching walks a request descriptor's entries level by level: at each level the entry's
`key_value` first, then a wildcard value of that key, then the bare `key` (any value); a
limit applies only when the node of the last entry has one, so a request with more or
fewer entries than the configured depth does not match. A node without a limit and
without children is a whitelist. `requests_per_unit: 0` refuses everything.

Differences from envoyproxy/ratelimit:
- `month` and `year` are calendar periods in UTC (envoyproxy/ratelimit uses 30 and 365
  days), so counters of those units are not shared with it; second to week are.
- A request is admitted or refused as a whole: a refused request consumes no counter
  (envoyproxy/ratelimit increments every matched counter, refused or not).
- `detailed_metric` is accepted and has no effect: meshtoll's metrics carry no
  descriptor values.
- A configuration problem is reported with file, line and field path, and a directory
  with any problem is rejected whole (the previous configuration stays active).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshtoll.errors import PolicyError, PolicyProblem
from meshtoll.policy.document import Document, FieldPath, parse_document
from meshtoll.policy.fields import Fields
from meshtoll.policy.reload import load_off_loop
from meshtoll.policy.screening import read_document
from meshtoll.ratelimit.limits import RateLimit

log = logging.getLogger("meshtoll.ratelimit.config")

UNITS = ("second", "minute", "hour", "day", "week", "month", "year")
UNLIMITED_REMAINING = 2**32 - 1  # what envoyproxy/ratelimit reports for `unlimited`


@dataclass(slots=True)
class Level:
    exact: dict[str, Node] = field(default_factory=dict)  # "key_value" -> node
    any_value: dict[str, Node] = field(default_factory=dict)  # "key" -> node
    wildcards: list[tuple[str, str, Node]] = field(default_factory=list)  # (key, value prefix, node)

    def find(self, key: str, value: str) -> Node | None:
        found = self.exact.get(f"{key}_{value}")
        if found is not None:
            return found
        for wildcard_key, prefix, node in self.wildcards:
            if wildcard_key == key and value.startswith(prefix):
                return node
        return self.any_value.get(key)


@dataclass(slots=True)
class Node:
    limit: RateLimit | None = None
    unlimited: bool = False
    replaces: frozenset[str] = frozenset()
    children: Level = field(default_factory=Level)


@dataclass(frozen=True, slots=True)
class DescriptorMatch:
    key: str  # envoyproxy/ratelimit's counter key, less the window: domain_key1_value1_...
    limit: RateLimit | None  # None: `unlimited`, admitted without counting
    replaces: frozenset[str] = frozenset()


class DescriptorConfigs:
    def __init__(self, domains: dict[str, Level]) -> None:
        self.domains = domains

    def match(self, domain: str, entries: Sequence[tuple[str, str]]) -> DescriptorMatch | None:
        level = self.domains.get(domain)
        if level is None or not entries:
            return None
        node: Node | None = None
        for key, value in entries:
            if level is None:
                return None
            node = level.find(key, value)
            if node is None:
                return None
            level = node.children
        assert node is not None
        if node.limit is None and not node.unlimited:
            return None
        return DescriptorMatch(counter_key(domain, entries), node.limit, node.replaces)


def counter_key(domain: str, entries: Sequence[tuple[str, str]]) -> str:
    """envoyproxy/ratelimit's cache key less its window suffix: domain_key1_value1_key2_value2."""
    return "_".join([domain, *(f"{key}_{value}" for key, value in entries)])


def resolve_replaces(matches: Sequence[DescriptorMatch | None]) -> list[DescriptorMatch | None]:
    """Drop every matched limit that another matched limit of the same request replaces."""
    replaced = frozenset().union(*(match.replaces for match in matches if match is not None))
    if not replaced:
        return list(matches)
    return [
        None if match is not None and match.limit is not None and match.limit.name in replaced else match
        for match in matches
    ]


def load_descriptor_configs(directory: Path) -> DescriptorConfigs:
    try:
        files = sorted(
            path for path in directory.iterdir() if path.suffix in (".yaml", ".yml") and path.is_file()
        )
    except OSError as exc:
        raise PolicyError([PolicyProblem(str(directory), None, "", f"cannot list: {exc}")]) from None
    problems: list[PolicyProblem] = []
    domains: dict[str, Level] = {}
    origin: dict[str, str] = {}
    for path in files:
        try:
            document = parse_document(read_document(path), str(path))
        except PolicyError as exc:
            problems += exc.problems
            continue
        domain, level = _read_file(document)
        if domain is not None and domain in domains:
            document.problem(("domain",), f"domain {domain!r} is already defined in {origin[domain]}")
        elif domain is not None:
            domains[domain], origin[domain] = level, str(path)
        problems += document.problems
    if problems:
        raise PolicyError(problems)
    return DescriptorConfigs(domains)


def _read_file(document: Document) -> tuple[str | None, Level]:
    fields = Fields(document)
    root = fields.mapping(document.root, (), required=("domain",), optional=("descriptors",)) or {}
    domain = fields.string(root["domain"], ("domain",)) if "domain" in root else None
    names: set[str] = set()
    level = _level(fields, root.get("descriptors"), ("descriptors",), names)
    _check_replaces(fields, level, ("descriptors",), names)
    return domain, level


def _level(fields: Fields, value: object, path: FieldPath, names: set[str]) -> Level:
    level = Level()
    optional = ("value", "rate_limit", "shadow_mode", "detailed_metric", "descriptors")
    for item, item_path in fields.items(value, path):
        raw = fields.mapping(item, item_path, required=("key",), optional=optional)
        if raw is None or "key" not in raw:
            continue
        key = fields.string(raw["key"], (*item_path, "key"))
        entry_value = raw.get("value")
        text = None if entry_value is None else str(entry_value)
        shadow = fields.boolean(raw.get("shadow_mode", False), (*item_path, "shadow_mode")) or False
        fields.boolean(raw.get("detailed_metric", False), (*item_path, "detailed_metric"))
        node = Node(children=_level(fields, raw.get("descriptors"), (*item_path, "descriptors"), names))
        if "rate_limit" in raw:
            _rate_limit(fields, raw["rate_limit"], (*item_path, "rate_limit"), node, shadow, names)
        if key is None:
            continue
        if text is None:
            table, slot = level.any_value, key
        elif text.endswith("*"):
            level.wildcards.append((key, text[:-1], node))
            continue
        else:
            table, slot = level.exact, f"{key}_{text}"
        if slot in table:
            fields.problem(item_path, f"duplicate descriptor {slot!r} at this level")
        table[slot] = node
    return level


def _rate_limit(
    fields: Fields, value: object, path: FieldPath, node: Node, shadow: bool, names: set[str]
) -> None:
    raw = (
        fields.mapping(value, path, optional=("unit", "requests_per_unit", "unlimited", "name", "replaces"))
        or {}
    )
    name = fields.string(raw["name"], (*path, "name")) if "name" in raw else None
    replaces = []
    for item, item_path in fields.items(raw.get("replaces"), (*path, "replaces")):
        entry = fields.mapping(item, item_path, required=("name",)) or {}
        replaced = fields.string(entry["name"], (*item_path, "name")) if "name" in entry else None
        if replaced is not None:
            replaces.append(replaced)
    node.replaces = frozenset(replaces)
    if fields.boolean(raw.get("unlimited", False), (*path, "unlimited")):
        if "unit" in raw or "requests_per_unit" in raw:
            fields.problem(path, "an unlimited rate_limit takes no unit or requests_per_unit")
        node.unlimited = True
        return
    for required in ("unit", "requests_per_unit"):
        if required not in raw:
            fields.problem(path, f"missing required field '{required}'")
    if "unit" not in raw or "requests_per_unit" not in raw:
        return
    unit = raw["unit"].lower() if isinstance(raw["unit"], str) else raw["unit"]
    period = fields.choice(unit, (*path, "unit"), UNITS)
    requests = fields.integer(raw["requests_per_unit"], (*path, "requests_per_unit"))
    if period is None or requests is None:
        return
    if name is not None:
        names.add(name)
    node.limit = RateLimit(requests, period, name=name or f"{requests}/{period}", shadow=shadow)


def _check_replaces(fields: Fields, level: Level, path: FieldPath, names: set[str]) -> None:
    for node in (*level.exact.values(), *level.any_value.values(), *(node for _, _, node in level.wildcards)):
        for replaced in sorted(node.replaces - names):
            fields.problem(path, f"replaces {replaced!r}, but no rate_limit in this domain is named so")
        _check_replaces(fields, node.children, path, names)


class DescriptorConfigHolder:
    """The active configuration of a directory; replaced whole, never mutated."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loaded = directory_fingerprint(directory)
        self.current = load_descriptor_configs(directory)
        self.rejected_versions = 0


def directory_fingerprint(directory: Path) -> tuple[object, ...]:
    try:
        resolved = os.path.realpath(directory)
        entries = sorted(os.scandir(resolved), key=lambda entry: entry.name)
        return (resolved, *((e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size) for e in entries))
    except OSError:
        return ()


async def watch_descriptor_configs(holder: DescriptorConfigHolder, interval: float) -> None:
    """Reload the directory when any file in it changes; a bad version is logged and kept out."""
    while True:
        await asyncio.sleep(interval)
        current = directory_fingerprint(holder.directory)
        if not current or current == holder.loaded:
            continue
        holder.loaded = current
        configs = await load_off_loop(load_descriptor_configs, holder.directory, log)
        if configs is None:
            holder.rejected_versions += 1
            continue
        holder.current = configs
        log.info("rate-limit configuration reloaded: %d domains", len(configs.domains))
