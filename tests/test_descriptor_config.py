"""envoyproxy/ratelimit configuration files, read unchanged: its README's examples, each with
the outcomes that README states, and strict validation."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from pathlib import Path

import pytest

from meshtoll.cli import main
from meshtoll.envoyproxy_ratelimit.config_files import (
    DescriptorConfigHolder,
    DescriptorConfigs,
    load_descriptor_configs,
    resolve_replaces,
)
from meshtoll.errors import PolicyError
from meshtoll.server.exported import export_ratelimit_config
from meshtoll.telemetry.metrics import Metrics
from tests.waiting import eventually_async


def configs(tmp_path: Path, *documents: str) -> DescriptorConfigs:
    tmp_path.mkdir(exist_ok=True)
    for index, document in enumerate(documents):
        (tmp_path / f"config{index}.yaml").write_text(textwrap.dedent(document))
    return load_descriptor_configs(tmp_path)


def limit_of(found: DescriptorConfigs, domain: str, *entries: tuple[str, str]) -> tuple[int, str] | None:
    match = found.match(domain, entries)
    if match is None or match.limit is None:
        return None
    return (match.limit.requests, match.limit.period)


def test_example_1_two_values_of_one_key(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: mongo_cps
        descriptors:
          - key: database
            value: users
            rate_limit: {unit: second, requests_per_unit: 500}
          - key: database
            value: default
            rate_limit: {unit: second, requests_per_unit: 500}
    """,
    )
    assert limit_of(found, "mongo_cps", ("database", "users")) == (500, "second")
    assert limit_of(found, "mongo_cps", ("database", "default")) == (500, "second")
    assert found.match("mongo_cps", [("database", "other")]) is None


def test_example_2_nested_descriptors_and_a_key_without_value(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: messaging
        descriptors:
          - key: message_type
            value: marketing
            descriptors:
              - key: to_number
                rate_limit: {unit: day, requests_per_unit: 5}
          - key: to_number
            rate_limit: {unit: day, requests_per_unit: 100}
    """,
    )
    marketing = [("message_type", "marketing"), ("to_number", "2061111111")]
    assert limit_of(found, "messaging", *marketing) == (5, "day")
    assert limit_of(found, "messaging", ("to_number", "2061111111")) == (100, "day")
    # Each phone number gets a counter of its own: the key carries the request's value.
    first = found.match("messaging", marketing)
    second = found.match("messaging", [("message_type", "marketing"), ("to_number", "2062222222")])
    assert first is not None
    assert second is not None
    assert first.key == "messaging_message_type_marketing_to_number_2061111111"
    assert first.key != second.key
    # The placeholder level alone has no limit.
    assert found.match("messaging", [("message_type", "marketing")]) is None


def test_example_3_the_most_specific_match_wins_and_zero_bans(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: edge_proxy_per_ip
        descriptors:
          - key: remote_address
            rate_limit: {unit: second, requests_per_unit: 10}
          - key: remote_address
            value: 50.0.0.5
            rate_limit: {unit: second, requests_per_unit: 0}
    """,
    )
    assert limit_of(found, "edge_proxy_per_ip", ("remote_address", "50.0.0.1")) == (10, "second")
    assert limit_of(found, "edge_proxy_per_ip", ("remote_address", "50.0.0.5")) == (0, "second")


def test_example_4_a_request_must_match_the_configured_depth(tmp_path: Path) -> None:
    request = [("key", "value"), ("subkey", "subvalue")]
    flat = configs(
        tmp_path / "flat",
        """
        domain: example4
        descriptors:
          - key: key
            value: value
            rate_limit: {requests_per_unit: 300, unit: second}
    """,
    )
    assert flat.match("example4", request) is None
    nested = configs(
        tmp_path / "nested",
        """
        domain: example4
        descriptors:
          - key: key
            value: value
            descriptors:
              - key: subkey
                rate_limit: {requests_per_unit: 300, unit: second}
    """,
    )
    assert limit_of(nested, "example4", *request) == (300, "second")


def test_example_5_unlimited_is_matched_but_never_counted(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: internal
        descriptors:
          - key: ldap
            rate_limit: {unlimited: true}
          - key: azure
            rate_limit: {unit: minute, requests_per_unit: 100}
    """,
    )
    ldap = found.match("internal", [("ldap", "x")])
    assert ldap is not None
    assert ldap.limit is None
    assert limit_of(found, "internal", ("azure", "x")) == (100, "minute")


def test_example_6_shadow_mode_per_descriptor(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example6
        descriptors:
          - key: service
            descriptors:
              - key: user
                value: user-a
                rate_limit: {requests_per_unit: 10, unit: second}
                shadow_mode: true
              - key: user
                value: user-b
                rate_limit: {requests_per_unit: 20, unit: second}
    """,
    )
    user_a = found.match("example6", [("service", "auth-service"), ("user", "user-a")])
    user_b = found.match("example6", [("service", "auth-service"), ("user", "user-b")])
    assert user_a is not None
    assert user_a.limit is not None
    assert user_a.limit.shadow
    assert user_b is not None
    assert user_b.limit is not None
    assert not user_b.limit.shadow


def test_example_7_replaces_drops_the_named_limit_for_that_request(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example7
        descriptors:
          - key: key_1
            value: value_1
            descriptors:
              - key: user
                value: bkthomps
                rate_limit: {name: specific_limit, requests_per_unit: 5, unit: second}
          - key: key_2
            value: value_2
            descriptors:
              - key: user
                value: bkthomps
                rate_limit:
                  replaces: [{name: specific_limit}]
                  requests_per_unit: 10
                  unit: second
    """,
    )
    one = found.match("example7", [("key_1", "value_1"), ("user", "bkthomps")])
    two = found.match("example7", [("key_2", "value_2"), ("user", "bkthomps")])
    assert resolve_replaces([one])[0] == one  # alone: 5 / sec
    assert resolve_replaces([two])[0] == two  # alone: 10 / sec
    kept = resolve_replaces([one, two])  # together: only the 10 / sec applies
    assert kept == [None, two]


def test_example_8_detailed_metric_is_accepted(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example8
        descriptors:
          - key: key1
            detailed_metric: true
            rate_limit: {unit: minute, requests_per_unit: 10}
          - key: key1
            value: value1
            rate_limit: {unit: minute, requests_per_unit: 20}
    """,
    )
    assert limit_of(found, "example8", ("key1", "unspecified_value")) == (10, "minute")
    assert limit_of(found, "example8", ("key1", "value1")) == (20, "minute")


def test_example_9_wildcard_values(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example9
        descriptors:
          - key: key1
            value: value*
            rate_limit: {unit: minute, requests_per_unit: 20}
    """,
    )
    assert limit_of(found, "example9", ("key1", "value_1")) == (20, "minute")
    assert limit_of(found, "example9", ("key1", "value_2")) == (20, "minute")
    assert found.match("example9", [("key1", "other")]) is None


def test_example_9_wildcards_in_the_middle_and_several(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example9
        descriptors:
          - key: path
            value: /api/*/action
            rate_limit: {unit: minute, requests_per_unit: 20}
          - key: route
            value: /api/*/resource/*/action
            rate_limit: {unit: minute, requests_per_unit: 20}
    """,
    )
    for entry in [
        ("path", "/api/123/action"),
        ("path", "/api/user-id/action"),
        ("route", "/api/v2/resource/456/action"),
    ]:
        assert limit_of(found, "example9", entry) == (20, "minute")
    assert found.match("example9", [("path", "/api/123/other")]) is None


def test_example_10_value_to_metric_names_the_runtime_values(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example10
        descriptors:
          - key: route
            value_to_metric: true
            descriptors:
              - key: http_method
                value_to_metric: true
                descriptors:
                  - key: subject_id
                    rate_limit: {unit: minute, requests_per_unit: 60}
    """,
    )
    for (route, method, subject), metric in [
        (("api", "GET", "123"), "example10.route_api.http_method_GET.subject_id"),
        (("web", "POST", "456"), "example10.route_web.http_method_POST.subject_id"),
    ]:
        match = found.match("example10", [("route", route), ("http_method", method), ("subject_id", subject)])
        assert match is not None
        assert match.stats_key == metric


def test_example_11_share_threshold_counts_a_wildcard_once(tmp_path: Path) -> None:
    found = configs(
        tmp_path,
        """
        domain: example11
        descriptors:
          - key: files
            value: files/*
            share_threshold: true
            rate_limit: {unit: hour, requests_per_unit: 10}
          - key: files_no_share
            value: files_no_share/*
            share_threshold: false
            rate_limit: {unit: hour, requests_per_unit: 10}
    """,
    )
    shared = {found.match("example11", [("files", f"files/{name}")]) for name in ("a.pdf", "b.csv", "c.txt")}
    assert {match.key for match in shared if match is not None} == {"example11_files_files/*"}
    apart = {found.match("example11", [("files_no_share", f"files_no_share/{name}")]) for name in ("a", "b")}
    assert {match.key for match in apart if match is not None} == {
        "example11_files_no_share_files_no_share/a",
        "example11_files_no_share_files_no_share/b",
    }


def problems(tmp_path: Path, *documents: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        configs(tmp_path, *documents)
    return [str(problem) for problem in caught.value.problems]


def test_validation_names_file_line_and_field(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        domain: bad
        descriptors:
          - key: a
            rate_limit: {unit: fortnight, requests_per_unit: 5}
          - key: b
            colour: blue
          - key: c
            rate_limit: {unit: second}
    """,
    )
    file = tmp_path / "config0.yaml"
    assert found == [
        f"{file}:5 descriptors[0].rate_limit.unit: expected one of second, minute, hour, day, week, month, year, got 'fortnight'",
        f"{file}:7 descriptors[1].colour: unknown field (expected one of: key, value, rate_limit, shadow_mode, "
        "quota_mode, detailed_metric, value_to_metric, share_threshold, metadata, descriptors)",
        f"{file}:9 descriptors[2].rate_limit: missing required field 'requests_per_unit'",
    ]


def test_duplicate_domains_and_dangling_replaces_are_rejected(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "domain: twice\ndescriptors: [{key: a, rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: ghost}]}}]\n",
        "domain: twice\n",
    )
    assert found == [
        f"{tmp_path / 'config1.yaml'}:1 domain: domain 'twice' is already defined in {tmp_path / 'config0.yaml'}",
        f"{tmp_path / 'config0.yaml'}: replaces 'ghost', but no rate_limit in this domain is named so",
    ]


async def test_a_bad_reload_keeps_the_previous_configuration(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1}}]\n"
    )
    holder = DescriptorConfigHolder(tmp_path)
    task = asyncio.create_task(holder.watch(0.02))
    try:
        (tmp_path / "b.yaml").write_text("domain: [not, a, string]\n")
        await eventually_async(
            lambda: holder.rejected_versions > 0, timeout=5, message="the bad b.yaml was never rejected"
        )
        assert holder.current.match("d", [("k", "v")]) is not None
        (tmp_path / "b.yaml").write_text(
            "domain: e\ndescriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: 2}}]\n"
        )
        await eventually_async(
            lambda: "e" in holder.current.domains, timeout=5, message="the good b.yaml never became active"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_key_that_is_not_a_string_is_located_not_a_traceback(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "domain: d\ndescriptors:\n  - key: k\n    0.25: x\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    )
    assert found == [
        f"{tmp_path / 'config0.yaml'}:4 descriptors[0][0.25]: key 0.25 is not a string: quote it"
    ]


@pytest.mark.parametrize(
    "content",
    [b"domain: d\x00\n", b"~: 1\n", b"domain: \xff\n", b"a: &a [*a]\ndomain: d\n", b"domain: d\n0.25: x\n"],
)
def test_hostile_files_are_refused_at_start_with_a_located_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(PolicyError) as caught:
        DescriptorConfigHolder(tmp_path)
    assert all(problem.file == str(tmp_path / "bad.yaml") for problem in caught.value.problems)
    assert all(problem.line is not None for problem in caught.value.problems)


async def test_hostile_reloads_are_counted_and_the_watcher_lives_on(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("domain: d\n")
    holder = DescriptorConfigHolder(tmp_path)
    metrics = Metrics()
    export_ratelimit_config(metrics, holder)
    task = asyncio.create_task(holder.watch(0.02))
    try:
        for count, content in enumerate([b"domain: d\n0.25: x\n", b"~: 1\n", b"domain: e\x00\n"], start=1):
            (tmp_path / "b.yaml").write_bytes(content)
            await eventually_async(
                lambda: holder.rejected_versions >= count,  # noqa: B023 (awaited before the loop moves on)
                timeout=5,
                message=f"hostile version {count} was never rejected",
            )
        (tmp_path / "b.yaml").write_text("domain: e\n")
        await eventually_async(
            lambda: "e" in holder.current.domains, timeout=5, message="the good b.yaml never became active"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert "meshtoll_ratelimit_config_rejected_reloads_total 3.0" in metrics.prometheus_text()


def test_serve_refuses_a_bad_configuration_before_any_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text("domain: d\n0.25: x\n")
    policy = Path(__file__).parent.parent / "examples" / "policy.yaml"
    arguments = ["serve", "--policy", str(policy), "--ratelimit-config", str(tmp_path), "--workers", "2"]
    assert main(arguments) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.yaml'}:2 [0.25]: key 0.25 is not a string: quote it" in err
    assert "Traceback" not in err
