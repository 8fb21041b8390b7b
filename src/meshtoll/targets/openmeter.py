"""OpenMeter: `POST /api/v1/events` with a CloudEvents batch (`application/cloudevents-batch+json`,
a JSON array), which it answers 204 for all or a 400 problem for the batch. OpenMeter
deduplicates on source + id, for 24 hours by default (its sink's dedupe expiration): the
source is configurable for deployments that share an OpenMeter."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson

from meshtoll.sinks.delivery import REFUSED, Delivery, Refusal
from meshtoll.sinks.events import cloudevent
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

TOKEN_VARIABLE = "MESHTOLL_OPENMETER_TOKEN"
BATCH_SIZE = 100
DEDUP_SECONDS = 24 * 3600.0


class OpenMeterSink:
    target: Target = "openmeter"
    max_batch = BATCH_SIZE
    dedup_seconds: float | None = DEDUP_SECONDS

    def __init__(
        self,
        url: str,
        token: str | None,
        names: Callable[[], BillingNames],
        source: str,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self._url = url.rstrip("/") + "/api/v1/events"
        self._headers = {"content-type": "application/cloudevents-batch+json", **bearer(token)}
        self._names = names
        self._source = source
        self._client = TargetClient(timeout)

    def refusal_before_sending(self, record: UsageRecord, now: float) -> Refusal | None:
        return None

    async def deliver(self, records: Sequence[UsageRecord]) -> Delivery:
        names = self._names()
        body = orjson.dumps([cloudevent(record, names, self._source) for record in records])
        answer = await self._client.post(self._url, self._headers, content=body)
        response = settled_by_status(answer, len(records))
        if isinstance(response, Delivery):
            return response
        if len(records) > 1:  # one bad event refuses the batch: find it
            return await in_halves(self.deliver, records)
        return Delivery(refused={0: Refusal(REFUSED, answer_text(response), response.status_code)})

    async def close(self) -> None:
        await self._client.close()
