"""Logs: readable text lines by default (and in `meshtoll dev`), or one JSON object per line
(`--log-format json`) for a log pipeline: time, level, event, logger, process, and the
request id and trace id when the line is about one request (`extra={"request_id": ...,
"trace_id": ...}` at the call)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

import orjson

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
_CONTEXT = ("request_id", "trace_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        document: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "process": record.process,
        }
        for name in _CONTEXT:
            value = record.__dict__.get(name)
            if value:
                document[name] = str(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        # orjson: no newline can appear inside the object, so one line is one event.
        return orjson.dumps(document).decode()


def configure_logging(log_format: str = "text", stream: TextIO | None = None) -> None:
    """Every meshtoll log line to `stream` (stderr), at INFO, in `log_format`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
