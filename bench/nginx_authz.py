"""Row (b2)'s authorization server: nginx answering `return 200;` to everything, the cheapest
HTTP server at hand, so that Envoy's HTTP ext_authz hop to it is the nearest measurable limit
of any one-hop design (row (b)'s second Envoy costs more per call than meshtoll's HTTP authz).

Debian's nginx: `apt-get install nginx` (or `nginx-light`). It is the benchmark's own
requirement, not the project's: only row (b2) needs it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshtoll.errors import ProcessStartError
from meshtoll.local.processes import Child, Probe, free_ports, listens, retrying_lost_ports

NGINX_INSTALL_HINT = (
    "row (b2) needs nginx: apt-get install nginx-light (Debian/Ubuntu), or run scripts/bench, which "
    "installs it, or leave b2 out of --only"
)

# One worker to match Envoy's one; no access log (it would be a write per request that
# meshtoll's authz does not make); keep-alive with no request cap, because nginx closes a
# connection after 1,000 requests by default and Envoy's pool would then reconnect mid-run.
# Every *_temp_path lives in the temporary prefix so that no root-owned directory is needed.
CONFIG = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 4294967295;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
}}
"""


def find_nginx() -> Path | None:
    # Debian installs it in /usr/sbin, which a non-root PATH often leaves out.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    return None if found is None else Path(found)


@contextmanager
def nginx_allow_all(directory: Path) -> Iterator[tuple[int, Child]]:
    """nginx on a loopback port, configured in `directory`; yields (port, process)."""
    binary = find_nginx()
    if binary is None:
        raise ProcessStartError(NGINX_INSTALL_HINT)
    config = directory / "nginx.conf"
    # -e: the start-up error log, before the configuration is read (else /var/log/nginx);
    # stderr, like the configuration's, so that the child's log says why it stopped.
    argv = [str(binary), "-p", str(directory), "-c", str(config), "-e", "stderr"]
    port = 0
    started: list[Child] = []

    def start() -> tuple[Child, Probe]:
        # nginx cannot choose its port and tell it: one from free_ports, another if taken.
        nonlocal port
        (port,) = free_ports(1)
        config.write_text(CONFIG.format(prefix=directory, port=port))
        started.append(Child("nginx", argv, directory / "nginx.out"))
        return started[-1], listens(started[-1], port)

    try:
        child = retrying_lost_ports(start, timeout=30)
        yield port, child
    finally:
        for each in started:
            each.stop()
