"""Loading, validating and compiling the tenant policy."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.errors import PolicyError
from meshtoll.policy import load_policy, load_policy_text
from meshtoll.policy.screening import MAX_DOCUMENT_BYTES

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.yaml"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "policy.yaml")
    return [str(problem) for problem in caught.value.problems]


def test_the_example_policy_loads_and_indexes_every_credential() -> None:
    policy = load_policy(EXAMPLE)
    assert set(policy.tenants) == {"acme", "globex", "initech"}
    assert policy.keys_by_sha256[bytes.fromhex(sha("mt_demo_acme_5f0c1e9a7b2d4e6f"))].tenant.name == "acme"
    assert policy.tenants_by_spiffe_id["spiffe://acme.test/ns/ci/sa/bot"].name == "acme"


@pytest.mark.parametrize(
    ("written", "meant"),
    [("true", "always"), ("false", "never"), ("near_limit", "near_limit"), ("always", "always")],
)
def test_ratelimit_headers_is_always_near_limit_or_never_and_the_old_booleans_still_load(
    written: str, meant: str
) -> None:
    policy = load_policy_text(f"ratelimit: {{headers: {written}}}\nplans: {{pro: {{}}}}\n", "policy.yaml")
    assert policy.policy.ratelimit.headers == meant


def test_an_unknown_ratelimit_headers_value_is_located() -> None:
    assert problems_of("ratelimit:\n  headers: sometimes\nplans: {pro: {}}\n") == [
        "policy.yaml:2 ratelimit.headers: expected one of always, near_limit, never, got 'sometimes'"
    ]


def test_a_bad_cidr_is_named_with_file_line_and_field_path() -> None:
    text = """\
plans:
  pro: {}
tenants:
  acme:
    plan: pro
    allow:
      ip:
        - 10.0.0.0/8
        - 10.0.0/8
"""
    assert problems_of(text) == ["policy.yaml:9 tenants.acme.allow.ip[1]: '10.0.0/8' is not a CIDR"]


def test_every_problem_is_reported_in_one_pass() -> None:
    text = """\
plans:
  free: {limits: [{requests: five, per: fortnight}]}
tenants:
  acme:
    plan: pro
    colour: blue
    api_keys: [{id: a, sha256: nothex}]
    status: sleeping
"""
    assert problems_of(text) == [
        "policy.yaml:2 plans.free.limits[0].requests: expected an integer >= 0, got 'five'",
        "policy.yaml:2 plans.free.limits[0].per: expected one of second, minute, hour, day, week, "
        "month, year, got 'fortnight'",
        "policy.yaml:6 tenants.acme.colour: unknown field (expected one of: plan, status, api_keys, "
        "jwt, mtls, allow, limits, billing)",
        "policy.yaml:5 tenants.acme.plan: unknown plan 'pro' (plans: free)",
        "policy.yaml:8 tenants.acme.status: expected one of active, suspended, got 'sleeping'",
        "policy.yaml:7 tenants.acme.api_keys[0].sha256: expected 64 lowercase hex digits (the SHA-256 of the key)",
    ]


def test_duplicate_key_hashes_across_tenants_are_rejected() -> None:
    digest = sha("same-key")
    text = f"""\
plans: {{free: {{}}}}
tenants:
  a: {{plan: free, api_keys: [{{id: one, sha256: {digest}}}]}}
  b:
    plan: free
    api_keys:
      - {{id: two, sha256: {digest}}}
"""
    assert problems_of(text) == [
        "policy.yaml:7 tenants.b.api_keys[0].sha256: duplicate key hash: already used by tenants.a key 'one'"
    ]


def test_yaml_syntax_errors_and_duplicate_mapping_keys_name_their_line() -> None:
    assert problems_of("plans:\n  free: [1\n") == [
        "policy.yaml:3: invalid YAML: did not find expected ',' or ']'"
    ]
    assert problems_of("plans: {}\nplans: {}\n") == ["policy.yaml:2 plans: duplicate key"]


def test_jwt_settings_refuse_symmetric_algorithms_and_need_one_key_source() -> None:
    text = """\
plans: {free: {}}
tenants:
  acme:
    plan: free
    jwt: {issuer: "https://id.acme.test", algorithms: [HS256]}
"""
    found = problems_of(text)
    assert found[0].startswith("policy.yaml:5 tenants.acme.jwt.algorithms[0]: 'HS256' is not allowed")
    assert found[1] == "policy.yaml:5 tenants.acme.jwt: exactly one of 'jwks' or 'jwks_uri' is required"


def test_tenants_sharing_an_issuer_must_say_which_claim_tells_them_apart() -> None:
    text = """\
plans: {free: {}}
tenants:
  a: {plan: free, jwt: {issuer: "https://idp.test", jwks_uri: "https://idp.test/jwks"}}
  b: {plan: free, jwt: {issuer: "https://idp.test", jwks_uri: "https://idp.test/jwks", match_claims: {org: b}}}
"""
    assert problems_of(text) == [
        "policy.yaml:3 tenants.a.jwt: issuer 'https://idp.test' is shared by 2 tenants: "
        "each of them needs 'match_claims' to tell its tokens apart"
    ]


def test_route_rules_need_a_leading_slash_and_real_methods() -> None:
    text = """\
plans: {free: {}}
tenants:
  acme: {plan: free, allow: {routes: [{prefix: v1, methods: [GET]}, {exact: /x, methods: [FETCH]}]}}
routes:
  - {prefix: /v1/, exact: /v1/x}
"""
    assert problems_of(text) == [
        "policy.yaml:3 tenants.acme.allow.routes[0].prefix: 'v1' must start with '/'",
        "policy.yaml:3 tenants.acme.allow.routes[1].methods[0]: 'FETCH' is not an HTTP method",
        "policy.yaml:5 routes[0]: exactly one of 'prefix' or 'exact' is required",
    ]


def test_policy_check_command_prints_problems_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("plans: {free: {}}\ntenants: {acme: {plan: gold}}\n")
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2 tenants.acme.plan: unknown plan 'gold' (plans: free)" in err


def test_policy_check_command_summarises_a_good_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == (f"{EXAMPLE}: ok (2 plans, 3 tenants, 3 API keys, 3 routes)")


def test_keys_new_prints_a_key_whose_hash_is_the_policy_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "new", "--tenant", "acme", "--id", "acme-ci"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].rsplit(" ", 1)[1]
    assert out[-1] == f"- {{id: acme-ci, sha256: {sha(key)}}}"


def test_a_policy_of_100000_tenants_loads_in_seconds() -> None:
    lines = ["plans: {free: {limits: [{requests: 5, per: second}]}}", "tenants:"]
    for index in range(100_000):
        lines.append(f"  t{index}:")
        lines.append("    plan: free")
        lines.append(f"    api_keys: [{{id: k{index}, sha256: {sha(str(index))}}}]")
    # This process's CPU time, not the wall clock's: other work on the machine cannot move it
    # (5 s of CPU on the shared 2-core machine: the bound catches a load gone quadratic).
    started = time.process_time()
    policy = load_policy_text("\n".join(lines), "big.yaml")
    elapsed = time.process_time() - started
    assert len(policy.tenants) == 100_000
    assert elapsed < 20, f"loading took {elapsed:.1f} s of CPU"


# Hostile input: whatever a file holds, loading it ends in a located PolicyError.

GOOD_HEAD = "plans: {free: {}}\ntenants:\n  acme: {plan: free}\n"


def test_a_nul_byte_is_refused_at_its_line_not_read_as_the_end_of_the_file() -> None:
    # yaml-rs stops at a NUL: the tenant after it (its revoked key, say) would silently vanish.
    text = GOOD_HEAD + "\x00\n  globex: {plan: free}\n"
    assert problems_of(text) == ["policy.yaml:4: control character U+0000 at column 1 is not allowed in YAML"]
    assert problems_of("plans: {free: {}}\ntenants: {a: {plan: \x00}}\n") == [
        "policy.yaml:2: control character U+0000 at column 21 is not allowed in YAML"
    ]


@pytest.mark.parametrize(
    ("escaped", "code"), [("\\x00", "0000"), ("\\u0007", "0007"), ("\\x7f", "007F"), ("\\n", "000A")]
)
def test_control_characters_written_as_escapes_are_refused_with_their_field(escaped: str, code: str) -> None:
    text = f'plans: {{free: {{}}}}\nroutes:\n  - {{prefix: "/v1/{escaped}"}}\n'
    [found] = problems_of(text)
    assert found.startswith(f"policy.yaml:3 routes[0].prefix: control character U+{code} in a string")


def test_keys_that_are_not_strings_are_named_with_their_line() -> None:
    assert problems_of("~: 1\n") == ["policy.yaml:1 [null]: key null is not a string: quote it"]
    assert problems_of(GOOD_HEAD + "0.25: x\n") == [
        "policy.yaml:4 [0.25]: key 0.25 is not a string: quote it"
    ]
    assert problems_of(GOOD_HEAD + "? [1, 2]\n: x\n") == [
        "policy.yaml:1 [(1, 2)]: key (1, 2) is not a string: quote it"
    ]


def test_an_integer_of_thousands_of_digits_is_refused_not_converted() -> None:
    limits = "plans: {free: {limits: [{requests: %s, per: second}]}}\n"
    [huge] = problems_of(limits % ("9" * 5000))
    assert huge.startswith("policy.yaml:1 plans.free.limits[0].requests: an integer of 16610 bits")
    assert problems_of("plans: {}\n" + "9" * 30 + ": x\n") == [
        "policy.yaml:2 [<an integer of 100 bits>]: key <an integer of 100 bits> is not a string: quote it"
    ]
    assert problems_of(limits % (2**60)) == [
        "policy.yaml:1 plans.free.limits[0].requests: expected an integer of at most 9007199254740991 (2**53 - 1)"
    ]


def test_values_yaml_reads_as_timestamps_or_sets_are_refused() -> None:
    [found] = problems_of("plans: {free: {}}\ntenants: {acme: {plan: free, jwt: {issuer: !!set {a}}}}\n")
    assert found.startswith("policy.yaml:2 tenants.acme.jwt.issuer: a YAML set value is not expected here")


def test_an_alias_bomb_is_refused_quickly_and_in_little_memory() -> None:
    # "Billion laughs": 9 levels of 9 aliases, 400 bytes that expand to 387 million strings.
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for level, name in enumerate("bcdefghi"):
        text += f"{name}: &{name} [" + ", ".join(["*" + "abcdefghi"[level]] * 9) + "]\n"
    text += "plans: {free: {}}\n"
    tracemalloc.start()
    started = time.process_time()  # CPU time: a busy machine does not move it
    try:
        found = problems_of(text)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.process_time() - started < 1
    assert peak < 20 * 2**20
    assert found == [
        "policy.yaml:2: invalid YAML: aliases expand to more than 100,000 YAML values: write the values out"
    ]


def test_a_few_aliases_still_share_a_value_and_problems_under_them_are_located() -> None:
    text = """\
plans:
  free: {limits: &basic [{requests: 5, per: second}]}
  pro: {limits: *basic}
tenants:
  acme: {plan: free, status: &state sleeping}
  globex: {plan: pro, status: *state}
"""
    assert problems_of(text) == [
        "policy.yaml:5 tenants.acme.status: expected one of active, suspended, got 'sleeping'",
        "policy.yaml:6 tenants.globex.status: expected one of active, suspended, got 'sleeping'",
    ]


def test_nesting_deeper_than_any_policy_needs_is_refused() -> None:
    [found] = problems_of("plans: {free: {}}\nroutes: " + "[" * 100 + "]" * 100 + "\n")
    assert found.startswith("policy.yaml:2 routes[0][0]")
    assert found.endswith("nested deeper than 64 levels")
    assert problems_of("[" * 10_000 + "]" * 10_000) == [
        "policy.yaml:1: invalid YAML: exceeded maximum nesting depth"
    ]


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(GOOD_HEAD.encode() + b"  glob\xffex: {plan: free}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value) == f"{path}:4: not UTF-8: byte 0xff at column 7"


def test_a_byte_order_mark_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_HEAD.encode())
    assert set(load_policy(path).tenants) == {"acme"}


def test_a_file_over_the_size_limit_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    with path.open("wb") as stream:
        stream.truncate(MAX_DOCUMENT_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value) == f"{path}: larger than 64 MiB: not read"


@pytest.mark.parametrize(
    "content",
    [b"plans: {free: {}}\x00\n", b"~: 1\n", b"a: " + b"9" * 5000 + b"\n", b"\xff\xfe", b"a: &a [*a]\n"],
)
def test_policy_check_refuses_hostile_files_with_exit_1_and_no_traceback(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_bytes(content)
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(str(bad))
    assert "Traceback" not in err


def test_a_second_yaml_document_in_the_file_is_refused_at_its_line() -> None:
    assert problems_of("plans: {free: {}}\n---\nplans: {pro: {}}\n") == [
        "policy.yaml:2: invalid YAML: expected one document, found another"
    ]


def test_locating_a_problem_in_a_large_policy_costs_memory_in_proportion() -> None:
    lines = ["plans: {free: {}}", "tenants:"]
    lines += [
        f"  t{index}: {{plan: free, api_keys: [{{id: k, sha256: {sha(str(index))}}}]}}"
        for index in range(20_000)
    ]
    lines.append("  late: {plan: gold}")
    tracemalloc.start()
    try:
        found = problems_of("\n".join(lines))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert found == ["policy.yaml:20003 tenants.late.plan: unknown plan 'gold' (plans: free)"]
    assert peak < 80 * 2**20  # 50 MiB for this 2 MiB text; PyYAML's node tree took 120 MiB


def test_a_fifo_or_a_directory_in_place_of_the_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(PolicyError) as caught:
            load_policy(path)
        assert str(caught.value) == f"{path}: not a regular file"


def test_a_routes_double_encoding_opt_out_is_a_boolean_named_where_it_is_wrong() -> None:
    text = "plans: {free: {}}\nroutes:\n  - {prefix: /v1/files/, allow_double_encoding: sometimes}\n"
    assert problems_of(text) == [
        "policy.yaml:3 routes[0].allow_double_encoding: expected true or false, got 'sometimes'"
    ]
    allowed = load_policy_text(text.replace("sometimes", "true"), "policy.yaml")
    assert [route.allow_double_encoding for route in allowed.policy.routes] == [True]
