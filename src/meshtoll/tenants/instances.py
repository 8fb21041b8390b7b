"""Each instance reports itself to the registry: which registry version it has applied, so
that `GET /api/instances` proves a change landed everywhere (every instance at or past its
version); and, by reporting at all, that it is alive. One not heard of for EXPIRE_SECONDS
is dropped from the list."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from meshtoll.errors import StorageError
from meshtoll.registry.records import InstanceRecord
from meshtoll.registry.store import TenantRegistry
from meshtoll.tenants.installed import InstalledTenants

log = logging.getLogger("meshtoll.tenants")

HEARTBEAT_SECONDS = 2.0
EXPIRE_SECONDS = 10.0


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class InstanceReporter:
    def __init__(
        self,
        registry: TenantRegistry,
        installed: InstalledTenants,
        *,
        instance_id: str | None = None,
        every_seconds: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.id = instance_id or new_instance_id()
        self._registry = registry
        self._installed = installed
        self._every = every_seconds
        self._clock = clock
        self._started_at = clock()
        self._due = asyncio.Event()
        self._failing = False
        installed.on_change(lambda _: self._due.set())

    def record(self) -> InstanceRecord:
        installed = self._installed
        return InstanceRecord(
            self.id, socket.gethostname(), os.getpid(), self._started_at, installed.version, self._clock(),
            len(installed.skipped),
        )  # fmt: skip

    async def run_forever(self) -> None:
        while True:
            self._due.clear()
            try:
                await self._registry.heartbeat(self.record(), EXPIRE_SECONDS)
                self._failing = False
            except StorageError as exc:
                if not self._failing:
                    log.warning("cannot report this instance to the tenant registry: %s", exc)
                self._failing = True
            # A new version is reported at once: it is what proves a change has landed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self._every)
