"""meshtoll's HPACK decoder (transport/hpack_decoder.py) against what a hostile encoder
may send (RFC 7541): every violation is a HeaderBlockError (the server's COMPRESSION_ERROR),
never an exception of another kind, a loop without end or a table past its bound."""

from __future__ import annotations

import hpack
import pytest

from meshtoll.transport.hpack_decoder import HeaderBlockDecoder, HeaderBlockError


def literal(name: bytes, value: bytes, huffman_value: bool = False) -> bytes:
    """A literal without indexing, new name, lengths under 127."""
    flag = 0x80 if huffman_value else 0
    return b"\x00" + bytes((len(name),)) + name + bytes((flag | len(value),)) + value


def test_what_hpacks_encoder_sends_is_decoded_with_its_dynamic_table() -> None:
    encoder, decoder = hpack.Encoder(), HeaderBlockDecoder()
    fields = [(":path", "/a.B/C"), ("grpc-timeout", "250m"), ("x-id", "abc")]
    for _ in range(3):  # literals with indexing first, then indices into the table
        assert decoder.decode(encoder.encode(fields, huffman=True)) == tuple(fields)


@pytest.mark.parametrize(
    ("block", "what"),
    [
        (b"\xff" + b"\xff" * 10, "an integer that never ends"),
        (b"\xff\xff\xff\xff\xff\x7f", "an index far past both tables"),
        (b"\x80", "index 0"),
        (b"\xbf", "an index in an empty dynamic table"),
        (b"\x00\x05ab", "a string past the block's end"),
        (b"\x00", "a block ending where a string starts"),
        (b"\x3f\xe2\x1f", "a table size update to 4,097, above the advertised 4,096"),
        (b"\x82\x20", "a table size update after the first field"),
        (b"\x00\x81\xff", "a Huffman string of EOS"),
        (literal(b"a", b"\x1f\xff", huffman_value=True), "Huffman padding longer than 7 bits"),
        (literal(b"a", b"\x18", huffman_value=True), "Huffman padding not of ones"),
    ],
)
def test_a_hostile_block_is_a_header_block_error(block: bytes, what: str) -> None:
    with pytest.raises(HeaderBlockError):
        HeaderBlockDecoder().decode(block)


def test_a_header_list_past_its_bound_is_refused() -> None:
    decoder = HeaderBlockDecoder(max_list_size=100)
    with pytest.raises(HeaderBlockError, match="over 100 octets"):
        decoder.decode(literal(b"x", b"y" * 80))


def test_a_table_size_update_at_the_start_shrinks_the_table() -> None:
    encoder, decoder = hpack.Encoder(), HeaderBlockDecoder()
    decoder.decode(encoder.encode([("x-a", "1")]))  # indexed into the table
    assert decoder.decode(b"\x20") == ()  # size 0: the table emptied
    with pytest.raises(HeaderBlockError):
        decoder.decode(b"\xbe")  # index 62 is gone
