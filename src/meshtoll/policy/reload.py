"""Hot reload of the policy file: each new version that validates is swapped in whole
(meshtoll.watched). Decisions read `PolicyHolder.current` once and keep that object."""

from __future__ import annotations

import logging
from pathlib import Path

from meshtoll.policy.compiled import CompiledPolicy
from meshtoll.policy.load import load_policy
from meshtoll.watched import Watched, file_fingerprint

log = logging.getLogger("meshtoll.policy")


class PolicyHolder(Watched[CompiledPolicy]):
    """The active policy."""

    @classmethod
    def from_file(cls, path: Path) -> PolicyHolder:
        """Raises PolicyError, with every problem located, when the file is invalid."""
        return cls(
            path,
            load_policy,
            log=log,
            fingerprint=file_fingerprint,
            describe=lambda policy: f"{len(policy.tenants)} tenants",
        )
