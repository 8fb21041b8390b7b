"""Read a policy file into a CompiledPolicy, or fail with every problem it has."""

from __future__ import annotations

from pathlib import Path

from meshtoll.policy.compiled import CompiledPolicy
from meshtoll.policy.document import parse_document
from meshtoll.policy.schema import build_policy
from meshtoll.policy.screening import read_document


def load_policy(path: str | Path) -> CompiledPolicy:
    """Raises PolicyError, located, for any content of the file whatsoever."""
    return load_policy_text(read_document(Path(path)), str(path))


def load_policy_text(text: str, file: str) -> CompiledPolicy:
    document = parse_document(text, file)
    policy = build_policy(document)
    document.raise_if_problems()
    compiled = CompiledPolicy(policy, document)
    document.raise_if_problems()
    return compiled
