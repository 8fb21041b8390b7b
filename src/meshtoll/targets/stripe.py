"""Stripe meter events, two ways:

- the v2 meter event stream (the default): a session (`POST /v2/billing/meter_event_session`
  with the API key) gives a token valid 15 minutes, renewed a minute before it expires or
  at once when Stripe says it has (401 `billing_meter_event_session_expired`); batches of
  at most 100 go to `POST /v2/billing/meter_event_stream` with the token. Stripe validates
  them after answering, so a 200 is delivery and what it rejects later shows in its
  dashboard and webhooks (`v1.billing.meter.error_report_triggered`).
- `/v1/billing/meter_events`, form-encoded, one event a call: the fallback
  (`--stripe-api v1`), validated at once.

`identifier` is the request id; Stripe recognises it for 24 hours only, and a duplicate
within them is refused ("An event already exists with identifier ...") as a success.
Events older than 35 days are refused by Stripe: meshtoll quarantines them with the reason
before sending, a little early rather than a little late.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime

import httpx
import orjson

from meshtoll.sinks.delivery import REFUSED, TOO_OLD, Delivery, Refusal, Retry
from meshtoll.sinks.events import rfc3339, stripe_form_event, stripe_stream_event
from meshtoll.sinks.names import BillingNames, StripeApi, Target
from meshtoll.targets.http import (
    TIMEOUT_SECONDS,
    TargetClient,
    all_delivered,
    answer_text,
    bearer,
    in_halves,
    not_about_the_records,
)
from meshtoll.usage.records import UsageRecord

API_KEY_VARIABLE = "MESHTOLL_STRIPE_API_KEY"
STRIPE_API_URL = "https://api.stripe.com"
# Stripe serves the v2 stream from its own host; a URL other than Stripe's (a proxy, a test
# receiver) serves both.
STRIPE_METER_EVENTS_URL = "https://meter-events.stripe.com"
STRIPE_VERSION = (
    "2024-09-30.acacia"  # the API version that made the v2 meter event stream generally available
)
BATCH_SIZE = 100
DEDUP_SECONDS = 24 * 3600.0
OLDEST_SECONDS = 35 * 86400.0  # Stripe takes events of the past 35 calendar days
OLDEST_MARGIN_SECONDS = 3600.0  # quarantined an hour early: clocks differ, batches wait
RENEW_BEFORE_SECONDS = 60.0
SESSION_EXPIRED = "billing_meter_event_session_expired"


class StripeSink:
    target: Target = "stripe"
    dedup_seconds: float | None = DEDUP_SECONDS

    def __init__(
        self,
        url: str,
        api_key: str | None,
        names: Callable[[], BillingNames],
        api: StripeApi = "v2",
        timeout: float = TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        base = url.rstrip("/")
        self._api_url = base
        self._events_url = STRIPE_METER_EVENTS_URL if base == STRIPE_API_URL else base
        self._key_headers = bearer(api_key)
        self._names = names
        self._api = api
        self._clock = clock
        self._client = TargetClient(timeout)
        self._session: tuple[str, float] | None = None  # (token, expires at)
        self.max_batch = BATCH_SIZE if api == "v2" else 1
        self.sessions_opened = 0

    def refusal_before_sending(self, record: UsageRecord, now: float) -> Refusal | None:
        if record.time >= now - OLDEST_SECONDS + OLDEST_MARGIN_SECONDS:
            return None
        answer = f"Stripe takes meter events of the past 35 days only; this one is of {rfc3339(record.time)}"
        return Refusal(TOO_OLD, answer)

    async def deliver(self, records: Sequence[UsageRecord]) -> Delivery:
        if self._api == "v1":
            return (
                await self._deliver_form(records[0])
                if len(records) == 1
                else await in_halves(self.deliver, records)
            )
        return await self._deliver_stream(records)

    async def _deliver_stream(self, records: Sequence[UsageRecord], renewed: bool = False) -> Delivery:
        token = await self._token()
        if isinstance(token, Retry):
            return Delivery(retry=token)
        names = self._names()
        body = orjson.dumps({"events": [stripe_stream_event(record, names) for record in records]})
        headers = {"content-type": "application/json", "stripe-version": STRIPE_VERSION, **bearer(token)}
        response = await self._client.post(
            f"{self._events_url}/v2/billing/meter_event_stream", headers, content=body
        )
        if isinstance(response, Retry):
            return Delivery(retry=response)
        if response.is_success:
            return all_delivered(len(records))
        if response.status_code == 401 and _error_code(response) == SESSION_EXPIRED and not renewed:
            self._session = None
            return await self._deliver_stream(records, renewed=True)
        retry = not_about_the_records(response) or _should_retry(response)
        if retry is not None:
            return Delivery(retry=retry)
        if len(records) > 1:
            return await in_halves(self._deliver_stream, records)
        return Delivery(refused={0: Refusal(REFUSED, answer_text(response), response.status_code)})

    async def _token(self) -> str | Retry:
        """The session's token, a new session's when it expires within a minute."""
        if self._session is not None and self._session[1] - self._clock() > RENEW_BEFORE_SECONDS:
            return self._session[0]
        url = f"{self._api_url}/v2/billing/meter_event_session"
        headers = {"stripe-version": STRIPE_VERSION, **self._key_headers}
        response = await self._client.post(url, headers)
        if isinstance(response, Retry):
            return response
        if not response.is_success:
            return Retry(f"meter event session: HTTP {response.status_code} {answer_text(response)[:200]}")
        try:
            document = orjson.loads(response.content)
            token, expires = document["authentication_token"], document["expires_at"]
            expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            return Retry("meter event session: an answer without a token and its expiry")
        self._session = (str(token), expires_at)
        self.sessions_opened += 1
        return self._session[0]

    async def _deliver_form(self, record: UsageRecord) -> Delivery:
        fields = stripe_form_event(record, self._names())
        url = f"{self._api_url}/v1/billing/meter_events"
        response = await self._client.post(url, self._key_headers, data=dict(fields))
        if isinstance(response, Retry):
            return Delivery(retry=response)
        if response.is_success or _is_duplicate(response):
            return all_delivered(1)
        retry = not_about_the_records(response) or _should_retry(response)
        if retry is not None:
            return Delivery(retry=retry)
        return Delivery(refused={0: Refusal(REFUSED, answer_text(response), response.status_code)})

    async def close(self) -> None:
        await self._client.close()


def _error(response: httpx.Response) -> dict[str, object]:
    try:
        error = orjson.loads(response.content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_code(response: httpx.Response) -> object:
    return _error(response).get("code")


def _is_duplicate(response: httpx.Response) -> bool:
    """Stripe's answer to an identifier it already holds: a 400 with this message."""
    message = _error(response).get("message")
    return (
        response.status_code == 400
        and isinstance(message, str)
        and "already exists with identifier" in message
    )


def _should_retry(response: httpx.Response) -> Retry | None:
    """Stripe says in a header whether a retry may succeed where the status does not."""
    if response.headers.get("stripe-should-retry") == "true":
        return Retry(f"HTTP {response.status_code}, Stripe-Should-Retry")
    return None
