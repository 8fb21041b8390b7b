"""A circuit breaker: after repeated failures, stop calling a dead dependency for a while.

Closed: calls go through. After `threshold` consecutive failures it opens: calls fail at
once, without waiting on the network, for `cooldown` seconds. Then one call is let through
as a probe; its success closes the breaker, its failure opens it again. Clock injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self, threshold: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allows(self) -> bool:
        """May a call go through now? While open, only one probe after the cooldown."""
        if not self.is_open:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False

    def abandoned(self) -> None:
        """The caller gave up on a call (it was cancelled): says nothing about the dependency,
        but a probe that was cancelled must not keep the breaker from probing again."""
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self.is_open:
            self._open_until = self._clock() + self.cooldown
