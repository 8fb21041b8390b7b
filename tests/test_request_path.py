"""normalize_request_path: the path every policy route is matched against, with plain values."""

from __future__ import annotations

import time
import timeit

import pytest

from meshtoll.authz.request_path import (
    ABOVE_ROOT,
    BACKSLASH,
    BAD_ESCAPE,
    CONTROL_CHARACTER,
    ESCAPED_SEPARATOR,
    NOT_ORIGIN_FORM,
    PATH_PARAMETER,
    BadPath,
    double_encoded,
    normalize_request_path,
)


@pytest.mark.parametrize(
    "target",
    ["/", "/v1/status", "/v1/public/", "/v1/search?q=a/../b", "/v1/files/report.pdf", "/v1/a-b_c~d"],
)
def test_an_ordinary_path_is_returned_as_it_came_without_its_query(target: str) -> None:
    assert normalize_request_path(target) == target.partition("?")[0]


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/v1/public/../admin", "/v1/admin"),
        ("/v1/public/%2e%2e/admin", "/v1/admin"),
        ("/v1/public/%2E%2E/admin", "/v1/admin"),
        ("/v1/public/%2e./admin", "/v1/admin"),
        ("/v1/public/./../admin", "/v1/admin"),
        ("/v1/public/x/..", "/v1/public/"),
        ("/v1/public/.", "/v1/public/"),
        ("/v1//chat/completions?tokens=5000", "/v1/chat/completions"),
        ("//v1///chat//completions//", "/v1/chat/completions/"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
        ("/v1/%63hat/completions", "/v1/chat/completions"),
        ("/v1/%7Euser/%2D%5F", "/v1/~user/-_"),
        ("/v1/a%20b/%3b/%25", "/v1/a%20b/%3B/%25"),  # reserved and other escapes stay escaped
        ("/v1/%252e%252e/admin", "/v1/%252e%252e/admin"),  # decoded once, never twice
        ("/v1/caf%C3%A9", "/v1/caf%C3%A9"),
        ("/v1/status#fragment", "/v1/status"),
        ("/v1/.well-known/x", "/v1/.well-known/x"),
        ("/v1/a..b/...", "/v1/a..b/..."),
        ("/..", ABOVE_ROOT),
    ],
)
def test_dots_slashes_and_unreserved_escapes_are_resolved(target: str, path: str | BadPath) -> None:
    assert normalize_request_path(target) == path


@pytest.mark.parametrize(
    ("target", "refusal"),
    [
        ("/v1/public/..%2fadmin", ESCAPED_SEPARATOR),
        ("/v1/public/..%2Fadmin", ESCAPED_SEPARATOR),
        ("/v1/public/%2e%2e%2fadmin", ESCAPED_SEPARATOR),
        ("/v1/public/..%5cadmin", ESCAPED_SEPARATOR),
        ("/v1/public/..%5Cadmin", ESCAPED_SEPARATOR),
        ("/v1/public/..\\admin", BACKSLASH),
        ("/v1/public/..;/admin", PATH_PARAMETER),
        ("/v1/public;jsessionid=1/x", PATH_PARAMETER),
        ("/v1/public/%2e%2e;/admin", PATH_PARAMETER),
        ("/v1/public/../../../admin", ABOVE_ROOT),
        ("/../v1/status", ABOVE_ROOT),
        ("/v1/public/x%00", CONTROL_CHARACTER),
        ("/v1/public/x%0d%0a", CONTROL_CHARACTER),
        ("/v1/public/x\x00", CONTROL_CHARACTER),
        ("/v1/public/x\t", CONTROL_CHARACTER),
        ("/v1/public/x y", CONTROL_CHARACTER),
        ("/v1/public/caf\u00e9", CONTROL_CHARACTER),
        ("/v1/public/%zz", BAD_ESCAPE),
        ("/v1/public/%4", BAD_ESCAPE),
        ("/v1/public/%", BAD_ESCAPE),
        ("http://evil/v1/public/../admin", NOT_ORIGIN_FORM),
        ("*", NOT_ORIGIN_FORM),
        ("v1/status", NOT_ORIGIN_FORM),
        ("", NOT_ORIGIN_FORM),
    ],
)
def test_what_cannot_be_read_one_way_only_is_refused(target: str, refusal: BadPath) -> None:
    assert normalize_request_path(target) is refusal


def test_the_fast_path_costs_a_small_part_of_a_decision() -> None:
    # A decision costs about 11-18 µs of CPU; the normaliser must stay a small part of it.
    # Generous against slow CI machines: the measured cost is about 0.3-0.7 µs.
    calls = 20_000
    # CPU time of this process: a busy machine does not move it.
    timing = timeit.repeat(
        lambda: normalize_request_path("/v1/search?q=1"), number=calls, repeat=5, timer=time.process_time
    )
    best = min(timing)
    assert best / calls < 3e-6


@pytest.mark.parametrize(
    ("target", "double"),
    [
        ("/v1/public/%252e%252e/admin", True),
        ("/v1/public/%252E%252e/admin", True),
        ("/v1/files/100%2541", True),
        ("/v1/files/100%25", False),  # an escaped `%` with nothing to decode after it
        ("/v1/files/100%25zz", False),
        ("/v1/files/100%25%2541", True),  # the second one counts
        ("/v1/search?q=%2541", False),  # the query is not the path
        ("/v1/search", False),
    ],
)
def test_double_encoding_is_found_in_the_normalized_path(target: str, double: bool) -> None:
    path = normalize_request_path(target)
    assert isinstance(path, str)
    assert double_encoded(path) is double
