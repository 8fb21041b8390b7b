"""envoyproxy/ratelimit's configuration cases (test/config/config_test.go), rewritten for
meshtoll's loader: envoyproxy/ratelimit's own files (tests/fixtures/ratelimit/config, see NOTICE.md)
load, match and fail as they do there. meshtoll's errors are worded its own way (file,
line, field path), so an invalid file is checked for where it points and what it says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshtoll.envoyproxy_ratelimit.config_files import DescriptorConfigs, load_descriptor_configs
from meshtoll.envoyproxy_ratelimit.descriptor_tree import DescriptorMatch
from meshtoll.errors import PolicyError

CONFIG = Path(__file__).parent / "fixtures" / "ratelimit" / "config"
EXAMPLES = Path(__file__).parent / "fixtures" / "ratelimit" / "examples"


def load(tmp_path: Path, *names: str, merge: bool = False) -> DescriptorConfigs:
    for n, name in enumerate(names):
        # Numbered: envoyproxy/ratelimit loads files in the order given, meshtoll in name order.
        shutil.copy(CONFIG / name, tmp_path / f"{n:02d}_{name}")
    return load_descriptor_configs(tmp_path, merge_domains=merge)


def limit_of(
    configs: DescriptorConfigs, *entries: tuple[str, str], domain: str = "test-domain"
) -> DescriptorMatch:
    found = configs.match(domain, entries)
    assert found is not None, entries
    return found


def requests_and_unit(found: DescriptorMatch | None) -> tuple[int, str] | None:
    if found is None or found.limit is None:
        return None
    return found.limit.requests, found.limit.period


def test_basic_config(tmp_path: Path) -> None:
    """TestBasicConfig."""
    configs = load(tmp_path, "basic_config.yaml")
    assert configs.match("foo_domain", ()) is None
    assert configs.match("test-domain", ()) is None
    for nothing in (
        [("key1", "something")],
        [("key1", "value1")],
        [("key2", "value2"), ("subkey", "subvalue")],
        [("key5", "value5"), ("subkey5", "subvalue")],
        [("key2", "value3")],
    ):
        assert configs.match("test-domain", nothing) is None, nothing
    cases = {
        (("key1", "value1"), ("subkey1", "something")): (5, "second"),
        (("key1", "value1"), ("subkey1", "subvalue1")): (10, "second"),
        (("key2", "something"),): (20, "minute"),
        (("key2", "value2"),): (30, "minute"),
        (("key3", "foo"),): (1, "hour"),
        (("key4", "foo"),): (1, "day"),
        (("key7", "unspecified_value"),): (70, "minute"),
        (("key7", "another_value"),): (70, "minute"),
    }
    for entries, expected in cases.items():
        assert requests_and_unit(configs.match("test-domain", entries)) == expected, entries
    key3, key4 = limit_of(configs, ("key3", "foo")), limit_of(configs, ("key4", "foo"))
    names = [None if found.limit is None else found.limit.name for found in (key3, key4)]
    assert names == ["", "key4_rate_limit"]  # no name in the file: none invented
    unlimited = limit_of(configs, ("key6", "foo"))
    assert unlimited.limit is None  # unlimited


def test_domain_merge(tmp_path: Path) -> None:
    """TestDomainMerge: MERGE_DOMAIN_CONFIG joins two files of one domain."""
    configs = load(tmp_path, "merge_domain_key1.yaml", "merge_domain_key2.yaml", merge=True)
    assert requests_and_unit(configs.match("test-domain", [("key1", "value1")])) == (10, "minute")
    assert requests_and_unit(configs.match("test-domain", [("key2", "value2")])) == (20, "minute")


def test_shadow_mode_config(tmp_path: Path) -> None:
    """TestShadowModeConfig."""
    configs = load(tmp_path, "shadowmode_config.yaml")
    shadows = {
        (("key1", "value1"), ("subkey1", "something")): False,
        (("key1", "value1"), ("subkey1", "subvalue1")): True,
        (("key2", "something"),): True,
        (("key2", "value2"),): False,
    }
    for entries, shadow in shadows.items():
        found = limit_of(configs, *entries).limit
        assert (found is not None, found and found.shadow) == (True, shadow), entries


def test_wildcard_config(tmp_path: Path) -> None:
    """TestWildcardConfig: a `*` anywhere in a value matches any run of characters."""
    configs = load(tmp_path, "wildcard.yaml")
    matching = [
        [("noVal", "foo1")],
        [("wild", "foo1")],
        [("wild", "foo2")],
        [("nestedWild", "val1"), ("wild", "goo2")],
        [("midWild", "barab")],
        [("midWild", "bar123b")],
        [("midWild", "barb")],
        [("multiWild", "foo123bar456baz")],
        [("multiWild", "foobarbaz")],
    ]
    for entries in matching:
        assert configs.match("test-domain", entries) is not None, entries
    for entries in (
        [("wild", "bar")],
        [("noWild", "foo1")],
        [("midWild", "bara")],
        [("midWild", "xbarb")],
        [("multiWild", "foo123baz")],
        [("multiWild", "bar456baz")],
    ):
        assert configs.match("test-domain", entries) is None, entries
    assert limit_of(configs, ("midWild", "barab")).limit == limit_of(configs, ("midWild", "bar123b")).limit
    # Each value keeps its own counter (no share_threshold).
    assert limit_of(configs, ("wild", "foo1")).key != limit_of(configs, ("wild", "foo2")).key


def test_share_threshold_values_of_a_wildcard_share_one_counter(tmp_path: Path) -> None:
    """TestShareThreshold: the counter key carries the pattern instead of the value."""
    configs = load(tmp_path, "share_threshold.yaml")
    keys = {limit_of(configs, ("files", f"files/{name}")).key for name in ("a.pdf", "b.csv", "c/d")}
    assert keys == {"test-domain_files_files/*"}
    nested = limit_of(configs, ("nested", "parent"), ("files", "nested/x"))
    assert nested.key == "test-domain_nested_parent_files_nested/*"
    same_key_twice = limit_of(configs, ("files", "top/1"), ("files", "nested/2"))
    assert (same_key_twice.key, requests_and_unit(same_key_twice)) == (
        "test-domain_files_top/*_files_nested/*",
        (300, "minute"),
    )
    mixed = limit_of(configs, ("path", "path/a"), ("file", "file/b"), ("type", "pdf"))
    assert mixed.key == "test-domain_path_path/*_file_file/b_type_pdf"
    # An explicit value wins over a wildcard, and keeps its own counter.
    explicit = limit_of(configs, ("file", "test1"))
    assert (explicit.key, requests_and_unit(explicit)) == ("test-domain_file_test1", (50, "minute"))
    assert limit_of(configs, ("file", "test2")).key == "test-domain_file_test*"
    assert limit_of(configs, ("midpath", "/api/v1")).key == "test-domain_midpath_/api*v1"
    assert configs.match("test-domain", [("midpath", "/api/v2")]) is None
    assert limit_of(configs, ("multiroute", "svcXepYrpc")).key == "test-domain_multiroute_svc*ep*rpc"
    both = limit_of(configs, ("tenant", "t1prod"), ("resource", "res9v2"))
    assert both.key == "test-domain_tenant_t*prod_resource_res*v2"


def test_metadata_is_returned_with_the_limit(tmp_path: Path) -> None:
    """TestMetadata."""
    configs = load(tmp_path, "metadata.yaml")
    assert limit_of(configs, ("key1", "value1"), ("subkey1", "something")).metadata == {"name": "service_1"}
    assert limit_of(configs, ("key2", "something")).metadata == {"service_with_quota": {"name": "service_2"}}
    assert limit_of(configs, ("key1", "value1"), ("subkey1", "subvalue1")).metadata is None


@pytest.mark.parametrize(
    ("files", "where", "says"),
    [
        (["empty_domain.yaml"], "empty_domain.yaml", "domain"),
        (
            ["basic_config.yaml", "duplicate_domain.yaml"],
            "duplicate_domain.yaml",
            "domain 'test-domain' is already",
        ),
        (["empty_key.yaml"], "empty_key.yaml:3 descriptors[0]", "'key'"),
        (["duplicate_key.yaml"], "duplicate_key.yaml:6 descriptors[1]", "duplicate descriptor 'key1_value1'"),
        (["bad_limit_unit.yaml"], "bad_limit_unit.yaml:6 descriptors[0].rate_limit.unit", "expected one of"),
        (["replaces_self.yaml"], "replaces_self.yaml:", "replaces its own name 'self'"),
        (["replaces_empty.yaml"], "replaces_empty.yaml:", "name"),
        (["bad_yaml.yaml"], "bad_yaml.yaml", ""),
        (["misspelled_key.yaml"], "misspelled_key.yaml:5 descriptors[0].ratelimit", "unknown field"),
        (
            ["misspelled_key2.yaml"],
            "misspelled_key2.yaml:7 descriptors[0].rate_limit.requestsperunit",
            "unknown field",
        ),
        (["non_string_key.yaml"], "non_string_key.yaml:", "0.25"),
        (["non_map_list.yaml"], "non_map_list.yaml:3 descriptors[0]", "mapping"),
        (["unlimited_with_unit.yaml"], "unlimited_with_unit.yaml:", "unit"),
    ],
)
def test_invalid_configs_are_rejected_with_where_and_why(
    tmp_path: Path, files: list[str], where: str, says: str
) -> None:
    """TestEmptyDomain ... TestUnlimitedWithRateLimitUnit: every file envoyproxy/ratelimit rejects."""
    with pytest.raises(PolicyError) as rejected:
        load(tmp_path, *files)
    text = str(rejected.value).replace(f"{tmp_path}/", "").replace("00_", "").replace("01_", "")
    assert where in text, text
    assert says in text, text


def test_a_duplicate_key_across_merged_files_is_rejected(tmp_path: Path) -> None:
    """TestDuplicateKeyDomainMerge."""
    shutil.copy(CONFIG / "merge_domain_key1.yaml", tmp_path / "a.yaml")
    shutil.copy(CONFIG / "merge_domain_key1.yaml", tmp_path / "b.yaml")
    with pytest.raises(PolicyError, match="duplicate descriptor 'key1_value1'"):
        load_descriptor_configs(tmp_path, merge_domains=True)


@pytest.mark.parametrize("directory", [EXAMPLES, CONFIG.parent / "integration" / "config"])
def test_the_peers_example_and_integration_configs_load_unchanged(directory: Path) -> None:
    assert load_descriptor_configs(directory).domains


VALUE_TO_METRIC = """
domain: domain
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors:
          - key: subject_id
            rate_limit: {unit: minute, requests_per_unit: 60}
          - key: detailed
            detailed_metric: true
            rate_limit: {unit: minute, requests_per_unit: 60}
  - key: k1
    descriptors:
      - key: k2
        value_to_metric: true
        descriptors:
          - key: k3
            rate_limit: {unit: second, requests_per_unit: 1}
      - key: plain
        rate_limit: {unit: second, requests_per_unit: 1}
  - key: user
    value_to_metric: true
    descriptors:
      - key: action
        value: read*
        value_to_metric: true
        descriptors:
          - key: resource
            rate_limit: {unit: minute, requests_per_unit: 5}
  - key: api
    descriptors:
      - key: method
        value: GET
        value_to_metric: true
        descriptors:
          - key: subject_id
            rate_limit: {unit: minute, requests_per_unit: 60}
  - key: key-1
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 100}
    descriptors:
      - key: key-2
        detailed_metric: true
        rate_limit: {unit: minute, requests_per_unit: 5}
"""


@pytest.mark.parametrize(
    ("entries", "metric"),
    [
        # TestValueToMetric_UsesRuntimeValuesInStats
        (
            [("route", "draw"), ("http_method", "GET"), ("subject_id", "123")],
            "domain.route_draw.http_method_GET.subject_id",
        ),
        # TestValueToMetric_DoesNotOverrideDetailedMetric
        (
            [("route", "draw"), ("http_method", "GET"), ("detailed", "123")],
            "domain.route_draw.http_method_GET.detailed_123",
        ),
        # TestValueToMetric_MidLevelOnly and _NoFlag_Unchanged
        ([("k1", "X"), ("k2", "Y"), ("k3", "Z")], "domain.k1.k2_Y.k3"),
        ([("k1", "X"), ("plain", "Y")], "domain.k1.plain"),
        # TestValueToMetric_WithWildcard: the runtime value, not the pattern
        (
            [("user", "alice"), ("action", "readfile"), ("resource", "documents")],
            "domain.user_alice.action_readfile.resource",
        ),
        # TestValueToMetric_WithConfiguredValues
        ([("api", "v1"), ("method", "GET"), ("subject_id", "u1")], "domain.api.method_GET.subject_id"),
        # TestValueToMetric_WithEmptyValue
        (
            [("route", ""), ("http_method", "GET"), ("subject_id", "123")],
            "domain.route.http_method_GET.subject_id",
        ),
        # TestDetailedMetric: nested detailed limits name every value
        ([("key-1", "value-1")], "domain.key-1_value-1"),
        ([("key-1", "value-1"), ("key-2", "value-2")], "domain.key-1_value-1.key-2_value-2"),
    ],
)
def test_metric_keys_of_value_to_metric_and_detailed_metric(
    tmp_path: Path, entries: list[tuple[str, str]], metric: str
) -> None:
    (tmp_path / "metrics.yaml").write_text(VALUE_TO_METRIC)
    assert limit_of(load_descriptor_configs(tmp_path), *entries, domain="domain").stats_key == metric


@pytest.mark.parametrize(
    ("entries", "metric"),
    [
        # Basic share_threshold: every value of the wildcard, one metric
        ([("files", "files/a.pdf")], "test-domain.files_files/*"),
        ([("files", "files/c.txt")], "test-domain.files_files/*"),
        # share_threshold with metrics: it wins over value_to_metric and detailed_metric
        ([("route", "api/v1"), ("method", "GET")], "test-domain.route_api/*.method"),
        ([("service", "svc/user"), ("endpoint", "get")], "test-domain.service_svc/*.endpoint_get"),
        # Nested wildcards
        ([("nested", "parent"), ("files", "nested/file1.txt")], "test-domain.nested_parent.files_nested/*"),
        (
            [("files", "top/file1.txt"), ("files", "nested/file1.txt")],
            "test-domain.files_top/*.files_nested/*",
        ),
        # a wildcard without share_threshold below one with it keeps the pattern too
        (
            [("path", "path/foo"), ("file", "file/doc1"), ("type", "pdf")],
            "test-domain.path_path/*.file_file/*.type",
        ),
        (
            [("user", "user/alice"), ("resource", "res/file1"), ("action", "read")],
            "test-domain.user_user/*.resource_res/*.action",
        ),
        # Explicit value precedence over wildcard
        ([("file", "test1")], "test-domain.file_test1"),
        ([("file", "test2")], "test-domain.file_test*"),
        ([("file", "test123")], "test-domain.file_test*"),
        # Middle and multi wildcards
        ([("midpath", "/api-beta-v1")], "test-domain.midpath_/api*v1"),
        ([("midpath", "/apiXYZv1")], "test-domain.midpath_/api*v1"),
        ([("multiroute", "svcXXXepYYYrpc")], "test-domain.multiroute_svc*ep*rpc"),
        ([("multiroute", "svceprpc")], "test-domain.multiroute_svc*ep*rpc"),
        # priority over value_to_metric with a middle wildcard
        ([("midroute", "/api/v2")], "test-domain.midroute_/api*v2"),
        ([("midroute", "/api-beta-v2")], "test-domain.midroute_/api*v2"),
        # nested middle wildcards
        ([("tenant", "t1prod"), ("resource", "resAv2")], "test-domain.tenant_t*prod.resource_res*v2"),
        ([("tenant", "t99prod"), ("resource", "resBBBv2")], "test-domain.tenant_t*prod.resource_res*v2"),
    ],
)
def test_share_threshold_metric_keys_name_the_pattern(
    tmp_path: Path, entries: list[tuple[str, str]], metric: str
) -> None:
    """TestShareThreshold's metric sub-tests (Stats.Key, which FullKey equals)."""
    assert limit_of(load(tmp_path, "share_threshold.yaml"), *entries).stats_key == metric


def test_share_threshold_values_outside_the_pattern_match_nothing(tmp_path: Path) -> None:
    configs = load(tmp_path, "share_threshold.yaml")
    assert configs.match("test-domain", [("midpath", "/api/v2")]) is None
    assert configs.match("test-domain", [("multiroute", "svcABCrpc")]) is None


@pytest.mark.parametrize(
    ("value", "flags", "sent", "metric"),
    [
        ("foo*", "", "foo1", "test-domain.wild_foo*"),
        ("foo*", "value_to_metric: true", "foo1", "test-domain.wild_foo1"),
        ("foo*", "share_threshold: true", "foo1", "test-domain.wild_foo*"),
        ("foo*", "share_threshold: true, value_to_metric: true", "foo1", "test-domain.wild_foo*"),
        ("foo*bar*", "", "foo123bar456", "test-domain.wild_foo*bar*"),
        ("foo*bar*", "", "fooXbarY", "test-domain.wild_foo*bar*"),
        ("foo*bar*", "value_to_metric: true", "foo123bar456", "test-domain.wild_foo123bar456"),
    ],
)
def test_wildcard_metric_keys_are_alike_wherever_the_star_is(
    tmp_path: Path, value: str, flags: str, sent: str, metric: str
) -> None:
    """TestWildcardStatsBehavior: trailing and middle wildcards, with no flag, value_to_metric,
    share_threshold, or both."""
    extra = f"{flags}, " if flags else ""
    (tmp_path / "wild.yaml").write_text(
        "domain: test-domain\ndescriptors:\n"
        f"  - {{key: wild, value: '{value}', {extra}rate_limit: {{unit: minute, requests_per_unit: 20}}}}\n"
    )
    assert limit_of(load_descriptor_configs(tmp_path), ("wild", sent)).stats_key == metric


def test_value_to_metric_elsewhere_keeps_a_wildcards_pattern(tmp_path: Path) -> None:
    """TestWildcardStatsBehavior: value_to_metric in other descriptor."""
    (tmp_path / "wild.yaml").write_text(
        """
domain: test-domain
descriptors:
  - key: wild
    value: foo*
    descriptors:
      - key: other
        value_to_metric: true
        descriptors:
          - key: limit
            rate_limit: {unit: minute, requests_per_unit: 20}
"""
    )
    found = limit_of(load_descriptor_configs(tmp_path), ("wild", "foo1"), ("other", "bar"), ("limit", "X"))
    assert found.stats_key == "test-domain.wild_foo*.other_bar.limit"
