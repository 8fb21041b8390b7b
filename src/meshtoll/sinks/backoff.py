"""How long to wait before trying a target again: capped exponential backoff with full
jitter (a delay drawn between 0 and base x 2^attempt, at most `cap`), so that the instances
and targets recovering together do not retry in step; a Retry-After the target sent is
honoured as the least wait. Pure: the randomness is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A Retry-After longer than this is taken as this: a target that asks for a day means
# something is wrong, and the lag metric is where a person sees it.
MAX_RETRY_AFTER_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, random: Callable[[], float]) -> float:
        """The wait before attempt `attempt + 1` (attempt 0 is the first try that failed);
        `random` draws from [0, 1)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt, 62))
        jittered: float = ceiling * random()
        if retry_after is None:
            return jittered
        return max(min(retry_after, MAX_RETRY_AFTER_SECONDS), jittered)


DEFAULT_BACKOFF = Backoff()
