"""The tenant policy: load, validate, compile and hot-reload one YAML document."""

from meshtoll.policy.compiled import CompiledPolicy, CompiledTenant, PathMatcher
from meshtoll.policy.load import load_policy, load_policy_text

__all__ = ["CompiledPolicy", "CompiledTenant", "PathMatcher", "load_policy", "load_policy_text"]
