"""What every billing target's adapter shares: one HTTP connection pool per sink with a
bounded timeout on every call, and the reading of an answer that is not about the records:
a 408, 429 or 5xx, a timeout or a broken connection is tried again (after Retry-After);
401, 403, 404 and 405 say the URL or the credential is wrong, which no record can fix, so
they are tried again too (the lag shows it) rather than quarantining every record.

Credentials travel in the Authorization header only: never in a URL, a log line or an
error (the answers kept are the target's bodies, and targets do not echo credentials)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx

from meshtoll.sinks.delivery import Delivery, Retry

TIMEOUT_SECONDS = 10.0  # a call's connect, write, read and pool waits, each
MAX_ANSWER_CHARS = 1000  # of a refusal's body, kept with the quarantined record
# Answers that are about the request as a whole: the URL, the credential, the method.
_CONFIGURATION = {401: "the credential", 403: "the credential", 404: "the URL", 405: "the URL"}
Item = TypeVar("Item")


class TargetClient:
    def __init__(self, timeout: float = TIMEOUT_SECONDS) -> None:
        # No redirects: a target that moves would take the credential along to another host.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=False, headers={"user-agent": "meshtoll"}
        )

    async def post(self, url: str, headers: dict[str, str], **body: Any) -> httpx.Response | Retry:
        """The target's answer, or a Retry when none came (timeout, connection)."""
        try:
            return await self._client.post(url, headers=headers, **body)
        except httpx.TimeoutException:
            return Retry("timeout")
        except httpx.HTTPError as exc:  # connection refused or reset, a protocol error
            return Retry(f"no answer ({type(exc).__name__})")

    async def close(self) -> None:
        await self._client.aclose()


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


def not_about_the_records(response: httpx.Response) -> Retry | None:
    """A Retry for an answer that says nothing about the records themselves."""
    status = response.status_code
    if status in (408, 429) or status >= 500:
        return Retry(f"HTTP {status}", retry_after(response))
    if status in _CONFIGURATION:
        return Retry(f"HTTP {status}: check {_CONFIGURATION[status]}", retry_after(response))
    return None


def retry_after(response: httpx.Response, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After in seconds: a number of seconds, or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - now())


def answer_text(response: httpx.Response) -> str:
    return response.text[:MAX_ANSWER_CHARS]


async def in_halves(
    deliver: Callable[[Sequence[Item]], Awaitable[Delivery]], items: Sequence[Item]
) -> Delivery:
    """Deliver a batch the target refused as a whole in two halves, and so on down to the
    records it refuses alone: the others go through, the refused are found. A half that
    must wait leaves the rest waiting with it."""
    middle = len(items) // 2
    first = await deliver(items[:middle])
    if first.retry is not None:
        return first
    second = await deliver(items[middle:])
    return Delivery(
        first.delivered | {middle + index for index in second.delivered},
        {**first.refused, **{middle + index: refusal for index, refusal in second.refused.items()}},
        second.retry,
    )


def all_delivered(size: int) -> Delivery:
    return Delivery(frozenset(range(size)))


def settled_by_status(answer: httpx.Response | Retry, size: int) -> Delivery | httpx.Response:
    """The delivery of a batch of `size` when the answer settles it whatever the records
    (no answer, a success, an answer not about them); else the answer, to be read."""
    if isinstance(answer, Retry):
        return Delivery(retry=answer)
    if answer.is_success:
        return all_delivered(size)
    retry = not_about_the_records(answer)
    return answer if retry is None else Delivery(retry=retry)
