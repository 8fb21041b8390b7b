"""`meshtoll usage export`: the usage ledger as files billing systems take, each event
carrying the request id as its unique id (the event forms are sinks/events.py's, the same
the sinks send):

- `cloudevents`: one CloudEvents 1.0 JSON event a line (OpenMeter's `Event`);
- `cloudevents-batch`: one JSON array of them, the body of OpenMeter's batch ingest
  (`application/cloudevents-batch+json`);
- `lago`: one `{"event": ...}` a line, the body of Lago's single-event call;
- `lago-batch`: one `{"events": [...]}` of at most 100 a line, the body of Lago's batch call;
- `csv`: a header and a row per record, `time` in RFC 3339 (UTC, milliseconds).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import fields

import orjson

from meshtoll.sinks.events import DEFAULT_CLOUDEVENTS_SOURCE, cloudevent, lago_event, rfc3339
from meshtoll.sinks.names import BillingNames, DefaultNames
from meshtoll.usage.records import UsageRecord

FORMATS = ("cloudevents", "cloudevents-batch", "lago", "lago-batch", "csv")
LAGO_BATCH_SIZE = 100  # Lago's batch endpoint takes at most 100 events


def export(
    records: Sequence[UsageRecord],
    form: str,
    names: BillingNames | None = None,
    source: str = DEFAULT_CLOUDEVENTS_SOURCE,
) -> str:
    """The records in `form` (one of FORMATS); `names` maps tenants and meters (by default
    each tenant under its own name, every request on api_requests)."""
    names = DefaultNames() if names is None else names
    if form == "csv":
        return _csv(records)
    if form in ("cloudevents", "cloudevents-batch"):
        events = [cloudevent(record, names, source) for record in records]
        return _lines(events) if form == "cloudevents" else _line(events)
    lago = [lago_event(record, names) for record in records]
    if form == "lago":
        return _lines({"event": event} for event in lago)
    chunks = range(0, len(lago), LAGO_BATCH_SIZE)
    return _lines({"events": lago[start : start + LAGO_BATCH_SIZE]} for start in chunks)


def _line(document: object) -> str:
    return orjson.dumps(document).decode() + "\n"


def _lines(documents: Iterable[object]) -> str:
    return "".join(_line(document) for document in documents)


def _csv(records: Sequence[UsageRecord]) -> str:
    out = io.StringIO()
    names = [field.name for field in fields(UsageRecord)]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    time_column = names.index("time")
    for record in records:
        row = [getattr(record, name) for name in names]
        row[time_column] = rfc3339(record.time)
        writer.writerow(row)
    return out.getvalue()
