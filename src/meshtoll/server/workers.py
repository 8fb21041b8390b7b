"""Run `meshtoll serve` as several worker processes sharing its ports.

The parent binds the ports before any worker starts (server/listeners.py), so a port taken by
someone else is one clear error rather than a restart loop, and no stranger can join them;
each worker inherits the listening sockets (gRPC, HTTP, and the Unix sockets) and accepts from them.
Then the parent only supervises: it restarts a worker that dies, and passes SIGTERM/SIGINT
on so that each worker drains its servers. The workers share their metrics through a
directory it makes and removes (telemetry/workers.py): a scrape reaching any of them
answers for the group.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import secrets
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from meshtoll.server.app import run
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.server.lifecycle import announce_ports
from meshtoll.server.listeners import Listeners, bind_listeners
from meshtoll.settings import Settings
from meshtoll.telemetry.logs import configure_logging

log = logging.getLogger("meshtoll.server.workers")

RESTART_BACKOFF_SECONDS = 1.0
STOP_GRACE_SECONDS = 10.0


def serve_worker(settings: Settings, listeners: Listeners, metrics_dir: Path) -> None:
    configure_logging(settings.log_format)
    run_on_event_loop(run(settings, listeners, metrics_dir), settings.event_loop)


def supervise(settings: Settings) -> int:
    listeners = bind_listeners(settings)
    announce_ports(settings.ports_file, listeners.ports())
    metrics_dir = Path(tempfile.mkdtemp(prefix="meshtoll-metrics-"))
    try:
        return _supervise(settings, listeners, metrics_dir)
    finally:
        listeners.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, listeners: Listeners, metrics_dir: Path) -> int:
    context = multiprocessing.get_context("spawn")
    if settings.dashboard_secret is None:
        # One key for the whole group: a browser's next request may reach another worker.
        settings = dataclasses.replace(settings, dashboard_secret=secrets.token_hex(32))
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def start() -> BaseProcess:
        # multiprocessing passes the sockets' descriptors on to the spawned child.
        process = context.Process(target=serve_worker, args=(settings, listeners, metrics_dir), daemon=False)
        process.start()
        return process

    workers = [start() for _ in range(settings.workers)]
    while not stopping:
        time.sleep(0.2)
        for index, worker in enumerate(workers):
            if not worker.is_alive() and not stopping:
                log.error("worker %d exited with %s; restarting it", worker.pid, worker.exitcode)
                time.sleep(RESTART_BACKOFF_SECONDS)
                workers[index] = start()
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            worker.terminate()  # SIGTERM: the worker stops its servers gracefully
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
    return 0
