"""meshtoll's benchmark: requests/s and latency through a real Envoy, as ratios to baselines
measured in the same run (the machine is shared and noisy, absolute numbers drift).

    python bench/run.py [--duration S] [--connections N] [--workers N] [--json FILE] [--only a,c]

Rows: (a) Envoy alone, direct response; (b) Envoy + a zero-cost HTTP authz stub (a second
Envoy answering 200: the limit of any one-hop design); (c) meshtoll HTTP authz and (d)
meshtoll gRPC authz, API keys against a policy of 10,000 tenants; (e) gRPC authz +
Envoy's ratelimit filter calling meshtoll's RLS; (f) the fused HTTP authz with a
per-second limit and a daily quota on Redis; (g) (c) + the meter, every request
admitted and metered; (h) the full chain: fused HTTP authz with limits + the meter; (i) Envoy's
ratelimit filter as the only call to meshtoll, run as `meshtoll ratelimit` (the RLS alone). Each
row runs wrk with one thread against Envoy with one worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from rls_alone import run_rls_alone

from meshtoll.devstack import LocalStack, RedisServer, StackConfig, find_envoy

TENANTS = 10_000
BENCH_KEY = "bench-key-4242"  # tenant t4242's key: any tenant would do
LIMITED_KEY = "bench-limited-key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Row:
    name: str
    setup: str
    listener: str
    path: str = "/v1/items"
    key: str | None = BENCH_KEY
    meshtoll: bool = True  # whether meshtoll's CPU time belongs to this row
    headers: tuple[str, ...] = ()  # more request headers, "name: value"


ROWS = [
    Row("a", "Envoy alone (direct response)", "listen_direct_port", key=None, meshtoll=False),
    Row("b", "Envoy + zero-cost HTTP authz stub", "listen_stub_authz_port", meshtoll=False),
    Row("c", "meshtoll HTTP authz (API key, 10k tenants)", "listen_http_authz_port"),
    Row("d", "meshtoll gRPC authz (API key, 10k tenants)", "listen_grpc_authz_port"),
    Row("e", "meshtoll gRPC authz + RLS filter (Redis)", "listen_rls_port", "/rls/items", LIMITED_KEY),
    Row(
        "f",
        "fused HTTP authz + per-second limit + daily quota (Redis)",
        "listen_http_authz_port",
        key=LIMITED_KEY,
    ),
    # The meter bills only requests authz admitted (an access-log entry settles an
    # admission), so metering is measured behind authz: (c) plus the meter, on a tenant
    # without limits. Identity headers sent by a client are stripped before any logger.
    Row("g", "meshtoll HTTP authz + meter, every request metered (Redis)", "listen_full_port"),
    Row("h", "full chain: fused HTTP authz with limits + meter (Redis)", "listen_full_port", key=LIMITED_KEY),
    # Its own Envoy and `meshtoll ratelimit` (bench/rls_alone.py), not the stack's.
    Row("i", "Envoy ratelimit filter -> meshtoll ratelimit alone (strict, Redis)", "", key=BENCH_KEY),
]
TARGETS: dict[str, tuple[str, float]] = {
    "c": ("b", 0.80),
    "d": ("b", 0.40),
    "e": ("b", 0.30),
    "f": ("b", 0.70),
    "g": ("c", 0.75),
}


@dataclass
class Measurement:
    row: str
    setup: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int
    meshtoll_cpu_us_per_request: float | None


def write_policy(directory: Path) -> Path:
    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    lines = [
        "plans:",
        "  pro: {}",
        "  metered:",
        "    limits: [{requests: 1000000000, per: second}, {requests: 100000000000, per: day, name: daily}]",
        "tenants:",
        f"  limited: {{plan: metered, api_keys: [{{id: limited, sha256: {sha(LIMITED_KEY)}}}]}}",
    ]
    for index in range(TENANTS):
        key = BENCH_KEY if index == 4242 else f"bench-key-{index:05d}"
        lines.append(f"  t{index}: {{plan: pro, api_keys: [{{id: t{index}, sha256: {sha(key)}}}]}}")
    lines.append("routes: [{prefix: /rls/, name: rls, enforced_in: service}, {prefix: /v1/, name: v1}]")
    path = directory / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, headers: list[str], seconds: float, connections: int) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    latency = _latencies(output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": float(_field(r"Requests/sec:\s+([\d.]+)", output)),
        "requests": float(_field(r"(\d+) requests in", output)),
        "p50": latency["50"],
        "p99": latency["99"],
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def _field(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"wrk output without {pattern!r}:\n{text}")
    return found.group(1)


def _latencies(output: str) -> dict[str, float]:
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        percentile: float(value) * scale[unit]
        for percentile, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }


def process_tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants (meshtoll's workers)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        pending += [int(child) for child in children]
    return total


def measure(stack: LocalStack, row: Row, seconds: float, connections: int) -> Measurement:
    url = stack.url(row.listener, row.path)
    return measure_at(url, stack.children["meshtoll"].pid, row=row, seconds=seconds, connections=connections)


def measure_at(url: str, meshtoll_pid: int, *, row: Row, seconds: float, connections: int) -> Measurement:
    headers = [*row.headers, *([f"x-api-key: {row.key}"] if row.key is not None else [])]
    wrk(url, headers, min(2.0, seconds), connections)  # warm-up: connections and caches
    cpu_before = process_tree_cpu_seconds(meshtoll_pid)
    result = wrk(url, headers, seconds, connections)
    cpu = process_tree_cpu_seconds(meshtoll_pid) - cpu_before
    per_request = cpu / result["requests"] * 1e6 if row.meshtoll and result["requests"] else None
    return Measurement(
        row.name, row.setup, result["rps"], result["p50"], result["p99"], int(result["non_2xx"]),
        int(result["requests"]), per_request,
    )  # fmt: skip


def table(measurements: list[Measurement]) -> str:
    by_name = {m.row: m for m in measurements}

    def ratio(m: Measurement, base: str) -> str:
        return f"{m.requests_per_second / by_name[base].requests_per_second:.0%}" if base in by_name else "-"

    lines = [
        "| row | setup | requests/s | p50 ms | p99 ms | non-2xx | meshtoll µs CPU/req | vs (a) | vs (b) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in measurements:
        cpu = "-" if m.meshtoll_cpu_us_per_request is None else f"{m.meshtoll_cpu_us_per_request:.0f}"
        lines.append(
            f"| ({m.row}) | {m.setup} | {m.requests_per_second:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
            f"{m.non_2xx} | {cpu} | {ratio(m, 'a')} | {ratio(m, 'b')} |"
        )
    lines.append("")
    for name, (base, target) in TARGETS.items():
        if name in by_name and base in by_name:
            achieved = by_name[name].requests_per_second / by_name[base].requests_per_second
            verdict = "met" if achieved >= target else "missed"
            lines.append(f"- target ({name}) >= {target:.0%} of ({base}): {achieved:.0%}, {verdict}")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    envoy = subprocess.run([str(find_envoy()), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "envoy": envoy.split("version: ")[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="meshtoll worker processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", default="", help="comma-separated rows, e.g. a,b,c")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else {row.name for row in ROWS}
    progress: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="meshtoll-bench-") as directory, RedisServer() as redis:
        policy = write_policy(Path(directory))
        config = StackConfig(policy=policy, redis_url=redis.url, authz_stub=True, workers=args.workers)
        measurements = []
        stack_rows = [row for row in ROWS if row.name in wanted and row.listener]
        if stack_rows:
            with LocalStack(config) as stack:
                for row in stack_rows:
                    progress(f"({row.name}) {row.setup} ...")
                    measurements.append(measure(stack, row, args.duration, args.connections))
        for row in ROWS:
            if row.name in wanted and not row.listener:
                progress(f"({row.name}) {row.setup} ...")
                measurements.append(
                    run_rls_alone(
                        redis.url,
                        partial(measure_at, row=row, seconds=args.duration, connections=args.connections),
                    )
                )
    report = table(measurements)
    print(report)
    if args.json is not None:
        document = {
            "machine": machine(),
            "settings": {"duration": args.duration, "connections": args.connections, "workers": args.workers},
            "rows": [asdict(m) for m in measurements],
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
