"""µs of meshtoll CPU per admitted request that no access-log entry settles, in-process: what
rows (c) to (f) cost later, once reconciliation bills their admissions from Redis (read back,
turned into usage records, written to the ledger). The benchmark's rows leave this out
(bench/run.py's SERVE_ARGS: the grace outlasts the run), so it is measured here.

    python bench/reconcile_records.py [--decisions N] [--rate R] [--no-reconcile] [--repeat R]
                                      [--profile FILE]

Time is the schedule's, as in bench/meter_records.py: requests come at `--rate` a second,
the recorder flushes every FLUSH_SECONDS of it, and every second of it reconciliation runs as
meshtoll serve's Reconciler does (everything due more than the shipped grace ago, then the
backlog's count); at the end the schedule moves past the grace and what is left is billed.
--no-reconcile makes the same admissions and flushes and bills nothing: the difference is
reconciliation's own cost. Every run checks that each admission was billed once. Under
bench/instructions.py only this process is counted (not redis-server).
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from pathlib import Path

from meter_records import Schedule, request_id, start_time

from meshtoll.local.devstack import RedisServer
from meshtoll.meter.reconcile import reconcile
from meshtoll.server.event_loop import run_on_event_loop
from meshtoll.settings import Settings
from meshtoll.storage.usage_redis import RedisUsageStore
from meshtoll.usage.recorder import FLUSH_SECONDS, AdmissionRecorder
from meshtoll.usage.records import Admission

GRACE_SECONDS = Settings().reconcile_grace_seconds
TENANT = "limited"


async def reconcile_many(
    run: int, redis_url: str, decisions: int, rate: float, reconciling: bool, profile: Path | None
) -> float:
    """µs of this process's CPU per request, over `decisions` requests admitted (and billed
    by reconciliation)."""
    schedule = Schedule()
    # Redis's answers are waited for as long as they take: see bench/meter_records.py.
    usage = RedisUsageStore(redis_url, timeout_ms=600_000, clock=schedule)
    recorder = AdmissionRecorder(usage)
    flush_every, reconcile_every = int(rate * FLUSH_SECONDS), int(rate)
    billed = 0
    profiler = cProfile.Profile() if profile is not None else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    for n in range(decisions):
        schedule.now = start_time(n, rate)
        recorder.admit(Admission(request_id(run, n), schedule.now, TENANT, TENANT, "metered", "v1", "GET", 1))
        if (n + 1) % flush_every == 0:
            await recorder.flush(held=True)
        if reconciling and (n + 1 + reconcile_every // 2) % reconcile_every == 0:
            billed += await reconcile(usage, schedule.now, GRACE_SECONDS)
            await usage.backlog()
    await recorder.flush()
    if reconciling:
        schedule.now = start_time(decisions, rate) + GRACE_SECONDS + 1
        billed += await reconcile(usage, schedule.now, GRACE_SECONDS)
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    spent = time.process_time() - started
    try:
        if reconciling and (billed != decisions or await usage.backlog()):
            raise SystemExit(f"reconciliation billed {billed} of {decisions} admissions")
    finally:
        await usage.close()
    return spent / decisions * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20_000, help="requests admitted")
    parser.add_argument("--rate", type=float, default=10_000, help="requests a second, in schedule time")
    parser.add_argument("--no-reconcile", action="store_true", help="admissions and flushes only")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one run here")
    args = parser.parse_args(argv)
    with RedisServer() as redis:
        for run in range(1 if args.profile else args.repeat):
            billing = reconcile_many(
                run, redis.url, args.decisions, args.rate, not args.no_reconcile, args.profile
            )
            spent = run_on_event_loop(billing, args.event_loop)
            what = "admitted, not billed" if args.no_reconcile else "admitted and billed by reconciliation"
            print(f"{spent:.1f} µs CPU per request ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
