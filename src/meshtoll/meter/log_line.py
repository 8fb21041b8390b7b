"""The meter's access-log line: the one text body Envoy's OpenTelemetry access logger
formats per request (the `meter` logger in envoy/local.yaml), read back into an
Observation.

Ten fields separated by single spaces, the tenant last:

    mt1 <start s.mmm> <status> <request header bytes> <request body bytes>
        <response header bytes> <response body bytes> <duration µs> <request id> <tenant>

Envoy writes `-` for a value it does not have (a request without a tenant: authz refused
it, or its allow came too late). Nothing is escaped, so the one field that comes from a
header set by someone other than Envoy, the tenant, goes last: a space in it cannot shift
the fields before it. A line is checked for shape (ASCII, ten fields, numbers in range,
bounded ids) and anything else is malformed: counted and dropped by the adapter, never
raised to the stream. The shape decides nothing: the line only says which admission it
settles (meter/settle.py).
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
_FIELDS = 10
MAX_ID_LENGTH = 128  # tenant names are at most 128 characters (policy), Envoy's ids 36
# Unix seconds before 5138 AD: rules out inf and nan (float() accepts both), which the
# ledger's JSON could not hold.
_LATEST_TIME = 1e11


def parse_log_line(line: str) -> Observation | None:
    """The observation a meter line carries, with tenant "" when it names none but Envoy
    failed the request itself (authz's allow may have come too late); None when it names
    no request id, or no tenant and authz refused it (not metered). Split and int(), not a
    regular expression: half the cost, and the meter runs this for every request."""
    fields = line.split(" ", _FIELDS - 1)
    if len(fields) != _FIELDS or fields[0] != VERSION or not line.isascii():
        raise MalformedLine("not a meter line")
    request_id, tenant = fields[8], fields[9]
    if request_id == ABSENT:
        return None
    if tenant == ABSENT:
        # A refusal costs no more than this (a status that is no number is malformed below).
        if fields[2].isdigit() and not is_envoys_own_failure(int(fields[2])):
            return None
        tenant = ""
    elif not tenant:
        raise MalformedLine("an empty tenant")
    if not request_id or len(request_id) > MAX_ID_LENGTH or len(tenant) > MAX_ID_LENGTH:
        raise MalformedLine("request id or tenant out of shape")
    # Each size in a name of its own and compared on its own: a tuple, min() and indexing
    # cost 8% of the parse (callgrind, 19,486 -> 17,912 instructions a line).
    # The start time is checked for shape though the record bills at its admission's time.
    try:
        start = float(fields[1])
        status = int(fields[2])
        in_headers, in_body = int(fields[3]), int(fields[4])
        out_headers, out_body = int(fields[5]), int(fields[6])
        took_us = 0 if fields[7] == ABSENT else int(fields[7])
    except ValueError:
        raise MalformedLine("a number is not a number") from None
    if not (
        0 <= start < _LATEST_TIME
        and 0 <= status < 1000
        and took_us >= 0
        and in_headers >= 0
        and in_body >= 0
        and out_headers >= 0
        and out_body >= 0
    ):
        raise MalformedLine("a number out of range")
    return request_id, tenant, status, in_headers + in_body, out_headers + out_body, took_us / 1000
