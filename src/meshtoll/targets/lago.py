"""Lago: `POST /api/v1/events/batch` with `{"events": [...]}`, at most 100. Lago validates
the whole batch and writes it in one transaction, so one bad event (or one transaction_id
it already holds, `value_already_exist`) makes it answer 422 for all, naming each event's
problems by its index. A known transaction_id is a success for that event (delivered
before: once in effect); events with other problems are refused with them; the rest,
rolled back with the batch, go again at once. Lago keeps transaction ids for good."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
import orjson

from meshtoll.sinks.delivery import REFUSED, Delivery, Refusal
from meshtoll.sinks.events import lago_event
from meshtoll.sinks.names import BillingNames, Target
from meshtoll.targets.http import (
    TIMEOUT_SECONDS,
    TargetClient,
    answer_text,
    bearer,
    in_halves,
    settled_by_status,
)
from meshtoll.usage.records import UsageRecord

API_KEY_VARIABLE = "MESHTOLL_LAGO_API_KEY"
BATCH_SIZE = 100  # Lago's LAGO_EVENTS_BATCH_MAX_LENGTH default
KNOWN_TRANSACTION = "value_already_exist"


class LagoSink:
    target: Target = "lago"
    max_batch = BATCH_SIZE
    dedup_seconds: float | None = None

    def __init__(
        self,
        url: str,
        api_key: str | None,
        names: Callable[[], BillingNames],
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self._url = url.rstrip("/") + "/api/v1/events/batch"
        self._headers = {"content-type": "application/json", **bearer(api_key)}
        self._names = names
        self._client = TargetClient(timeout)

    def refusal_before_sending(self, record: UsageRecord, now: float) -> Refusal | None:
        return None

    async def deliver(self, records: Sequence[UsageRecord]) -> Delivery:
        names = self._names()
        body = orjson.dumps({"events": [lago_event(record, names) for record in records]})
        answer = await self._client.post(self._url, self._headers, content=body)
        response = settled_by_status(answer, len(records))
        if isinstance(response, Delivery):
            return response
        problems = _problems_by_index(response, len(records))
        if problems is None:  # not a per-event answer (a 400, no events named)
            if len(records) > 1:
                return await in_halves(self.deliver, records)
            return Delivery(refused={0: Refusal(REFUSED, answer_text(response), response.status_code)})
        return await self._after_problems(records, problems, response.status_code)

    async def _after_problems(
        self, records: Sequence[UsageRecord], problems: dict[int, dict[str, list[str]]], status: int
    ) -> Delivery:
        known = {index for index, fields in problems.items() if _only_known_transaction(fields)}
        refused = {
            index: Refusal(REFUSED, orjson.dumps(fields).decode(), status)
            for index, fields in problems.items()
            if index not in known
        }
        rest = [index for index in range(len(records)) if index not in problems]
        if not rest:
            return Delivery(frozenset(known), refused)
        again = await self.deliver([records[index] for index in rest])
        return Delivery(
            frozenset(known) | {rest[index] for index in again.delivered},
            {**refused, **{rest[index]: refusal for index, refusal in again.refused.items()}},
            again.retry,
        )

    async def close(self) -> None:
        await self._client.close()


def _problems_by_index(response: httpx.Response, size: int) -> dict[int, dict[str, list[str]]] | None:
    """Lago's 422 `error_details`: {"<index>": {"<field>": ["<code>", ...]}}; None when the
    answer names no event of the batch."""
    try:
        details = orjson.loads(response.content).get("error_details")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(details, dict):
        return None
    found: dict[int, dict[str, list[str]]] = {}
    for key, fields in details.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < size and isinstance(fields, dict)):
            return None
        found[int(key)] = {
            str(name): [str(code) for code in codes] if isinstance(codes, list) else [str(codes)]
            for name, codes in fields.items()
        }
    return found or None


def _only_known_transaction(fields: dict[str, list[str]]) -> bool:
    return fields == {"transaction_id": [KNOWN_TRANSACTION]}
