"""Typed readers over a parsed document: each checks one value and records what is wrong.

A reader never raises on bad input: it records a problem at the field path and returns
None, so that one pass reports every problem in the document, not just the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from typing import TypeVar

from meshtoll.policy.document import Document, FieldPath
from meshtoll.policy.model import MONEY_FRACTION_DIGITS, MONEY_INTEGER_DIGITS

Choice = TypeVar("Choice", bound=str)

# Counts and amounts go to Redis scripts, where a number is a Lua double: exact up to 2**53.
MAX_INTEGER = 2**53 - 1
# ASCII digits only: Decimal() would also take "1e30", "Infinity", "1_000", " 1 " and
# Arabic-Indic digits, and an exponent such as 1E+999999999 passes validation only to make
# invoicing raise. The bounds keep every invoice within exact Decimal arithmetic.
_MONEY = re.compile(rf"[0-9]{{1,{MONEY_INTEGER_DIGITS}}}(\.[0-9]{{1,{MONEY_FRACTION_DIGITS}}})?")


class Fields:
    def __init__(self, document: Document) -> None:
        self.document = document

    def problem(self, path: FieldPath, message: str) -> None:
        self.document.problem(path, message)

    def mapping(
        self,
        value: object,
        path: FieldPath,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> dict[str, object] | None:
        """A mapping whose keys are all known; unknown and missing keys are problems."""
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping, got {_kind(value)}")
            return None
        known = (*required, *optional)
        for key in value:
            if key not in known:
                self.problem((*path, key), f"unknown field (expected one of: {', '.join(known)})")
        for key in required:
            if key not in value:
                self.problem(path, f"missing required field '{key}'")
        return value

    def entries(self, value: object, path: FieldPath) -> Iterator[tuple[str, object, FieldPath]]:
        """The entries of a name -> value mapping (plans, tenants)."""
        if value is None:
            return
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of names, got {_kind(value)}")
            return
        for name, item in value.items():
            if not isinstance(name, str):
                self.problem(path, f"names must be strings, got {name!r}")
                continue
            yield name, item, (*path, name)

    def items(self, value: object, path: FieldPath) -> Iterator[tuple[object, FieldPath]]:
        if value is None:
            return
        if not isinstance(value, list):
            self.problem(path, f"expected a list, got {_kind(value)}")
            return
        for index, item in enumerate(value):
            yield item, (*path, index)

    def string(self, value: object, path: FieldPath) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.problem(path, f"expected a non-empty string, got {_kind(value)}")
        return None

    def strings(self, value: object, path: FieldPath) -> tuple[str, ...]:
        found = (self.string(item, item_path) for item, item_path in self.items(value, path))
        return tuple(item for item in found if item is not None)

    def integer(self, value: object, path: FieldPath, *, minimum: int = 0) -> int | None:
        # bool is an int subclass in Python; `requests: true` is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.problem(path, f"expected an integer >= {minimum}, got {_kind(value)}")
            return None
        if value > MAX_INTEGER:
            self.problem(path, f"expected an integer of at most {MAX_INTEGER} (2**53 - 1)")
            return None
        return value

    def money(self, value: object, path: FieldPath) -> Decimal | None:
        """A non-negative amount written as a string ("49.00"): a YAML float would already
        have lost the exact value, so numbers are refused, not converted."""
        if not isinstance(value, str):
            self.problem(path, f'money is written as a string, e.g. "49.00", got {_kind(value)}')
            return None
        if not _MONEY.fullmatch(value):
            self.problem(
                path,
                f"{value[:40]!r} is not a non-negative decimal amount (digits and an optional '.', "
                f'at most {MONEY_INTEGER_DIGITS} before it and {MONEY_FRACTION_DIGITS} after, e.g. "49.00")',
            )
            return None
        return Decimal(value)

    def boolean(self, value: object, path: FieldPath) -> bool | None:
        if isinstance(value, bool):
            return value
        self.problem(path, f"expected true or false, got {_kind(value)}")
        return None

    def choice(self, value: object, path: FieldPath, options: tuple[Choice, ...]) -> Choice | None:
        for option in options:
            if value == option:
                return option
        self.problem(path, f"expected one of {', '.join(options)}, got {_kind(value)}")
        return None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
