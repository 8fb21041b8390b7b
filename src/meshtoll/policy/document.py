"""Read a YAML document into plain values, and locate any field by line when a problem
needs reporting.

Two parsers, on purpose: yaml-rs (Rust) builds the values about 17 times faster than
PyYAML's libyaml loader (0.6 s against 10 s for 100,000 tenants on a 2-core machine) but
keeps no positions; PyYAML's parser events carry positions, so they are read only when a
problem has to be reported, and only then does the document pay for them.

Nothing in the text may crash either parser's caller or cost much more than the text's
size: `screening` refuses what no policy needs, aliases are bounded (ALIAS_EVENT_BUDGET),
and the locator reads events, in which an alias is one event, never expanded.
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
# what they expand to is bounded: 300 bytes of nested aliases ("billion laughs") would
# otherwise expand to hundreds of millions of values, gigabytes and minutes of a thread
# holding the GIL, which stalls every decision of the event loop. Counted in YAML events (a
# scalar is one, a list or mapping two plus its content): a shared JWK Set is about 40;
# 100,000 cost yaml-rs 20 ms.
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
    if "alias replay limit" in message:  # yaml-rs has no exception type of its own for it
        message = f"aliases expand to more than {ALIAS_EVENT_BUDGET:,} YAML values: write the values out"
        line = _first_alias_line(text)
    return PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {message}")])


def _first_alias_line(text: str) -> int | None:
    for event in yaml.parse(text, Loader=_Composer):
        if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
            return event.start_mark.line + 1
    return None


def locate_fields(text: str, file: str = "") -> dict[FieldPath, int]:
    """Map every field path of the document to its line; raise PolicyError on bad YAML."""
    locator = _Locator(file)
    try:
        for event in yaml.parse(text, Loader=_Composer):
            locator.feed(event)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:  # a ReaderError: screening refuses its characters first
        raise PolicyError([PolicyProblem(file, None, "", f"invalid YAML: {exc}")]) from None
    if locator.duplicates:
        raise PolicyError(locator.duplicates)
    return locator.lines


_EXPECT_KEY = object()  # a mapping's state between entries


@dataclass(slots=True)
class _Collection:
    path: FieldPath
    is_mapping: bool
    is_key: bool  # a list or mapping used as a mapping key
    index: int = 0  # a sequence's next item
    key: object = _EXPECT_KEY  # a mapping's key whose value comes next
    seen: set[object] = field(default_factory=set)


class _Locator:
    """Lines of field paths from the parser's events.

    Events, not PyYAML's composed nodes: for 100,000 tenants, 3 s and no node tree against
    31 s and 660 MB. And an alias is one event, never expanded, so an alias bomb costs its
    size. A field under an alias is located at the alias (its nearest enclosing field).
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[FieldPath, int] = {}
        self.duplicates: list[PolicyProblem] = []
        self._stack: list[_Collection] = []
        self._documents = 0

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self._documents += 1
            if self._documents > 1:
                raise _yaml_error(self.file, event, "expected one document, found another")
        elif isinstance(event, yaml.CollectionEndEvent):
            done = self._stack.pop()
            self._completed(done.path[-1] if done.is_key else None, done.is_key)
        elif isinstance(event, yaml.NodeEvent):
            self._node(event)

    def _node(self, event: yaml.NodeEvent) -> None:
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        parent = self._stack[-1] if self._stack else None
        is_key = parent is not None and parent.is_mapping and parent.key is _EXPECT_KEY
        key: object = None
        if parent is None:
            path: FieldPath = ()
        elif not parent.is_mapping:
            path = (*parent.path, parent.index)
            parent.index += 1
        elif is_key:
            key = _key(event)
            path = (*parent.path, key)
            if key in parent.seen:
                self.duplicates.append(PolicyProblem(self.file, line, format_path(path), "duplicate key"))
            parent.seen.add(key)
            self.lines[path] = line  # a mapping entry is located at its key
        else:
            path = (*parent.path, parent.key)
        self.lines.setdefault(path, line)
        if isinstance(event, yaml.CollectionStartEvent):
            self._stack.append(_Collection(path, isinstance(event, yaml.MappingStartEvent), is_key))
        else:
            self._completed(key, is_key)

    def _completed(self, key: object, is_key: bool) -> None:
        """A node has ended: its mapping now expects its value, or its next key."""
        if self._stack and self._stack[-1].is_mapping:
            self._stack[-1].key = key if is_key else _EXPECT_KEY


def _yaml_error(file: str, event: yaml.Event, message: str) -> PolicyError:
    line = event.start_mark.line + 1 if event.start_mark is not None else None
    return PolicyError([PolicyProblem(file, line, "", f"invalid YAML: {message}")])


_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAGS = {"tag:yaml.org,2002:" + kind for kind in ("null", "bool", "int", "float")}
_RESOLVER = yaml.resolver.Resolver()


def _key(event: yaml.NodeEvent) -> object:
    """The key as the parsed values hold it, so that a non-string key finds its own line."""
    if not isinstance(event, yaml.ScalarEvent):
        return object()  # an alias, list or mapping as a key: matches nothing, equals nothing
    tag = event.tag
    if tag is None and (not event.implicit[0] or event.value[:1] not in _RESOLVER.yaml_implicit_resolvers):
        return event.value  # quoted, or a plain scalar no implicit type starts like
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]
    if tag not in _PLAIN_TAGS:
        return event.value
    try:
        return yaml.constructor.SafeConstructor().construct_object(yaml.ScalarNode(tag, event.value))
    except ValueError:  # an integer of more than 4,300 digits
        return event.value
