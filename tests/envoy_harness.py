"""The Envoy every through-Envoy test runs: the project's own configuration, with more time
for each call Envoy makes to meshtoll, and nothing else changed.

The shipped configuration gives meshtoll 0.25 s a call (0.5 s for ext_authz over gRPC) and
answers 503 itself past that. On a loaded 2-core machine (CI runs the whole suite on one) a
decision sometimes takes longer, and a test about a 200 or a 429 failed by chance. So the
tests raise those deadlines to TEST_CALL_TIMEOUT, on the parsed bootstrap by field path, and
fail loudly when a filter that calls meshtoll has no deadline where this module expects one
(a renamed field must not leave the shipped 0.25 s in place unnoticed). A test whose subject
is the deadline itself, or what Envoy does when it passes, asks for the shipped one
(`shipped_timeouts=True`); tests/test_shipped_timeouts.py pins the shipped values.

Every Envoy a test starts comes from here: `local_stack` for the local stack, `envoy_process`
for a bootstrap a test assembles (tests/test_shipped_timeouts.py checks that no test module
builds one otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshtoll.local.devstack import LocalStack, StackConfig
from meshtoll.local.envoy_process import EnvoyProcess

# Well above any decision a loaded machine has been seen to take (about 0.3 s), and no more
# than the test client's own timeout (tests/client.py), so a meshtoll that hangs still fails
# a test within seconds.
TEST_CALL_TIMEOUT = "5s"


@dataclass(frozen=True, slots=True)
class CallingFilter:
    """An Envoy filter that calls meshtoll once per request (or per message), and the fields
    holding that call's deadline: one field path per way the filter can reach meshtoll, of
    which a configuration uses the one whose first field it has."""

    type_url: str
    deadlines: tuple[tuple[str, ...], ...]


# By filter name. The access loggers are not here: Envoy streams their records, never times a
# call out, and their flush interval only delays what a test waits for with a deadline.
CALLING_FILTERS = {
    "envoy.filters.http.ext_authz": CallingFilter(
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        (("http_service", "server_uri", "timeout"), ("grpc_service", "timeout")),
    ),
    "envoy.filters.http.ratelimit": CallingFilter(
        "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit", (("timeout",),)
    ),
    "envoy.filters.http.ext_proc": CallingFilter(
        "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        (("message_timeout",),),
    ),
}


class UnexpectedEnvoyConfig(LookupError):
    """A filter that calls meshtoll, without a deadline where CALLING_FILTERS expects one."""


@dataclass(frozen=True, slots=True)
class CallDeadline:
    """One deadline in a configuration: `fields` inside the filter configuration `config`,
    found at `where` (list items named by their `name` where they have one)."""

    filter_name: str
    where: str
    fields: tuple[str, ...]
    config: dict[str, Any]

    @property
    def value(self) -> Any:
        return self._holder()[self.fields[-1]]

    def replace(self, value: str) -> None:
        self._holder()[self.fields[-1]] = value

    def _holder(self) -> dict[str, Any]:
        holder = self.config
        for name in self.fields[:-1]:
            holder = holder[name]
        return holder


def call_deadlines(document: object) -> list[CallDeadline]:
    """Every deadline of a call to meshtoll in `document` (a bootstrap, an EnvoyFilter or a
    fragment of either), wherever the filter sits: in a connection manager's http_filters,
    inside an ExtensionWithMatcher or a composite filter's action, in an EnvoyFilter's patch."""
    return list(_deadlines(document, ""))


def _deadlines(node: object, where: str) -> Iterator[CallDeadline]:
    if isinstance(node, list):
        for index, item in enumerate(node):
            label = item.get("name", index) if isinstance(item, dict) else index
            yield from _deadlines(item, f"{where}[{label}]")
        return
    if not isinstance(node, dict):
        return
    calling = CALLING_FILTERS.get(node.get("name", ""))
    if calling is not None and "typed_config" in node:
        yield _deadline(node["name"], calling, node["typed_config"], f"{where}.typed_config")
    for key, value in node.items():
        yield from _deadlines(value, f"{where}.{key}" if where else key)


def _deadline(name: str, calling: CallingFilter, config: dict[str, Any], where: str) -> CallDeadline:
    found_type = config.get("@type")
    if found_type != calling.type_url:
        raise UnexpectedEnvoyConfig(f"{where}: {name} has @type {found_type!r}, expected {calling.type_url}")
    used = [fields for fields in calling.deadlines if fields[0] in config]
    if len(used) != 1:
        expected = " or ".join(".".join(fields) for fields in calling.deadlines)
        raise UnexpectedEnvoyConfig(f"{where}: {name} has no deadline for its call at {expected}")
    (fields,) = used
    holder = config
    for depth, field in enumerate(fields):
        if not isinstance(holder, dict) or field not in holder:
            raise UnexpectedEnvoyConfig(f"{where}: {name} has no {'.'.join(fields[: depth + 1])}")
        holder = holder[field]
    return CallDeadline(name, where, fields, config)


def deadlines_by_kind(*documents: object) -> dict[str, set[str]]:
    """Each kind of deadline in `documents` ("ext_authz grpc_service.timeout", ...) -> the
    values it has there."""
    found: dict[str, set[str]] = defaultdict(set)
    for document in documents:
        for deadline in call_deadlines(document):
            kind = deadline.filter_name.rsplit(".", 1)[1]
            found[f"{kind} {'.'.join(deadline.fields)}"].add(deadline.value)
    return dict(found)


def with_test_timeouts(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """A copy of `bootstrap` whose every call to meshtoll may take TEST_CALL_TIMEOUT."""
    raised = copy.deepcopy(bootstrap)
    deadlines = call_deadlines(raised)
    if not deadlines:
        raise UnexpectedEnvoyConfig(f"no filter calls meshtoll here (none of {', '.join(CALLING_FILTERS)})")
    for deadline in deadlines:
        deadline.replace(TEST_CALL_TIMEOUT)
    return raised


def local_stack(config: StackConfig, *, shipped_timeouts: bool = False) -> LocalStack:
    """The local stack of `config`, its Envoy with test timeouts unless `shipped_timeouts`."""
    if shipped_timeouts:
        return LocalStack(config)
    return LocalStack(dataclasses.replace(config, edit_envoy_bootstrap=with_test_timeouts))


def envoy_process(
    name: str,
    bootstrap: dict[str, Any],
    work_dir: Path,
    *,
    binary: Path,
    more_args: Sequence[str] = (),
    shipped_timeouts: bool = False,
) -> EnvoyProcess:
    """An Envoy running `bootstrap` with test timeouts (see EnvoyProcess), unless
    `shipped_timeouts` (also for a bootstrap whose one call to meshtoll is an access logger:
    it has no deadline to raise)."""
    text = yaml.safe_dump(bootstrap if shipped_timeouts else with_test_timeouts(bootstrap), sort_keys=False)
    return EnvoyProcess(name, text, work_dir, binary=binary, more_args=more_args)
