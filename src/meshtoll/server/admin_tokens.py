"""Admin tokens by name and scope, from a YAML file (`--admin-tokens-file`):

    tokens:
      - {name: ops, scope: write, sha256: "<64 hex digits>"}
      - {name: dashboard, scope: read, sha256: "<64 hex digits>"}

Only each token's SHA-256 is written down (`meshtoll admin-token new` prints a token and its
line). The file is configuration like the policy: read with the policy's own readers, every
problem located (file, line, field path), watched, and a bad new version leaves the last good
one in place.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshtoll.policy.document import parse_document
from meshtoll.policy.fields import Fields
from meshtoll.policy.schema import name_problem
from meshtoll.policy.screening import read_document
from meshtoll.watched import Watched, file_fingerprint

log = logging.getLogger("meshtoll.admin")

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = ("read", "write")
# The name MESHTOLL_ADMIN_TOKEN's token goes by (a write token).
ENVIRONMENT_TOKEN_NAME = "admin"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str  # what the audit log records of whoever used it
    scope: Scope  # read: GET only; write: every change too


def load_admin_tokens(path: Path) -> dict[bytes, AdminToken]:
    """SHA-256 digest -> token. Raises PolicyError, located, for anything wrong in the file."""
    file = str(path)
    document = parse_document(read_document(path), file)
    fields = Fields(document)
    root = fields.mapping(document.root, (), required=("tokens",)) or {}
    tokens: dict[bytes, AdminToken] = {}
    names: set[str] = set()
    for item, item_path in fields.items(root.get("tokens"), ("tokens",)):
        raw = fields.mapping(item, item_path, required=("name", "scope", "sha256"))
        if raw is None or not {"name", "scope", "sha256"} <= set(raw):
            continue
        name = fields.string(raw["name"], (*item_path, "name"))
        scope = fields.choice(raw["scope"], (*item_path, "scope"), SCOPES)
        digest = raw["sha256"]
        if name is not None and (problem := name_problem(name)) is not None:
            fields.problem((*item_path, "name"), problem)
        elif name in names or name == ENVIRONMENT_TOKEN_NAME:
            taken = "MESHTOLL_ADMIN_TOKEN's" if name == ENVIRONMENT_TOKEN_NAME else "another token's"
            fields.problem((*item_path, "name"), f"{name!r} is {taken} name")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            fields.problem(
                (*item_path, "sha256"), "expected 64 lower-case hex digits (the SHA-256 of the token)"
            )
            continue
        if bytes.fromhex(digest) in tokens:
            fields.problem((*item_path, "sha256"), "the same token is listed twice")
        if name is not None and scope is not None:
            names.add(name)
            tokens[bytes.fromhex(digest)] = AdminToken(name, scope)
    document.raise_if_problems()
    return tokens


class AdminTokensHolder(Watched[dict[bytes, AdminToken]]):
    @classmethod
    def from_file(cls, path: Path) -> AdminTokensHolder:
        """Raises PolicyError, located, when the file is invalid."""
        return cls(
            path,
            load_admin_tokens,
            log=log,
            fingerprint=file_fingerprint,
            describe=lambda tokens: f"{len(tokens)} admin tokens",
        )
