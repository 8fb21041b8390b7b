"""envoyproxy/ratelimit configuration directories, read unchanged, and the active one.

Every `*.yaml`/`*.yml` file of a directory holds one `domain` and its `descriptors`, read
and matched as envoyproxy/ratelimit reads and matches them (descriptor_tree.py). Two files
of one domain are an error, unless domains are merged (its MERGE_DOMAIN_CONFIG).

Differences from envoyproxy/ratelimit (how requests are counted is strict.py's):
- A configuration problem is reported with file, line and field path, and a directory
  with any problem is rejected whole (the previous configuration stays active).
- Unknown fields are errors at the level where they appear (envoyproxy/ratelimit accepts any of its
  field names anywhere); a missing `requests_per_unit` is an error (envoyproxy/ratelimit reads 0 and
  refuses everything); a `replaces` naming no limit of the domain is an error (envoyproxy/ratelimit
  ignores it).
- Only `.yaml`/`.yml` files directly in the directory are read (envoyproxy/ratelimit's runtime reads
  every file below it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from meshtoll.envoyproxy_ratelimit.descriptor_tree import (
    DescriptorMatch,
    Level,
    dangling_replaces,
    limit_names,
    match,
    merge,
    read_domain,
)
from meshtoll.errors import PolicyError, PolicyProblem
from meshtoll.policy.document import parse_document
from meshtoll.policy.screening import read_document
from meshtoll.watched import Watched, directory_fingerprint

log = logging.getLogger("meshtoll.ratelimit.config")

UNLIMITED_REMAINING = 2**32 - 1  # what envoyproxy/ratelimit reports for `unlimited`


class DescriptorConfigs:
    def __init__(self, domains: dict[str, Level]) -> None:
        self.domains = domains

    def match(self, domain: str, entries: Sequence[tuple[str, str]]) -> DescriptorMatch | None:
        level = self.domains.get(domain)
        if level is None or not entries:
            return None
        return match(level, domain, entries)


def counter_key(domain: str, entries: Sequence[tuple[str, str]]) -> str:
    """envoyproxy/ratelimit's cache key less its window suffix: domain_key1_value1_key2_value2."""
    return "_".join([domain, *(f"{key}_{value}" for key, value in entries)])


def stats_key(domain: str, entries: Sequence[tuple[str, str]]) -> str:
    """envoyproxy/ratelimit's metric key of a limit Envoy sent: domain.key1_value1.key2."""
    return ".".join([domain, *(f"{key}_{value}" if value else key for key, value in entries)])


def resolve_replaces(matches: Sequence[DescriptorMatch | None]) -> list[DescriptorMatch | None]:
    """Drop every matched limit that another matched limit of the same request replaces."""
    replaced = frozenset().union(*(match.replaces for match in matches if match is not None))
    if not replaced:
        return list(matches)
    return [
        None if match is not None and match.limit is not None and match.limit.name in replaced else match
        for match in matches
    ]


def load_descriptor_configs(
    directory: Path, *, merge_domains: bool = False, ignore_dot_files: bool = False
) -> DescriptorConfigs:
    """`merge_domains`: MERGE_DOMAIN_CONFIG; `ignore_dot_files`: RUNTIME_IGNOREDOTFILES."""
    try:
        files = sorted(
            path
            for path in directory.iterdir()
            if path.suffix in (".yaml", ".yml")
            and path.is_file()
            and not (ignore_dot_files and path.name.startswith("."))
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
        domain, level = read_domain(document)
        if domain is None:
            pass
        elif domain not in domains:
            domains[domain], origin[domain] = level, str(path)
        elif not merge_domains:
            document.problem(("domain",), f"domain {domain!r} is already defined in {origin[domain]}")
        else:
            for key in merge(domains[domain], level):
                document.problem(("descriptors",), f"duplicate descriptor {key!r} at this level")
        problems += document.problems
    for domain, level in domains.items():
        for name in dangling_replaces(level, limit_names(level)):
            message = f"replaces {name!r}, but no rate_limit in this domain is named so"
            problems.append(PolicyProblem(origin[domain], None, "", message))
    if problems:
        raise PolicyError(problems)
    return DescriptorConfigs(domains)


class DescriptorConfigHolder(Watched[DescriptorConfigs]):
    """The active configuration of a directory."""

    def __init__(
        self, directory: Path, *, merge_domains: bool = False, ignore_dot_files: bool = False
    ) -> None:
        load = partial(
            load_descriptor_configs, merge_domains=merge_domains, ignore_dot_files=ignore_dot_files
        )
        super().__init__(
            directory,
            load,
            log=log,
            fingerprint=directory_fingerprint,
            describe=lambda configs: f"{len(configs.domains)} domains",
        )
