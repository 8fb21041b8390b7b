"""Decoding HTTP/2 header blocks (HPACK, RFC 7541) for the h2c gRPC server (h2_server.py).

A peer's encoder (Envoy's, grpc-core's) indexes what it sends into a dynamic table that the
decoder must mirror exactly, and Huffman-codes strings; the Huffman code itself comes from
the `hpack` package. A gRPC client sends the same header block for every call of a method
once its table holds the fields (a handful of one-byte indices), so a block that left the
table as it found it is remembered with what it decoded to until the table next changes:
the steady state costs one dictionary lookup per call.

Every bound a peer could push past is checked (integers, string lengths, the table's size,
the decoded list's size); a violation raises HeaderBlockError, a connection error
(COMPRESSION_ERROR) for the caller, since the table can no longer be trusted.
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman

Headers = tuple[tuple[str, str], ...]

# RFC 7541 Appendix A: index 1 to 61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_STATIC = len(STATIC_TABLE)
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1: an entry's size is its name's and value's octets + 32
# An integer of more continuation bytes than this is larger than any bound checked here.
_MAX_INTEGER_BYTES = 4
# Blocks remembered with their decoding, and the largest remembered: a gRPC client's are a
# few dozen bytes; a peer sending ever-new blocks only refills the memory it is given.
_REMEMBERED_BLOCKS = 64
_REMEMBERED_BLOCK_BYTES = 512


class HeaderBlockError(Exception):
    """The peer's header block cannot be decoded (a COMPRESSION_ERROR)."""


class HeaderBlockDecoder:
    """One connection's decoder: its dynamic table, bounded by `table_size` (what this side
    advertised as SETTINGS_HEADER_TABLE_SIZE), and the largest header list it will decode."""

    __slots__ = ("_entries", "_max_list_size", "_max_table_size", "_remembered", "_size", "_table_limit")

    def __init__(self, table_size: int = 4096, max_list_size: int = 65536) -> None:
        self._max_table_size = table_size  # the most the peer may ask for
        self._table_limit = table_size  # what the peer last asked for
        self._max_list_size = max_list_size
        self._entries: deque[tuple[str, str]] = deque()  # newest first: index 62 is [0]
        self._size = 0
        self._remembered: dict[bytes, Headers] = {}

    def decode(self, block: bytes) -> Headers:
        """The header list of one complete block (HEADERS and its CONTINUATIONs, joined)."""
        remembered = self._remembered.get(block)
        if remembered is not None:
            return remembered
        changed_before = self._remembered
        headers = self._decode(block)
        # The dictionary is replaced whenever the table changes: if it is still the same
        # one, this block changed nothing, and decodes the same way until the table does.
        if self._remembered is changed_before and len(block) <= _REMEMBERED_BLOCK_BYTES:
            if len(changed_before) >= _REMEMBERED_BLOCKS:
                changed_before.clear()
            changed_before[block] = headers
        return headers

    def _decode(self, block: bytes) -> Headers:
        headers: list[tuple[str, str]] = []
        list_size = 0
        position = 0
        end = len(block)
        while position < end:
            first = block[position]
            if first & 0x80:  # indexed field
                index, position = self._integer(block, position, 0x7F)
                field = self._field(index)
            elif first & 0x40:  # literal with incremental indexing
                field, position = self._literal(block, position, 0x3F)
                self._add(field)
            elif first & 0x20:  # dynamic table size update
                if headers:
                    raise HeaderBlockError("a table size update after the first field of a block")
                size, position = self._integer(block, position, 0x1F)
                if size > self._max_table_size:
                    raise HeaderBlockError(
                        f"a table size of {size} octets, over the {self._max_table_size} allowed"
                    )
                self._table_limit = size
                self._evict(0)
                continue
            else:  # literal without indexing (0x00) or never indexed (0x10)
                field, position = self._literal(block, position, 0x0F)
            list_size += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if list_size > self._max_list_size:
                raise HeaderBlockError(f"a header list over {self._max_list_size} octets")
            headers.append(field)
        return tuple(headers)

    def _field(self, index: int) -> tuple[str, str]:
        if 0 < index <= _STATIC:
            return STATIC_TABLE[index - 1]
        dynamic = index - _STATIC - 1
        if index == 0 or dynamic >= len(self._entries):
            raise HeaderBlockError(f"index {index} is in neither table")
        return self._entries[dynamic]

    def _literal(self, block: bytes, position: int, mask: int) -> tuple[tuple[str, str], int]:
        index, position = self._integer(block, position, mask)
        if index:
            name = self._field(index)[0]
        else:
            name, position = self._string(block, position)
        value, position = self._string(block, position)
        return (name, value), position

    def _string(self, block: bytes, position: int) -> tuple[str, int]:
        if position >= len(block):
            raise HeaderBlockError("the block ends where a string should start")
        huffman = block[position] & 0x80
        length, position = self._integer(block, position, 0x7F)
        end = position + length
        if end > len(block):
            raise HeaderBlockError("a string runs past the end of the block")
        raw = block[position:end]
        if huffman:
            try:
                raw = decode_huffman(raw)
            except HPACKDecodingError as exc:
                raise HeaderBlockError(f"bad Huffman coding: {exc}") from None
        return raw.decode("latin-1"), end

    @staticmethod
    def _integer(block: bytes, position: int, mask: int) -> tuple[int, int]:
        """RFC 7541 5.1: an integer whose prefix is the low bits `mask` of block[position]."""
        value = block[position] & mask
        position += 1
        if value < mask:
            return value, position
        shift = 0
        for _ in range(_MAX_INTEGER_BYTES):
            if position >= len(block):
                raise HeaderBlockError("the block ends inside an integer")
            byte = block[position]
            position += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, position
        raise HeaderBlockError("an integer longer than any bound")

    def _add(self, field: tuple[str, str]) -> None:
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        self._evict(size)
        if size <= self._table_limit:  # a larger one empties the table and is not kept (4.4)
            self._entries.appendleft(field)
            self._size += size
        self._remembered = {}

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until `room` more octets fit under the table's limit."""
        entries = self._entries
        while entries and self._size + room > self._table_limit:
            name, value = entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
        self._remembered = {}
