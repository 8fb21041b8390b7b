"""A billing sink's quarantine as the admin API serves it and `meshtoll usage quarantine
list` prints it: one function per form, so the two cannot differ."""

from __future__ import annotations

from typing import Any

from meshtoll.sinks.events import rfc3339
from meshtoll.sinks.state import Quarantined


def quarantine_document(sink: str, items: list[Quarantined]) -> dict[str, Any]:
    return {
        "sink": sink,
        "records": [
            {
                "key": item.key,
                "tenant": item.record.tenant,
                "request_id": item.record.request_id,
                "time": rfc3339(item.record.time),
                "units": item.record.units,
                "reason": item.refusal.reason,
                "status": item.refusal.status,
                "answer": item.refusal.answer,
                "quarantined_at": rfc3339(item.at),
            }
            for item in items
        ],
    }


def quarantine_table(document: dict[str, Any]) -> str:
    rows = [("key", "time", "reason", "status", "answer")]
    for item in document["records"]:
        status = "" if item["status"] is None else str(item["status"])
        rows.append((item["key"], item["time"], item["reason"], status, item["answer"][:80]))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)), row[4]])
        for row in rows
    ]
    lines.append(f"{len(document['records'])} record(s) quarantined for {document['sink']}")
    return "\n".join(line.rstrip() for line in lines)
