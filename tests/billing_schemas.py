"""The published schemas of the billing targets' request bodies (tests/schemas/README.md
says where each comes from), as validators that check formats too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

SCHEMAS = Path(__file__).parent / "schemas"
# RFC 3339 date-time (section 5.6): full date, "T", full time with an offset or Z.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")

# jsonschema checks a format only with a checker for it, and its own need packages meshtoll
# does not install: the two formats these schemas use, checked here.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(RFC3339.fullmatch(value))


@FORMATS.checks("uri-reference")
def _uri_reference(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        urlsplit(value)
    except ValueError:
        return False
    return not re.search(r"[\s<>\"{}|\\^`]", value)


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=FORMATS)


CLOUDEVENT = _validator({**_schema("cloudevents.json"), "$schema": "http://json-schema.org/draft-07/schema#"})
OPENMETER_EVENT = _validator(_schema("openmeter-event.json"))
LAGO_BATCH = _validator(_schema("lago-event-batch-input.json"))
_STRIPE = _schema("stripe-meter-events.json")
STRIPE_V1_FORM = _validator({**_STRIPE["$defs"]["v1_meter_event_form"], "$defs": _STRIPE["$defs"]})
STRIPE_V2_STREAM = _validator({**_STRIPE["$defs"]["v2_meter_event_stream"], "$defs": _STRIPE["$defs"]})


def check_cloudevent(event: Any) -> None:
    """An event OpenMeter takes: CloudEvents 1.0 and OpenMeter's own `Event`."""
    CLOUDEVENT.validate(event)
    OPENMETER_EVENT.validate(event)


def stripe_form(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """Form fields as Stripe reads them: `payload[key]` into a `payload` mapping, numbers
    where the parameter is one."""
    found: dict[str, Any] = {}
    for name, value in fields:
        if name.startswith("payload[") and name.endswith("]"):
            found.setdefault("payload", {})[name[8:-1]] = value
        elif name == "timestamp":
            found[name] = int(value) if value.isdigit() else value
        else:
            found[name] = value
    return found
