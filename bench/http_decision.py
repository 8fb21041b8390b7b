"""µs of meshtoll CPU per row-(c) request, in-process, from the bytes Envoy sends to the bytes
meshtoll answers: the lean HTTP server's connection (httptools' parse, the header callbacks),
the HTTP ext_authz handler and the Authorizer, for a tenant without limits, on connections
whose transport keeps nothing it is given. No sockets, no event loop turns, no Redis and no
admission recorder: what the decision and its parse cost, the part of row (c) that
bench/fused_decision.py (which starts at the handler and records admissions in Redis) does
not count.

    python bench/http_decision.py [--decisions N] [--repeat R]

Under bench/instructions.py it gives instructions per request, the figure row (c)'s levers
are judged by (bench/README.md, "Round 7: plain HTTP authz against nginx").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshtoll.authz.authorizer import Authorizer
from meshtoll.authz.http_transport import HttpAuthzHandler
from meshtoll.authz.jwks import JwksCache
from meshtoll.policy.reload import PolicyHolder
from meshtoll.transport.http_listener import HttpLimits, HttpListener, listening_socket
from meshtoll.transport.http_server import HttpProtocol

KEY = "plain-bench-key"
POLICY = f"""
plans:
  pro: {{}}
tenants:
  unlimited: {{plan: pro, api_keys: [{{id: unlimited, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]}}
routes: [{{prefix: /v1/, name: v1}}]
"""
CONNECTIONS = 32  # as the benchmark's Envoy keeps to meshtoll at wrk -c32
WARM_UP = 100 * CONNECTIONS


def envoy_check(number: int) -> bytes:
    """An HTTP ext_authz check as Envoy's shipped configuration sends it for row (c)."""
    return (
        "GET /v1/items HTTP/1.1\r\nhost: meshtoll-authz\r\ncontent-length: 0\r\n"
        f"x-api-key: {KEY}\r\nx-request-id: 2f1c7a4e-9b1d-4c55-8e3a-{number:012d}\r\n"
        "x-forwarded-for: 127.0.0.1\r\nx-meshtoll-peer-address: 127.0.0.1\r\n"
        "x-envoy-expected-rq-timeout-ms: 250\r\n\r\n"
    ).encode()


class _Dropped(asyncio.Transport):
    """A connection's transport that counts the answers written to it and keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.answers += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def decide_many(policy: Path, decisions: int) -> float:
    """µs of this process's CPU per request, over `decisions` spread over the connections."""
    handler = HttpAuthzHandler(Authorizer(PolicyHolder.from_file(policy), JwksCache(), transport="http"))
    # Bound to a loopback port but never started: the connections read only its coarse clock.
    sock = listening_socket("127.0.0.1", 0)
    listener = HttpListener(sock, lambda owner: HttpProtocol(handler, owner), HttpLimits(), None, b"")
    connections = []
    for _ in range(CONNECTIONS):
        transport = _Dropped()
        connection = HttpProtocol(handler, listener)
        connection.connection_made(transport)
        connections.append((connection, transport))
    checks = [envoy_check(number) for number in range(1000)]
    for number in range(WARM_UP):
        connections[number % CONNECTIONS][0].data_received(checks[number % 1000])
    started = time.process_time()
    for number in range(decisions):
        connections[number % CONNECTIONS][0].data_received(checks[number % 1000])
    spent = time.process_time() - started
    sock.close()
    answered = sum(transport.answers for _, transport in connections)
    if answered != WARM_UP + decisions:  # every request answered at once, in its own callback
        raise RuntimeError(f"{answered} answers to {WARM_UP + decisions} requests")
    return spent / decisions * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs, each reported")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        policy = Path(directory) / "policy.yaml"
        policy.write_text(POLICY)
        for _ in range(args.repeat):
            print(f"{asyncio.run(decide_many(policy, args.decisions)):.2f} µs CPU per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
