"""Settings of `meshtoll serve`: one object, built from flags or the environment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from meshtoll.counting.store import FAILURE_MODES
from meshtoll.errors import ConfigError
from meshtoll.transport.http_listener import HttpLimits

_HTTP = HttpLimits(max_connections=0)  # the defaults of the HTTP timeouts live there


@dataclass(frozen=True, slots=True)
class Settings:
    policy: Path = Path("policy.yaml")
    host: str = "0.0.0.0"
    grpc_port: int = 8081
    http_authz_port: int = 8082
    admin_port: int = 8090
    redis_url: str | None = None
    workers: int = 1
    policy_poll_seconds: float = 1.0
    ratelimit_config: Path | None = None  # a directory of envoyproxy/ratelimit YAML files
    ratelimit_failure_mode: str = "open"  # when the store cannot answer: allow, or refuse
    ratelimit_shadow_mode: bool = False  # evaluate and count every limit, enforce none
    # envoyproxy/ratelimit configuration domains: answered exactly as it answers ("strict"),
    # or counted meshtoll's way ("meshtoll": all or nothing, calendar months).
    ratelimit_compat: str = "strict"
    # Domains answered otherwise than ratelimit_compat says: (domain, "strict" | "meshtoll").
    ratelimit_compat_domains: tuple[tuple[str, str], ...] = ()
    redis_timeout_ms: int = 50
    reconcile_grace_seconds: float = 30.0  # how long an admission waits for its access-log record
    # How long the usage ledger keeps records for export; the period counters invoices read
    # keep their own, longer retention.
    ledger_retention_days: int = 400
    # Bearer token for the admin port's /api/*; without one, /api/* answers loopback clients
    # only. Kept out of repr so that a logged Settings does not carry it.
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    # TLS on the gRPC and HTTP authz ports (PEM files); with a client CA, mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bounds on the HTTP authz and admin ports' connections (see transport/http_listener.py): a request
    # must arrive within the header timeout, a connection idle this long closes.
    http_header_timeout_seconds: float = _HTTP.header_timeout_seconds
    http_idle_timeout_seconds: float = _HTTP.idle_timeout_seconds
    http_max_connections: int = 0  # 0: half the process's file descriptors, at most 10,000
    # The admin port's own cap, so that /healthz answers while the authz port is flooded.
    admin_max_connections: int = 256
    # A directory where meshtoll also listens on Unix domain sockets (server/listeners.py names
    # them), for an Envoy in the same pod: no TCP, no port a neighbour could reach.
    uds_dir: Path | None = None

    @staticmethod
    def env_name(field: str) -> str:
        return f"MESHTOLL_{field.upper()}"

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
        if self.ratelimit_compat not in ("strict", "meshtoll"):
            raise ConfigError(f"ratelimit_compat: {self.ratelimit_compat!r} is not one of strict, meshtoll")
        self._check_compat_domains()
        if self.reconcile_grace_seconds <= 0:
            raise ConfigError("reconcile_grace_seconds must be positive")
        if self.ledger_retention_days < 1:
            raise ConfigError(f"ledger_retention_days: {self.ledger_retention_days} must be at least 1")
        if self.redis_timeout_ms < 1:
            raise ConfigError("redis_timeout_ms must be at least 1")
        if self.admin_token is not None and not _is_token(self.admin_token):
            raise ConfigError("admin_token must be non-empty printable ASCII without spaces")
        self._check_tls()
        self._check_http_limits()
        if self.uds_dir is not None and self.workers != 1:
            # grpcio binds a Unix socket by its path in each worker; a second worker would
            # take the path over from the first rather than share it.
            raise ConfigError(
                f"uds_dir needs workers 1 (given {self.workers}): a socket path cannot be shared"
            )

    def _check_compat_domains(self) -> None:
        # A flag repeated arrives as a list; the frozen Settings keeps a tuple.
        object.__setattr__(self, "ratelimit_compat_domains", tuple(self.ratelimit_compat_domains))
        seen: set[str] = set()
        for domain, compat in self.ratelimit_compat_domains:
            if compat not in ("strict", "meshtoll"):
                raise ConfigError(
                    f"ratelimit_compat_domains: {compat!r} is not one of strict, meshtoll (domain {domain!r})"
                )
            if domain in seen:
                raise ConfigError(f"ratelimit_compat_domains: domain {domain!r} is given twice")
            seen.add(domain)

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


def compat_domains(raw: str) -> tuple[tuple[str, str], ...]:
    """`NAME=MODE[,NAME=MODE...]`, as --ratelimit-compat-domain and its variable are written."""
    pairs = []
    for item in raw.split(","):
        domain, equals, compat = item.strip().partition("=")
        if not equals or not domain:
            raise ValueError(f"{item!r} is not NAME=strict or NAME=meshtoll")
        pairs.append((domain, compat))
    return tuple(pairs)


def _boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


# How each setting is read from an environment variable's text.
_PARSERS: dict[str, Callable[[str], object]] = {
    "policy": Path,
    "ratelimit_config": Path,
    "tls_cert": Path,
    "tls_key": Path,
    "tls_client_ca": Path,
    "uds_dir": Path,
    "grpc_port": int,
    "http_authz_port": int,
    "admin_port": int,
    "workers": int,
    "http_header_timeout_seconds": float,
    "http_idle_timeout_seconds": float,
    "http_max_connections": int,
    "admin_max_connections": int,
    "redis_timeout_ms": int,
    "policy_poll_seconds": float,
    "reconcile_grace_seconds": float,
    "ledger_retention_days": int,
    "ratelimit_shadow_mode": _boolean,
    "ratelimit_compat_domains": compat_domains,
}


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
            values[field.name] = _PARSERS.get(field.name, str)(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a valid {field.name.replace('_', ' ')}") from None
    return Settings(**values)  # type: ignore[arg-type]
