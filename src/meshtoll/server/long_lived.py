"""What an instance builds to keep, put out of reach of the garbage collector's full collections.

CPython's full collection walks every object the collector tracks while the event loop waits.
The compiled policy and the run-time tenants are most of them, about eight per tenant: with
100,000 tenants some 800,000 objects and 300 to 400 ms a full collection on the benchmark
machine, longer than Envoy's ext_authz timeout (250 ms). Every decision in flight then failed
with Envoy's 503 on an instance that had said it was ready (bench row (c-rt), round 8: 32
failures, one per connection). Frozen once built, they are no longer walked.

An object frozen is still freed by reference counting when nothing holds it any more; only
reference cycles among frozen objects would stay. The policy and the tenant records hold none
(tests/test_long_lived.py), so freezing again after each reload keeps nothing of the version
it replaced; nor may anything else alive at a freeze end in a cycle when it goes, such as
the connections open then (an HTTP connection drops its parser when it closes). What a
reload freezes besides is the cyclic garbage the oldest generation gathered since its last
full collection (the young ones are collected first): bounded, and reloads are rare.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def keep_built(*, at_start: bool = False) -> None:
    """Freeze what the collector tracks now. `at_start`: no decision is being served yet, so a
    full collection first costs nobody a wait, and the start's garbage is not kept; after a
    reload only the young generations are collected (cheap), since a full collection would walk
    the whole new version once with decisions waiting: the very pause this avoids."""
    gc.collect(2 if at_start else 1)
    gc.freeze()


# gc's thresholds are C ints: the largest one the oldest generation's count never reaches.
NEVER = 2**31 - 1


class _FullCollectionsHeld:
    """The oldest generation's threshold, set to NEVER while at least one version is built.

    Thresholds are the process's: a file reload and a registry reload can overlap, so only
    the first to start sets it and only the last to end puts back what it was. Both run on
    the event loop (the file's compile thread is inside the window, not a user of it), so a
    plain counter is enough."""

    def __init__(self) -> None:
        self._builds = 0
        self._threshold = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self._builds == 0:
            young, middle, self._threshold = gc.get_threshold()
            gc.set_threshold(young, middle, NEVER)
        self._builds += 1
        try:
            yield
        finally:
            self._builds -= 1
            if self._builds == 0:
                young, middle, _ = gc.get_threshold()
                gc.set_threshold(young, middle, self._threshold)


building = _FullCollectionsHeld()
"""`with building():` around a reload, from its first new object to its `keep_built()`: no
full collection walks the half-built version while decisions wait (a registry reload of
100,000 tenants saw full collections of up to 212 ms, the file's compile thread stops the
event loop just the same). Young collections go on, so the reload's garbage is still
collected; whether the version is put in place, rejected, or fails, the threshold is
restored, and the full collection that then falls due walks only what was not frozen."""
