"""What no policy (nor rate-limit configuration) needs is refused before it can cost anything.

A document is read by services that must keep running whatever it holds, so every check
here is linear in the size of the text or of its values, and each problem is located:
- the size of the file, read no further than the limit;
- bytes that are not UTF-8, and characters YAML does not allow (yaml-rs silently stops
  reading at a NUL: everything after it, a revoked key say, would be lost without a word);
- after parsing: nesting deeper than any policy needs, keys that are not strings, values
  YAML reads as something other than text, numbers, booleans, lists and mappings, and
  control characters in strings (escapes such as "\\x00" or "\\u0007" let them through).

Aliases are bounded where the document is parsed (see `document.ALIAS_EVENT_BUDGET`).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from meshtoll.errors import PolicyError, PolicyProblem

# A policy of 100,000 tenants, each with a key, is about 12 MiB; the limit keeps a runaway
# generator (or a wrong path: a log file, a disk image) from costing gigabytes to refuse.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
# The deepest a policy goes is about 8 (tenants.t.jwt.jwks.keys[0].x); envoyproxy/ratelimit
# files nest two levels per descriptor. 64 leaves room and keeps every walk's recursion small.
MAX_DEPTH = 64

# YAML 1.2's printable characters (c-printable): what may appear in the text at all.
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Control characters (Unicode Cc), tab and line breaks included: every string of a policy is a
# name, a URL, a key or a header value, all single-line; a line break in a header value
# template would even be a header injection.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BOM = "\ufeff"


def read_document(path: Path) -> str:
    """The file's text, or a located PolicyError: unreadable, too large or not UTF-8."""
    file = str(path)
    try:
        # A FIFO would block the reading thread forever, a device never end: files only.
        if not stat.S_ISREG(path.stat().st_mode):
            raise _error(file, None, "not a regular file")
        with path.open("rb") as stream:
            data = stream.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise _error(file, None, f"cannot read: {exc}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _error(file, None, f"larger than {MAX_DOCUMENT_BYTES // 2**20} MiB: not read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8: byte 0x{data[exc.start]:02x} at column {column}"
        raise _error(file, line, message) from None
    return text.removeprefix(_BOM)  # an editor's byte order mark is not part of the first key


def screen_text(text: str, file: str) -> None:
    """Refuse an oversized text or one with a character YAML does not allow."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise _error(file, None, f"larger than {MAX_DOCUMENT_BYTES // 2**20} MiB: not read")
    found = _NOT_PRINTABLE.search(text)
    if found is not None:
        line = text.count("\n", 0, found.start()) + 1
        column = found.start() - (text.rfind("\n", 0, found.start()) + 1) + 1
        message = f"{_describe(found.group())} at column {column} is not allowed in YAML"
        raise _error(file, line, message)


Problem = tuple[tuple[object, ...], str]  # (field path, message)


def screen_values(root: object) -> list[Problem]:
    """Problems of parsed values that no schema reader should have to expect."""
    problems: list[Problem] = []
    stack: list[tuple[dict[object, object] | list[object], tuple[object, ...]]] = []
    if isinstance(root, dict | list):
        stack.append((root, ()))
    else:
        _screen_item(root, (), None, stack, problems)
    # Iterative, so that depth costs no recursion. Strings and numbers, nearly all of a
    # policy, are checked where their container is read: 100,000 tenants take a second.
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            problems.append((path, f"nested deeper than {MAX_DEPTH} levels"))
            continue
        if isinstance(value, list):
            for index, item in enumerate(value):
                if type(item) is not str or _CONTROL.search(item):
                    _screen_item(item, path, index, stack, problems)
            continue
        for key, item in value.items():
            if type(key) is not str:
                # The value under it is left unread: no schema reader will see it.
                problems.append(((*path, key), f"key {shown(key)} is not a string: quote it"))
                continue
            if _CONTROL.search(key):
                _screen_string(key, (*path, key), "key", problems)
            if type(item) is not str or _CONTROL.search(item):
                _screen_item(item, path, key, stack, problems)
    return problems


def _screen_item(
    value: object,
    parent: tuple[object, ...],
    key: object,  # the item's key or index in `parent`, None for the root
    stack: list[tuple[dict[object, object] | list[object], tuple[object, ...]]],
    problems: list[Problem],
) -> None:
    # The item's path is built only when it is needed: most items need none.
    if type(value) is str:
        if _CONTROL.search(value):
            _screen_string(value, _child(parent, key), "string", problems)
        return
    if value is None or type(value) in (bool, float) or (type(value) is int and abs(value) < 2**64):
        return
    path = _child(parent, key)
    if isinstance(value, dict | list):
        stack.append((value, path))
    elif isinstance(value, int):
        # Nothing counts that high; and Python cannot even print one of 4,300 digits.
        message = f"an integer of {value.bit_length()} bits is out of range (64 at most)"
        problems.append((path, f"{message}: quote it if it is text"))
    else:
        # Timestamps, sets, binary: no field takes one, and a value passed on unread (an
        # inline JWK Set) must hold only what JSON can.
        kind = type(value).__name__
        problems.append((path, f"a YAML {kind} value is not expected here ({value!r:.40})"))


def _child(parent: tuple[object, ...], key: object) -> tuple[object, ...]:
    return parent if key is None else (*parent, key)


def _screen_string(text: str, path: tuple[object, ...], kind: str, problems: list[Problem]) -> None:
    found = _CONTROL.search(text)
    if found is not None:
        hint = " (a block scalar? use a plain or quoted one)" if found.group() == "\n" else ""
        problems.append((path, f"{_describe(found.group())} in a {kind}: text must be one line{hint}"))


def _describe(character: str) -> str:
    kind = "control character" if _CONTROL.match(character) else "character"
    return f"{kind} U+{ord(character):04X}"


def shown(key: object) -> str:
    """A key as a message shows it: repr() raises for an integer of more than 4,300 digits."""
    if isinstance(key, int) and abs(key) >= 2**64:
        return f"<an integer of {key.bit_length()} bits>"
    return "null" if key is None else f"{key!r:.40}"


def _error(file: str, line: int | None, message: str) -> PolicyError:
    return PolicyError([PolicyProblem(file, line, "", message)])
