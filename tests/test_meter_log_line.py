"""The meter's line from Envoy's OpenTelemetry access logger: read back field by field, and
anything out of shape (forged, truncated, another format, numbers that are not numbers) is
refused as malformed, never read into a neighbouring field."""

from __future__ import annotations

import pytest

from meshtoll.errors import MalformedLine
from meshtoll.meter.log_line import LOG_LINE_FORMAT, parse_log_line
from meshtoll.render.local_filters import LocalFilters

REQUEST_ID = "e9c7d676-1666-43b8-8ced-4df205e0199d"
LINE = f"mt1 1795618437.250 200 200 40 90 300 12345 {REQUEST_ID} acme"


def test_a_line_becomes_an_observation_with_every_field() -> None:
    # (request id, tenant, status, request bytes, response bytes, duration ms)
    assert parse_log_line(LINE) == (REQUEST_ID, "acme", 200, 240, 390, 12.345)


def test_the_local_envoy_formats_exactly_the_line_the_meter_reads() -> None:
    (logger,) = LocalFilters.load().connection_manager("full")["access_log"]
    assert logger["name"] == "envoy.access_loggers.open_telemetry"
    assert logger["typed_config"]["body"]["string_value"] == LOG_LINE_FORMAT


@pytest.mark.parametrize("absent", [f"{REQUEST_ID} -", "- acme", "- -"])
def test_a_refused_request_or_one_without_a_request_id_is_not_metered(absent: str) -> None:
    assert parse_log_line(f"mt1 1795618437.250 401 200 0 90 60 800 {absent}") is None


def test_a_request_envoy_failed_itself_is_observed_by_its_request_id_without_a_tenant() -> None:
    seen = parse_log_line(f"mt1 1795618437.250 503 200 0 90 60 250000 {REQUEST_ID} -")
    assert seen == (REQUEST_ID, "", 503, 200, 150, 250.0)


def test_a_response_envoy_never_finished_has_no_duration() -> None:
    seen = parse_log_line(f"mt1 1795618437.250 0 200 0 0 0 - {REQUEST_ID} acme")
    assert seen is not None
    assert (seen[2], seen[5]) == (0, 0.0)


def test_numbers_beyond_the_table_are_read_in_full() -> None:
    seen = parse_log_line(
        f"mt1 1795618437.250 200 18446744073709551615 1 65536 0200 9999999 {REQUEST_ID} acme"
    )
    assert seen == (REQUEST_ID, "acme", 200, 2**64, 65736, 9999.999)


@pytest.mark.parametrize("start", ["nan", "inf", "1e300", "-", "9" * 5000, "yesterday"])
def test_the_start_time_is_not_read(start: str) -> None:
    # A record bills at its admission's time: the line's own clock decides nothing.
    assert parse_log_line(LINE.replace("1795618437.250", start, 1)) == parse_log_line(LINE)


def test_a_space_in_the_tenant_stays_in_the_tenant_and_moves_no_field() -> None:
    seen = parse_log_line(f"mt1 1795618437.250 200 200 40 90 300 12345 {REQUEST_ID} acme 500 0 0")
    assert seen is not None
    assert seen[1:5] == ("acme 500 0 0", 200, 240, 390)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "-",
        "mt1",
        LINE.replace("mt1", "mt2", 1),  # a later format this meshtoll does not know
        LINE.replace("mt1 ", "", 1),
        " " + LINE,
        LINE.replace(" 200 200 ", " 200  200 ", 1),  # an empty field shifts the rest
        LINE.replace(" 12345 ", " ", 1),  # a field missing
        LINE.replace(" 200 200 ", " OK 200 ", 1),
        LINE.replace(" 200 200 ", " -200 200 ", 1),
        LINE.replace(" 200 200 ", " 1000 200 ", 1),
        LINE.replace(" 200 40 ", " -200 40 ", 1),  # each size is checked on its own
        LINE.replace(" 40 ", " -40 ", 1),
        LINE.replace(" 90 ", " -90 ", 1),
        LINE.replace(" 300 ", " -300 ", 1),
        LINE.replace(" 12345 ", " -1 ", 1),
        LINE.replace(" 300 ", " \u0663\u0660\u0660 ", 1),  # Arabic-Indic digits: int() reads them
        LINE.replace(" 300 ", " +300 ", 1),  # int() reads these too; Envoy never writes them
        LINE.replace(" 300 ", " 3_00 ", 1),
        LINE.replace(" 300 ", " 0x12c ", 1),
        LINE.replace(" 300 ", " 300.0 ", 1),
        LINE.replace(" 300 ", " - ", 1),  # only the duration may be absent
        LINE.replace(" 300 ", " 123456789012345678901 ", 1),  # 21 digits: more than a uint64's
        LINE.replace(" 300 ", " " + "9" * 5000 + " ", 1),
        LINE.replace(" 12345 ", " 12e3 ", 1),
        LINE.replace("acme", "acm\u00e9", 1),
        LINE.replace("acme", "a" * 129, 1),
        LINE.replace(REQUEST_ID, "r" * 129, 1),
        f"mt1 1795618437.250 200 200 40 90 300 12345 {REQUEST_ID} ",  # an empty tenant
        f"mt1 1795618437.250 OK 200 40 90 300 12345 {REQUEST_ID} -",
        f"mt1 1795618437.250 503 200 40 90 -300 12345 {REQUEST_ID} -",
        '{"request_id": "r", "tenant": "acme"}',  # Istio's JSON format
    ],
)
def test_a_line_out_of_shape_is_malformed(line: str) -> None:
    with pytest.raises(MalformedLine):
        parse_log_line(line)
