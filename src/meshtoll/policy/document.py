"""Read a YAML document into plain values, and locate any field by line when a problem
needs reporting.

Two parsers, on purpose: yaml-rs (Rust) builds the values about 17 times faster than
PyYAML's libyaml loader (0.6 s against 10 s for 100,000 tenants on a 2-core machine) but
keeps no positions; PyYAML's composer keeps positions, so it runs only when a problem has
to be reported, and only then does the document pay for it.

Nothing in the text may crash either parser's caller or cost more than the text's size:
`screening` refuses what no policy needs, aliases are bounded (ALIAS_EVENT_BUDGET), and
the locator visits each node once, however many aliases point at it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml
import yaml_rs

from meshtoll.errors import PolicyError, PolicyProblem
from meshtoll.policy.screening import screen_text, screen_values, shown

FieldPath = tuple[object, ...]  # str keys and int indexes; a key YAML read as non-string too

_Composer: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Aliases are allowed (one JWK Set or limit list shared by several entries reads well), but
# what they expand to is bounded: 2.4 KB of nested aliases ("billion laughs") would
# otherwise expand to a billion values, gigabytes and minutes of a thread holding the GIL,
# which stalls every decision of the event loop. Counted in YAML events (a scalar is one,
# a list or mapping two plus its content): a shared JWK Set of a few keys is about 40.
ALIAS_EVENT_BUDGET = 100_000
_ALIAS_LIMITS = yaml_rs.AliasLimits(max_total_replayed_events=ALIAS_EVENT_BUDGET)
_AT_LINE = re.compile(r"\bline (\d+)")


def format_path(path: FieldPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, str):
            text += f".{part}" if text else part
        else:  # a list index, or a key that is not a string (reported as such)
            text += f"[{shown(part)}]"
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
            self._lines = locate_fields(self.text, self.file)
        while path not in self._lines and path:
            path = path[:-1]
        return self._lines.get(path)

    def problem(self, path: FieldPath, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, self.line_of(path), format_path(path), message))

    def raise_if_problems(self) -> None:
        if self.problems:
            raise PolicyError(self.problems)


def parse_document(text: str, file: str) -> Document:
    """Parse YAML text; anything wrong with it becomes a PolicyError with its line."""
    screen_text(text, file)
    try:
        root = yaml_rs.loads(text, alias_limits=_ALIAS_LIMITS)
    except Exception as exc:  # an extension's promise to raise only YAMLDecodeError is not relied on
        raise _parse_error(text, file, exc) from None
    document = Document(file=file, root=root, text=text)
    if root is None:
        document.problem((), "the document is empty")
    for path, message in screen_values(root):
        document.problem(path, message)
    document.raise_if_problems()
    return document


def _parse_error(text: str, file: str, exc: Exception) -> PolicyError:
    # Let the locating parser name the line; its own messages are the clearer ones.
    locate_fields(text, file)
    message = str(exc).partition("\n")[0]
    found = _AT_LINE.search(message)
    line = int(found.group(1)) if found else None
    if "alias replay limit" in message:
        message = f"aliases expand to more than {ALIAS_EVENT_BUDGET:,} YAML values: write the values out"
        line = _first_alias_line(text)
    return PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {message}")])


def _first_alias_line(text: str) -> int | None:
    # Parser events, not nodes: streaming, and nothing is expanded.
    for event in yaml.parse(text, Loader=_Composer):
        if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
            return event.start_mark.line + 1
    return None


def locate_fields(text: str, file: str = "") -> dict[FieldPath, int]:
    """Map every field path of the document to its line; raise PolicyError on bad YAML."""
    try:
        node = yaml.compose(text, Loader=_Composer)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:  # a ReaderError: screening refuses its characters first
        raise PolicyError([PolicyProblem(file, None, "", f"invalid YAML: {exc}")]) from None
    lines: dict[FieldPath, int] = {}
    duplicates: list[PolicyProblem] = []
    if node is not None:
        _walk(node, lines, duplicates, file)
    if duplicates:
        raise PolicyError(duplicates)
    return lines


def _walk(root: yaml.Node, lines: dict[FieldPath, int], duplicates: list[PolicyProblem], file: str) -> None:
    # Iterative, and each node walked once: an alias is the very node it names, so walking
    # it again would expand an alias bomb here. Fields under a second use of a node are
    # located at that use (their nearest enclosing field).
    walked: set[int] = set()
    stack: list[tuple[yaml.Node, FieldPath]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        # A mapping entry is located at its key (set below); anything else at its start.
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in walked:
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, value_node in node.value:
                key = _key(key_node)
                child = (*path, key)
                line = key_node.start_mark.line + 1
                if key in seen:
                    duplicates.append(PolicyProblem(file, line, format_path(child), "duplicate key"))
                    continue
                seen.add(key)
                lines[child] = line
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, index)) for index, item in enumerate(node.value))


_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAGS = {"tag:yaml.org,2002:" + kind for kind in ("null", "bool", "int", "float")}


def _key(node: yaml.Node) -> object:
    """The key as the parsed values hold it, so that a non-string key finds its own line."""
    if not isinstance(node, yaml.ScalarNode):
        return object()  # a list or mapping as a key: matches nothing, equals nothing
    if node.tag not in _PLAIN_TAGS:
        return node.value
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except ValueError:  # an integer of more than 4,300 digits
        return node.value
