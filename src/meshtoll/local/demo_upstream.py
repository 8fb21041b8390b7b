"""The demo upstream: answers every request with what it received, as JSON.

`{"method": ..., "path": ..., "headers": {lower-case name: value}}` lets a test see what
Envoy forwarded (the x-meshtoll-* headers authz set, the ones it removed). With a `tokens=N`
query parameter the answer also reports usage the way LLM APIs do,
`"usage": {"prompt_tokens": ..., "completion_tokens": ..., "total_tokens": N}`, for the
usage-from-body hook; with `chunked=1` that answer comes chunked, without a content-length.
It is also the upstream of the benchmarks, so it runs on meshtoll's
lean HTTP server and nothing more.

    python -m meshtoll.local.demo_upstream --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from meshtoll.server.lifecycle import announce_ports
from meshtoll.transport.http_listener import listening_socket
from meshtoll.transport.http_server import response, serve_http

_JSON = (("content-type", "application/json"),)


def echo(method: str, target: str, headers: dict[str, str], peer: str) -> bytes:
    document: dict[str, object] = {"method": method, "path": target, "headers": headers}
    if "tokens=" in target:
        tokens = parse_qs(urlsplit(target).query).get("tokens", ["0"])[0]
        total = int(tokens) if tokens.isdigit() else 0
        prompt = total // 4
        document["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": total - prompt,
            "total_tokens": total,
        }
    body = json.dumps(document).encode()
    if "chunked=1" in target:
        head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        return head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return response(200, "OK", _JSON, body)


async def serve(host: str, port: int, ports_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then close the listening socket and return. The port
    bound (the kernel's choice for 0) goes to `ports_file` as {"port": N}."""
    sock = listening_socket(host, port)
    announce_ports(ports_file, {"port": sock.getsockname()[1]})
    server = await serve_http(echo, sock)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with server:
        await stopping.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshtoll.local.demo_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--ports-file", type=Path, default=None, help="write the port bound here as JSON")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.ports_file))


if __name__ == "__main__":
    main()
