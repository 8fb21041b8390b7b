"""meshtoll's API key format: recognisable, with a checksum that refuses a typo at once."""

from __future__ import annotations

import hashlib

import pytest

from meshtoll.api_keys import checksum_fails, generate_key, key_hint
from meshtoll.authz.decide import decide
from meshtoll.authz.verdict import Allow, CheckRequest, Deny
from meshtoll.errors import PolicyError
from meshtoll.policy import CompiledPolicy, load_policy_text


def policy_with(key: str, prefix: str = "mt_live") -> CompiledPolicy:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return load_policy_text(
        f"auth: {{api_key_prefix: {prefix}}}\nplans: {{pro: {{}}}}\n"
        f"tenants: {{acme: {{plan: pro, api_keys: [{{id: a, sha256: {digest}}}]}}}}\n",
        "policy.yaml",
    )


def ask(policy: CompiledPolicy, key: str) -> Allow | Deny:
    return decide(CheckRequest("GET", "/v1/x", {"x-api-key": key}, "127.0.0.1"), policy, {}, 0.0)


def test_a_key_is_prefix_random_and_checksum_and_a_typo_fails_the_checksum() -> None:
    key = generate_key("acme_test")
    prefix, random, checksum = key[:9], key[10:42], key[43:]
    assert (prefix, key[9], key[42]) == ("acme_test", "_", "_")
    assert random.isalnum()
    assert len(checksum) == 8
    assert int(checksum, 16) >= 0
    assert not checksum_fails(key, "acme_test")
    for position in range(10, len(key)):
        changed = key[:position] + ("x" if key[position] != "x" else "y") + key[position + 1 :]
        assert checksum_fails(changed, "acme_test"), position
    assert key_hint(key, "acme_test") == key[:14] + "..."
    assert len({generate_key() for _ in range(1000)}) == 1000


def test_a_mistyped_key_of_the_policys_prefix_is_refused_and_other_keys_are_looked_up() -> None:
    key = generate_key("mt_live")
    policy = policy_with(key)
    assert isinstance(ask(policy, key), Allow)
    refused = ask(policy, key[:-1] + ("0" if key[-1] != "0" else "1"))
    assert isinstance(refused, Deny)
    assert (refused.status, refused.code) == (401, "invalid_api_key")
    # A hand-made key of another shape is still a key: the checksum rule is only for the prefix.
    assert isinstance(ask(policy_with("mt_live_handmade"), "mt_live_handmade"), Deny)
    assert isinstance(ask(policy_with("handmade-key"), "handmade-key"), Allow)


def test_the_prefix_is_checked_when_the_policy_loads() -> None:
    with pytest.raises(PolicyError) as caught:
        policy_with("k", prefix="Live-Keys")
    assert [str(problem) for problem in caught.value.problems] == [
        "policy.yaml:1 auth.api_key_prefix: 'Live-Keys' is not a key prefix: lower-case letters and "
        "digits, in up to three words joined by '_' (e.g. mt_live)"
    ]
