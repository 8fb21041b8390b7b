"""Read a YAML document into plain values, and locate any field by line when a problem
needs reporting.

Two parsers, on purpose: yaml-rs (Rust) builds the values about 17 times faster than
PyYAML's libyaml loader (0.6 s against 10 s for 100,000 tenants on a 2-core machine) but
keeps no positions; PyYAML's composer keeps positions, so it runs only when a problem has
to be reported, and only then does the document pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
import yaml_rs

from meshtoll.errors import PolicyError, PolicyProblem

FieldPath = tuple[str | int, ...]

_Composer: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def format_path(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(slots=True)
class Document:
    """A parsed YAML document: its root value, and the problems found in it so far."""

    file: str
    root: object
    text: str
    problems: list[PolicyProblem] = field(default_factory=list)
    _lines: dict[FieldPath, int] | None = None

    def line_of(self, path: FieldPath) -> int | None:
        """The 1-based line of a field path, or of its nearest enclosing field."""
        if self._lines is None:
            self._lines = locate_fields(self.text)
        while path not in self._lines and path:
            path = path[:-1]
        return self._lines.get(path)

    def problem(self, path: FieldPath, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, self.line_of(path), format_path(path), message))

    def raise_if_problems(self) -> None:
        if self.problems:
            raise PolicyError(self.problems)


def parse_document(text: str, file: str) -> Document:
    """Parse YAML text; a syntax error or a duplicate key becomes a PolicyError with its line."""
    try:
        root = yaml_rs.loads(text)
    except yaml_rs.YAMLDecodeError as exc:
        # Let the locating parser name the line; its own messages are the clearer ones.
        locate_fields(text, file)
        raise PolicyError([PolicyProblem(file, None, "", f"invalid YAML: {exc}")]) from None
    document = Document(file=file, root=root, text=text)
    if root is None:
        document.problem((), "the document is empty")
    document.raise_if_problems()
    return document


def locate_fields(text: str, file: str = "") -> dict[FieldPath, int]:
    """Map every field path of the document to its line; raise PolicyError on bad YAML."""
    try:
        node = yaml.compose(text, Loader=_Composer)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {exc.problem or exc}")]) from None
    lines: dict[FieldPath, int] = {}
    duplicates: list[PolicyProblem] = []
    if node is not None:
        _walk(node, (), lines, duplicates, file)
    if duplicates:
        raise PolicyError(duplicates)
    return lines


def _walk(
    node: yaml.Node,
    path: FieldPath,
    lines: dict[FieldPath, int],
    duplicates: list[PolicyProblem],
    file: str,
) -> None:
    # A mapping entry is located at its key (set by the caller); anything else at its start.
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = (*path, key) if isinstance(key, str) else path
            line = key_node.start_mark.line + 1
            if key in seen:
                duplicates.append(PolicyProblem(file, line, format_path(child), "duplicate key"))
                continue
            seen.add(key)
            lines[child] = line
            _walk(value_node, child, lines, duplicates, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, duplicates, file)
