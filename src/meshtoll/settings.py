"""Settings of `meshtoll serve`: one object, built from flags or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from meshtoll.errors import ConfigError


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


def settings_from(flags: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> Settings:
    """Flags win over MESHTOLL_* environment variables, which win over the defaults."""
    values: dict[str, object] = {}
    for field in fields(Settings):
        flag = flags.get(field.name)
        if flag is not None:
            values[field.name] = flag
            continue
        raw = environ.get(Settings.env_name(field.name))
        if raw is None or raw == "":
            continue
        values[field.name] = _parse(field.name, raw, field.default)
    return Settings(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{Settings.env_name(name)}={raw!r} is not a number") from None
    if isinstance(default, Path):
        return Path(raw)
    return raw
