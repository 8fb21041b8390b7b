"""Read a policy file into a CompiledPolicy, or fail with every problem it has."""

from __future__ import annotations

from pathlib import Path

from meshtoll.errors import PolicyError, PolicyProblem
from meshtoll.policy.compiled import CompiledPolicy
from meshtoll.policy.document import parse_document
from meshtoll.policy.schema import build_policy


def load_policy(path: str | Path) -> CompiledPolicy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyProblem(str(path), None, "", f"cannot read: {exc}")]) from None
    return load_policy_text(text, str(path))


def load_policy_text(text: str, file: str) -> CompiledPolicy:
    document = parse_document(text, file)
    policy = build_policy(document)
    document.raise_if_problems()
    compiled = CompiledPolicy(policy, document)
    document.raise_if_problems()
    return compiled
