"""The API keys meshtoll makes: `<prefix>_<random>_<checksum>`, e.g. `mt_live_<32>_<8>`.

- the prefix (the policy's `auth.api_key_prefix`, `mt_live` by default) says whose key it
  is, so that secret scanners (GitHub's, trufflehog, a grep in CI) can find leaked ones:
  `mt_live_[0-9A-Za-z]{32}_[0-9a-f]{8}`;
- the random part is 32 base62 characters from `secrets` (about 190 bits);
- the checksum is the CRC-32 of everything before it, in hex, so that a mistyped or
  truncated key is refused without looking anything up.

A key is shown once, when it is made, and only its SHA-256 is ever stored. Keys of any other
shape (a file tenant's hand-made key) are still accepted: they are looked up like any key,
only without the early refusal.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib

DEFAULT_KEY_PREFIX = "mt_live"
RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 8
# What follows the prefix: "_" + random + "_" + checksum.
_TAIL_LENGTH = 1 + RANDOM_LENGTH + 1 + CHECKSUM_LENGTH
_BASE62 = string.digits + string.ascii_letters
# A prefix is a short lower-case word or two: it opens every key and a scanner's pattern.
KEY_PREFIX_PATTERN = re.compile(r"[a-z][a-z0-9]{0,15}(_[a-z0-9]{1,16}){0,2}")
# How much of a key listings show: the prefix and the first characters of the random part,
# enough to tell keys apart, far too little to guess one.
HINT_RANDOM_CHARACTERS = 4


def generate_key(prefix: str = DEFAULT_KEY_PREFIX) -> str:
    body = f"{prefix}_{''.join(secrets.choice(_BASE62) for _ in range(RANDOM_LENGTH))}"
    return f"{body}_{_checksum(body)}"


def checksum_fails(key: str, prefix: str) -> bool:
    """Whether a key that starts with `prefix` + "_" cannot be one meshtoll made: wrong
    length, or a checksum that does not match. Costs a CRC-32 of the key (well under a µs)."""
    if len(key) != len(prefix) + _TAIL_LENGTH or key[-CHECKSUM_LENGTH - 1] != "_":
        return True
    return _checksum(key[: -CHECKSUM_LENGTH - 1]) != key[-CHECKSUM_LENGTH:]


def key_hint(key: str, prefix: str) -> str:
    """What listings show of a key instead of the key: `mt_live_Ab3d...`."""
    start = len(prefix) + 1 if key.startswith(f"{prefix}_") else 0
    return key[: start + HINT_RANDOM_CHARACTERS] + "..."


def key_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _checksum(body: str) -> str:
    return format(zlib.crc32(body.encode()), "08x")
