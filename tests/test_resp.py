"""The lean Redis client's commands: an EVALSHA built from remembered parts is, byte for
byte, the command hiredis packs for the same keys and arguments, and what it remembers
stays bounded whatever keys a client makes it send."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest

from meshtoll.storage import resp
from meshtoll.storage.redis_access import LeanScript, lua_script
from meshtoll.storage.resp import BulkStrings

CALLS: list[tuple[list[str], list[int]]] = [
    (["bench_api_key_bench-key_1765140000"], [0, 1, 1000, 1]),
    (["meshtoll_{acme}_tenant_a_1765137600", "meshtoll_{acme}_tenant_a_1765134000"], [1765140123456, 1, 60]),
    (["k"], []),
    ([], [7]),
    (["é{ü}ß", "日本"], [-5, 10**20, 0]),  # lengths count UTF-8 bytes, not characters
    (["x" * 1000], [2**63]),  # longer than what is remembered: framed every time
    (["k"], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
]


def packed(script: LeanScript, keys: list[str], arguments: list[int]) -> bytes:
    parts: tuple[Any, ...] = ("EVALSHA", script.sha, len(keys), *keys, *arguments)
    command: bytes = hiredis.pack_command(parts)
    return command


@pytest.mark.parametrize(("keys", "arguments"), CALLS)
def test_an_evalsha_is_the_command_hiredis_packs(keys: list[str], arguments: list[int]) -> None:
    script = LeanScript(lua_script("increment.lua"), "the increment script")
    # Twice: built from nothing, then from what the first call remembered.
    assert script.evalsha(keys, arguments) == packed(script, keys, arguments)
    assert script.evalsha(keys, arguments) == packed(script, keys, arguments)


def test_one_script_builds_every_shape_of_call_in_any_order() -> None:
    script = LeanScript(lua_script("check.lua"), "the decision script")
    for keys, arguments in [*CALLS, *reversed(CALLS), *CALLS]:
        assert script.evalsha(keys, arguments) == packed(script, keys, arguments)


def test_what_is_remembered_stays_bounded() -> None:
    frames = BulkStrings()
    # A client's descriptors may name a new long key with every call: none is kept.
    for n in range(100):
        key = f"{n}" + "v" * 10_000
        assert frames.frame(key) == f"${len(key)}\r\n{key}\r\n"
        assert frames.get(key) is None
    assert len(frames) == 0
    # Short ones that keep changing (a time, an expiry) are kept up to the bound, then dropped.
    for n in range(3 * resp.FRAMES_KEPT):
        assert frames.frame(n) == f"${len(str(n))}\r\n{n}\r\n"
        assert 0 < len(frames) <= resp.FRAMES_KEPT
    assert frames.get(n) == f"${len(str(n))}\r\n{n}\r\n"
