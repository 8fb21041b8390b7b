"""The meter's access-log line: the one text body Envoy's OpenTelemetry access logger
formats per request (the `meter` logger in envoy/local.yaml), read back into an
Observation.

Ten fields separated by single spaces, the tenant last:

    mt1 <start s.mmm> <status> <request header bytes> <request body bytes>
        <response header bytes> <response body bytes> <duration µs> <request id> <tenant>

Envoy writes `-` for a value it does not have (a request without a tenant: authz refused
it, or its allow came too late). Nothing is escaped, so the one field that comes from a
header set by someone other than Envoy, the tenant, goes last: a space in it cannot shift
the fields before it. A line is checked for shape (ASCII, ten fields, the numbers it reads
plain decimals and in range, bounded ids) and anything else is malformed: counted and
dropped by the adapter, never raised to the stream. The shape decides nothing: the line
only says which admission it settles (meter/settle.py).
"""

from __future__ import annotations

from meshtoll.errors import MalformedLine
from meshtoll.usage.records import Observation
from meshtoll.wire import is_envoys_own_failure

VERSION = "mt1"
LOG_LINE_FORMAT = (
    f"{VERSION} %START_TIME(%s.%3f)% %RESPONSE_CODE% %REQUEST_HEADERS_BYTES% %BYTES_RECEIVED% "
    "%RESPONSE_HEADERS_BYTES% %BYTES_SENT% %COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% "
    "%REQ(X-REQUEST-ID)% %REQ(X-MESHTOLL-TENANT)%"
)
ABSENT = "-"
MAX_ID_LENGTH = 128  # tenant names are at most 128 characters (policy), Envoy's ids 36
# Envoy writes byte counts as uint64 (at most 20 digits); more is not a number it wrote.
_MAX_DIGITS = 20


class _Decimals(dict[str, int]):
    """The values of decimal numbers as Envoy writes them (ASCII digits, no sign, no
    spaces, no underscores), looked up: a number below `_TABULATED` is one lookup (about a
    quarter of int()'s cost, whose base and sign handling the meter never needs), and one
    out of shape is not in the table and raises MalformedLine. A number beyond it is read
    by int() once checked and not kept, so hostile lines cannot grow the table."""

    def __missing__(self, text: str) -> int:
        if not (text.isdigit() and text.isascii() and len(text) <= _MAX_DIGITS):
            raise MalformedLine("a number is not a number")
        return int(text)


# Statuses, header sizes, most bodies and durations in µs; about 1 MB.
_TABULATED = 10_000
_DECIMALS = _Decimals((str(n), n) for n in range(_TABULATED))
# The duration: "-" when Envoy never finished the response.
_DURATIONS = _Decimals(_DECIMALS)
_DURATIONS[ABSENT] = 0


def parse_log_line(line: str) -> Observation | None:
    """The observation a meter line carries, with tenant "" when it names none but Envoy
    failed the request itself (authz's allow may have come too late); None when it names
    no request id, or no tenant and authz refused it (not metered). One split, unpacked, and
    each number looked up once (_Decimals): no regular expression, no int(); the meter runs
    this for every request. The start time is not read: a record bills at its admission's
    time, so the line's own clock decides nothing (and is not checked)."""
    try:
        version, _, status_text, in_headers, in_body, out_headers, out_body, took, request_id, tenant = (
            line.split(" ", 9)
        )
    except ValueError:
        raise MalformedLine("not a meter line") from None
    if version != VERSION or not line.isascii():
        raise MalformedLine("not a meter line")
    if request_id == ABSENT:
        return None
    decimals = _DECIMALS
    status = decimals[status_text]
    if tenant == ABSENT:
        # A refusal costs no more than this.
        if not is_envoys_own_failure(status):
            return None
        tenant = ""
    elif not tenant:
        raise MalformedLine("an empty tenant")
    if not request_id or len(request_id) > MAX_ID_LENGTH or len(tenant) > MAX_ID_LENGTH or status >= 1000:
        raise MalformedLine("a status, request id or tenant out of shape")
    return (
        request_id,
        tenant,
        status,
        decimals[in_headers] + decimals[in_body],
        decimals[out_headers] + decimals[out_body],
        _DURATIONS[took] / 1000,
    )
