"""Settings of `meshtoll serve`: one object, built from flags or the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from meshtoll.counting.store import COMPAT_MODES, FAILURE_MODES, Compat, FailureMode
from meshtoll.errors import ConfigError
from meshtoll.sinks.names import STRIPE_APIS, TARGETS
from meshtoll.sinks.state import MAX_CALL_SECONDS
from meshtoll.telemetry.logs import LOG_FORMATS
from meshtoll.telemetry.tenant_labels import parse_tenant_labels
from meshtoll.transport.http_listener import HttpLimits

# What `meshtoll serve` and `meshtoll ratelimit` may run on (server/event_loop.py).
EVENT_LOOPS = ("uvloop", "asyncio")
_HTTP = HttpLimits(max_connections=0)  # the defaults of the HTTP timeouts live there
Value = TypeVar("Value")


def setting(
    default: Value,
    help: str,
    parse: Callable[[str], object] = str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    secret: bool = False,
) -> Value:
    """A Settings field that knows its flag's help, and how to read its text (from a flag or
    an environment variable)."""
    metadata = {"help": help, "parse": parse, "flag": flag, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


def boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def compat_domains(raw: str) -> tuple[tuple[str, str], ...]:
    """`NAME=MODE[,NAME=MODE...]`, as --ratelimit-compat-domain and its variable are written."""
    pairs = []
    for item in raw.split(","):
        domain, equals, compat = item.strip().partition("=")
        if not equals or not domain:
            raise ValueError(f"{item!r} is not NAME=strict or NAME=meshtoll")
        pairs.append((domain, compat))
    return tuple(pairs)


def usage_sinks(raw: str) -> tuple[tuple[str, str], ...]:
    """`TARGET=URL[,TARGET=URL...]`, as --usage-sink and its variable are written."""
    pairs = []
    for item in raw.split(","):
        target, equals, url = item.strip().partition("=")
        if not equals or not target or not url:
            raise ValueError(f"{item!r} is not TARGET=URL (openmeter=URL, lago=URL or stripe=URL)")
        pairs.append((target, url))
    return tuple(pairs)


def utc_time(raw: str) -> float:
    """An ISO date or time, UTC unless it says otherwise, as Unix seconds."""
    moment = datetime.fromisoformat(raw)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def time_flag(text: str, flag: str) -> float:
    """utc_time for a command's flag: a ConfigError naming it when the text is no time."""
    try:
        return utc_time(text)
    except ValueError:
        example = "e.g. 2026-11-01 or 2026-11-01T12:00"
        raise ConfigError(f"{flag} {text!r} is not an ISO date or time ({example})") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Every field is a `meshtoll serve` flag (--field-name) and an environment variable
    (MESHTOLL_FIELD_NAME), both generated from the field: its help and parser live here."""

    policy: Path = setting(Path("policy.yaml"), "the tenant policy file", Path)
    host: str = setting("0.0.0.0", "address every port listens on (0.0.0.0: Envoy may be in another pod)")
    grpc_port: int = setting(8081, "gRPC port: ext_authz Check, RLS, access logs, ext_proc, health", int)
    http_authz_port: int = setting(8082, "HTTP ext_authz port (the fast path)", int)
    admin_port: int = setting(8090, "admin HTTP port: /healthz, /readyz, /metrics, /api/*", int)
    redis_url: str | None = setting(None, "Redis URL for shared state (without one: in memory, one process)")
    workers: int = setting(1, "worker processes sharing the ports", int)
    policy_poll_seconds: float = setting(1.0, "how often to check the policy file", float)
    ratelimit_config: Path | None = setting(None, "directory of envoyproxy/ratelimit YAML files", Path)
    ratelimit_failure_mode: FailureMode = setting(
        "open", "when Redis cannot answer: open (allow) or closed (refuse)"
    )
    ratelimit_shadow_mode: bool = setting(False, "evaluate and count every limit but enforce none", boolean)
    ratelimit_compat: Compat = setting(
        "strict",
        "envoyproxy/ratelimit configuration domains: strict (answer exactly as it does) or meshtoll "
        "(all or nothing, calendar months)",
    )
    ratelimit_compat_domains: tuple[tuple[str, Compat], ...] = setting(
        (),
        "answer domain NAME otherwise than --ratelimit-compat says: NAME=strict or NAME=meshtoll; repeat "
        "the flag for more (the variable: comma-separated)",
        compat_domains,
        flag="--ratelimit-compat-domain",
        metavar="NAME=MODE",
    )
    redis_timeout_ms: int = setting(50, "bound on each Redis round trip", int)
    # README: Token leases. Only with Redis: one process with its counters in memory needs none.
    lease_max: int = setting(
        16,
        "decisions one token lease covers (hits reserved in Redis only if they fit under every limit, "
        "spent in memory: never overshoots, may under-admit); 1: every decision one Redis round trip",
        int,
    )
    reconcile_grace_seconds: float = setting(30.0, "how long an admission waits for its access log", float)
    # The period counters invoices read keep their own, longer retention.
    ledger_retention_days: int = setting(400, "how long the usage ledger keeps records for export", int)
    # Kept out of repr so that a logged Settings does not carry it.
    admin_token: str | None = setting(
        None,
        "a write token of the admin port's /api/*, named admin (without any token, loopback clients "
        "only); prefer the environment variable: every local user can read a process's arguments",
        secret=True,
    )
    dashboard_secret: str | None = setting(
        None,
        "the key that signs the dashboard's session cookies (32+ characters); the same on every "
        "instance behind one address keeps a browser signed in whichever answers (default: random per "
        "process group, so a restart signs every browser out)",
        secret=True,
    )
    admin_tokens_file: Path | None = setting(
        None,
        "YAML file of admin tokens by name and scope (read or write), each as its SHA-256; watched and "
        "reloaded like the policy",
        Path,
    )
    tls_cert: Path | None = setting(None, "PEM certificate chain: TLS on the gRPC and HTTP authz ports", Path)
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert", Path)
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: require client certificates (mTLS)", Path)
    # Bounds on the HTTP ports' connections (transport/http_listener.py has the defaults).
    http_header_timeout_seconds: float = setting(
        _HTTP.header_timeout_seconds,
        "HTTP ports: a request must arrive within this time of its first byte, or get 408",
        float,
    )
    http_idle_timeout_seconds: float = setting(
        _HTTP.idle_timeout_seconds, "HTTP ports: close a keep-alive connection after this long idle", float
    )
    http_max_connections: int = setting(
        0,
        "HTTP authz port: open connections per process, more get 503 (0: half the file descriptors, "
        "at most 10000)",
        int,
    )
    # Its own cap, so that /healthz answers while the authz port is flooded.
    admin_max_connections: int = setting(256, "admin port: open connections per process", int)
    # No TCP, no port a neighbour could reach (server/listeners.py names the sockets).
    uds_dir: Path | None = setting(
        None, "also listen on Unix sockets grpc.sock and authz.sock here (for an Envoy in the same pod)", Path
    )
    event_loop: str = setting("uvloop", "uvloop (asyncio's own when uvloop is not installed) or asyncio")
    # README: Send usage to your billing system. Credentials come from the environment only.
    usage_sinks: tuple[tuple[str, str], ...] = setting(
        (),
        "deliver the usage ledger to a billing system as it grows: openmeter=URL, lago=URL or "
        "stripe=URL; repeat the flag for more (the variable: comma-separated); credentials from "
        "MESHTOLL_OPENMETER_TOKEN, MESHTOLL_LAGO_API_KEY, MESHTOLL_STRIPE_API_KEY",
        usage_sinks,
        flag="--usage-sink",
        metavar="TARGET=URL",
    )
    usage_sink_since: float | None = setting(
        None,
        "a sink with no checkpoint for a tenant starts with what its ledger was appended since this "
        "ISO date or time (default: the start of the current month, UTC)",
        utc_time,
        metavar="ISO",
    )
    usage_sink_timeout_seconds: float = setting(10.0, "bound on each call to a billing system", float)
    cloudevents_source: str = setting(
        "meshtoll", "the CloudEvents source of OpenMeter events (OpenMeter deduplicates on source + id)"
    )
    stripe_api: str = setting(
        "v2", "Stripe's meter events: v2 (the event stream, batches) or v1 (one a call)"
    )
    # How a caller that gave port 0 (the local stack, the tests) learns the kernel's choice.
    ports_file: Path | None = setting(
        None,
        'once its ports are bound, write them to this file as JSON ({"grpc_port": N, "http_authz_port": '
        'N, "admin_port": N})',
        Path,
    )
    log_format: str = setting("text", "log lines as readable text, or json: one object per line")
    # Tenants' names become label values only when asked: a bounded set, chosen here.
    metrics_tenant_labels: str = setting(
        "",
        "per-tenant series on /metrics: top:N (the N tenants with the most decisions) or NAME,NAME... "
        "(none by default)",
    )

    @staticmethod
    def env_name(field: str) -> str:
        return f"MESHTOLL_{field.upper()}"

    def shared_redis_url(self, why: str) -> str:
        """The Redis URL, for a command that reads what `meshtoll serve` keeps there;
        ConfigError saying `why` it needs one when none is given."""
        if self.redis_url is None:
            raise ConfigError(f"{why}: give --redis-url or MESHTOLL_REDIS_URL")
        return self.redis_url

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_authz_port", "admin_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name}: {port} is not a TCP port (0-65535)")
        if self.workers < 1:
            raise ConfigError(f"workers: {self.workers} must be at least 1")
        if self.policy_poll_seconds <= 0:
            raise ConfigError("policy_poll_seconds must be positive")
        if self.ratelimit_failure_mode not in FAILURE_MODES:
            raise ConfigError(
                f"ratelimit_failure_mode: {self.ratelimit_failure_mode!r} is not one of open, closed"
            )
        if self.ratelimit_compat not in COMPAT_MODES:
            raise ConfigError(f"ratelimit_compat: {self.ratelimit_compat!r} is not one of strict, meshtoll")
        self._check_compat_domains()
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format: {self.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        try:
            parse_tenant_labels(self.metrics_tenant_labels)
        except ValueError as exc:
            raise ConfigError(f"metrics_tenant_labels: {exc}") from None
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop: {self.event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
        if self.reconcile_grace_seconds <= 0:
            raise ConfigError("reconcile_grace_seconds must be positive")
        if self.ledger_retention_days < 1:
            raise ConfigError(f"ledger_retention_days: {self.ledger_retention_days} must be at least 1")
        if self.redis_timeout_ms < 1:
            raise ConfigError("redis_timeout_ms must be at least 1")
        if self.lease_max < 1:
            raise ConfigError(f"lease_max: {self.lease_max} must be at least 1 (1: no leases)")
        if self.admin_token is not None and not _is_token(self.admin_token):
            raise ConfigError("admin_token must be non-empty printable ASCII without spaces")
        if self.dashboard_secret is not None and len(self.dashboard_secret) < 32:
            raise ConfigError("dashboard_secret must be at least 32 characters (openssl rand -hex 32)")
        self._check_tls()
        self._check_http_limits()
        self._check_usage_sinks()

    def _check_compat_domains(self) -> None:
        # A flag repeated arrives as a list; the frozen Settings keeps a tuple.
        object.__setattr__(self, "ratelimit_compat_domains", tuple(self.ratelimit_compat_domains))
        seen: set[str] = set()
        for domain, compat in self.ratelimit_compat_domains:
            if compat not in COMPAT_MODES:
                raise ConfigError(
                    f"ratelimit_compat_domains: {compat!r} is not one of strict, meshtoll (domain {domain!r})"
                )
            if domain in seen:
                raise ConfigError(f"ratelimit_compat_domains: domain {domain!r} is given twice")
            seen.add(domain)

    def _check_usage_sinks(self) -> None:
        object.__setattr__(self, "usage_sinks", tuple(self.usage_sinks))
        seen: set[str] = set()
        for target, url in self.usage_sinks:
            if target not in TARGETS:
                raise ConfigError(f"usage_sinks: {target!r} is not one of {', '.join(TARGETS)}")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"usage_sinks: {target}'s URL {url!r} is not an http(s) URL")
            if parts.username is not None or parts.password is not None or parts.query:
                # A URL is logged and shown; credentials go in the environment.
                raise ConfigError(
                    f"usage_sinks: {target}'s URL carries a credential or a query: give the credential "
                    "in its MESHTOLL_* variable instead"
                )
            if target in seen:
                raise ConfigError(f"usage_sinks: {target} is given twice")
            seen.add(target)
        if not 0 < self.usage_sink_timeout_seconds <= MAX_CALL_SECONDS:
            # A call must fit well inside a sink's lease, or a second instance could take
            # the lease over while it runs.
            raise ConfigError(
                f"usage_sink_timeout_seconds: {self.usage_sink_timeout_seconds} must be above 0 and at "
                f"most {MAX_CALL_SECONDS:g}"
            )
        if self.stripe_api not in STRIPE_APIS:
            raise ConfigError(f"stripe_api: {self.stripe_api!r} is not one of {', '.join(STRIPE_APIS)}")
        if not self.cloudevents_source:
            raise ConfigError("cloudevents_source must not be empty")

    def _check_http_limits(self) -> None:
        for name in ("http_header_timeout_seconds", "http_idle_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.http_max_connections < 0:
            raise ConfigError(
                f"http_max_connections: {self.http_max_connections} must be 0 (automatic) or more"
            )
        if self.admin_max_connections < 1:
            raise ConfigError(f"admin_max_connections: {self.admin_max_connections} must be at least 1")

    def _check_tls(self) -> None:
        # A half configuration would silently serve plain text where TLS was meant.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both (or neither)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")


def _is_token(text: str) -> bool:
    # What fits in an `Authorization: Bearer` header unchanged: visible ASCII, no spaces.
    return text != "" and all("!" <= char <= "~" for char in text)


def settings_from(flags: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> Settings:
    """Flags win over MESHTOLL_* environment variables, which win over the defaults."""
    values: dict[str, object] = {}
    for field in fields(Settings):
        flag = flags.get(field.name)
        if flag is not None:
            values[field.name] = flag
            continue
        name = Settings.env_name(field.name)
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[field.name] = field.metadata["parse"](raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a valid {field.name.replace('_', ' ')}") from None
    return Settings(**values)  # type: ignore[arg-type]


def add_redis_url_flag(parser: argparse.ArgumentParser) -> None:
    """--redis-url for a command that reads what `meshtoll serve` keeps in Redis: None when
    not given, so that settings_from falls back to MESHTOLL_REDIS_URL as serve does."""
    parser.add_argument(
        "--redis-url", default=None, help="the Redis meshtoll serve uses (env MESHTOLL_REDIS_URL)"
    )


def add_policy_flag(parser: argparse.ArgumentParser) -> None:
    """--policy for a command that reads the policy `meshtoll serve` uses (MESHTOLL_POLICY)."""
    parser.add_argument("--policy", type=Path, default=None, help="policy file (env MESHTOLL_POLICY)")
