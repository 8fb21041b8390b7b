"""Settings of `meshtoll ratelimit` (the RLS alone), read from envoyproxy/ratelimit's own
environment variables, so that a Deployment written for it runs by changing the image.

Variables with a meaning here are read with envoyproxy/ratelimit's defaults; BACKEND_TYPE other than
redis, Redis per-second instances and configuration over xDS (CONFIG_TYPE other than FILE)
are refused rather than silently ignored. The rest of envoyproxy/ratelimit's variables (statsd,
tracing, memcache settings...) are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from meshtoll.errors import ConfigError
from meshtoll.settings import EVENT_LOOPS


@dataclass(frozen=True, slots=True)
class RlsSettings:
    config_directory: Path  # RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY
    redis_url: str  # meshtoll's URL form (storage/urls.py) of REDIS_*
    redis_timeout_ms: int = 10_000
    host: str = "0.0.0.0"
    port: int = 8080  # HTTP: /healthcheck
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 8081
    debug_host: str = "0.0.0.0"
    debug_port: int = 6070  # /rlconfig, /metrics
    shadow_mode: bool = False
    local_cache: bool = False
    expiration_jitter_seconds: int = 300
    cache_key_prefix: str = ""
    stop_cache_key_increment_when_overlimit: bool = False
    ignore_dot_files: bool = False
    log_level: str = "WARN"
    log_format: str = "text"
    redis_health_check_active_connection: bool = False
    healthy_with_at_least_one_config_loaded: bool = False
    quota_mode: bool = False
    merge_domain_config: bool = False
    near_limit_ratio: float = 0.8
    response_dynamic_metadata: bool = False
    # LIMIT_RESPONSE_HEADERS_ENABLED: the limit, remaining and reset header names
    response_headers: tuple[str, str, str] | None = None
    # Not one of envoyproxy/ratelimit's variables: MESHTOLL_EVENT_LOOP, as `meshtoll serve` reads it.
    event_loop: str = "uvloop"
    # Nor this: MESHTOLL_PORTS_FILE, as serve's --ports-file (the ports bound, for port 0).
    ports_file: Path | None = None


def _boolean(raw: str) -> bool:
    # Go's strconv.ParseBool, as envconfig reads envoyproxy/ratelimit's booleans.
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(raw)


def _seconds(raw: str) -> float:
    """A Go duration such as 10s, 500ms, 1m (one unit), as REDIS_TIMEOUT is written."""
    for suffix, scale in (("ms", 0.001), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if raw.endswith(suffix):
            return float(raw.removesuffix(suffix)) * scale
    raise ValueError(raw)


def _event_loop(raw: str) -> str:
    if raw not in EVENT_LOOPS:
        raise ValueError(raw)
    return raw


def rls_settings_from(environ: Mapping[str, str] = os.environ) -> RlsSettings:
    def read(name: str, default: str, parse: Callable[[str], object] = str) -> object:
        raw = environ.get(name, "") or default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not valid") from None

    backend = str(read("BACKEND_TYPE", "redis")).lower()
    if backend != "redis":
        raise ConfigError(f"BACKEND_TYPE={backend!r}: meshtoll counts in Redis only")
    if read("REDIS_PERSECOND", "false", _boolean):
        raise ConfigError("REDIS_PERSECOND=true: a separate per-second Redis is not supported")
    # A Deployment that gets its limits over xDS would otherwise run on whatever files it has.
    config_type = str(read("CONFIG_TYPE", "FILE")).upper()
    if config_type != "FILE":
        raise ConfigError(f"CONFIG_TYPE={config_type!r}: meshtoll reads its limits from files only (FILE)")
    root = Path(str(read("RUNTIME_ROOT", "/srv/runtime_data/current")))
    directory = root / str(read("RUNTIME_SUBDIRECTORY", "")) / str(read("RUNTIME_APPDIRECTORY", "config"))
    return RlsSettings(
        config_directory=directory,
        redis_url=redis_url_of(environ),
        redis_timeout_ms=int(float(str(read("REDIS_TIMEOUT", "10s", _seconds))) * 1000),
        host=str(read("HOST", "0.0.0.0")),
        port=int(str(read("PORT", "8080", int))),
        grpc_host=str(read("GRPC_HOST", "0.0.0.0")),
        grpc_port=int(str(read("GRPC_PORT", "8081", int))),
        debug_host=str(read("DEBUG_HOST", "0.0.0.0")),
        debug_port=int(str(read("DEBUG_PORT", "6070", int))),
        shadow_mode=bool(read("SHADOW_MODE", "false", _boolean)),
        local_cache=int(str(read("LOCAL_CACHE_SIZE_IN_BYTES", "0", int))) > 0,
        expiration_jitter_seconds=int(str(read("EXPIRATION_JITTER_MAX_SECONDS", "300", int))),
        cache_key_prefix=str(read("CACHE_KEY_PREFIX", "")),
        stop_cache_key_increment_when_overlimit=bool(
            read("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "false", _boolean)
        ),
        ignore_dot_files=bool(read("RUNTIME_IGNOREDOTFILES", "false", _boolean)),
        log_level=str(read("LOG_LEVEL", "WARN")).upper(),
        log_format=str(read("LOG_FORMAT", "text")).lower(),
        redis_health_check_active_connection=bool(
            read("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "false", _boolean)
        ),
        healthy_with_at_least_one_config_loaded=bool(
            read("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "false", _boolean)
        ),
        quota_mode=bool(read("QUOTA_MODE", "false", _boolean)),
        merge_domain_config=bool(read("MERGE_DOMAIN_CONFIG", "false", _boolean)),
        near_limit_ratio=float(str(read("NEAR_LIMIT_RATIO", "0.8", float))),
        response_dynamic_metadata=bool(read("RESPONSE_DYNAMIC_METADATA", "false", _boolean)),
        response_headers=(
            str(read("LIMIT_LIMIT_HEADER", "RateLimit-Limit")),
            str(read("LIMIT_REMAINING_HEADER", "RateLimit-Remaining")),
            str(read("LIMIT_RESET_HEADER", "RateLimit-Reset")),
        )
        if read("LIMIT_RESPONSE_HEADERS_ENABLED", "false", _boolean)
        else None,
        event_loop=str(read("MESHTOLL_EVENT_LOOP", "uvloop", _event_loop)),
        ports_file=Path(environ["MESHTOLL_PORTS_FILE"]) if environ.get("MESHTOLL_PORTS_FILE") else None,
    )


def redis_url_of(environ: Mapping[str, str]) -> str:
    """REDIS_URL (host:port, or comma-separated nodes; for a Sentinel the master name first)
    with REDIS_SOCKET_TYPE, REDIS_TYPE, REDIS_AUTH ("password" or "user:password") and
    REDIS_TLS, as one meshtoll Redis URL."""
    url = environ.get("REDIS_URL", "") or "/var/run/nutcracker/ratelimit.sock"
    socket_type = (environ.get("REDIS_SOCKET_TYPE", "") or "unix").lower()
    kind = (environ.get("REDIS_TYPE", "") or "SINGLE").lower()
    tls = _boolean(environ.get("REDIS_TLS", "") or "false")
    auth = environ.get("REDIS_AUTH", "")
    user, colon, password = auth.partition(":")
    credentials = "" if not auth else f"{quote(user)}:{quote(password)}@" if colon else f"{quote(auth)}@"
    if socket_type == "unix":
        if tls or kind != "single":
            raise ConfigError("REDIS_SOCKET_TYPE=unix: a single Redis on this host, without REDIS_TLS=true")
        return f"unix://{credentials}{url}"
    if tls and kind != "single":
        raise ConfigError("REDIS_TLS=true: meshtoll speaks TLS to a single Redis only")
    if kind == "single":
        return f"{'rediss' if tls else 'redis'}://{credentials}{url}"
    if kind == "cluster":
        return f"redis+cluster://{credentials}{url}"
    if kind == "sentinel":
        # envoyproxy/ratelimit's form: master name, then the sentinels: "mymaster,host1:26379,host2:26379".
        service, _, nodes = url.partition(",")
        return f"redis+sentinel://{credentials}{nodes}/{quote(service)}"
    raise ConfigError(f"REDIS_TYPE={kind!r} is not one of SINGLE, SENTINEL, CLUSTER")
