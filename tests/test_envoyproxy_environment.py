"""`meshtoll ratelimit` reads envoyproxy/ratelimit's environment variables, with its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshtoll.envoyproxy_ratelimit.environment import redis_url_of, rls_settings_from
from meshtoll.errors import ConfigError

TCP = {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": "redis:6379"}


def test_the_peers_docker_compose_environment_is_understood() -> None:
    settings = rls_settings_from(
        {
            **TCP,
            "RUNTIME_ROOT": "/data",
            "RUNTIME_SUBDIRECTORY": "ratelimit",
            "RUNTIME_WATCH_ROOT": "false",
            "LOG_LEVEL": "debug",
            "RESPONSE_DYNAMIC_METADATA": "true",
            "USE_STATSD": "true",
        }
    )
    assert settings.config_directory == Path("/data/ratelimit/config")
    assert settings.redis_url == "redis://redis:6379"
    assert (settings.grpc_port, settings.port, settings.debug_port) == (8081, 8080, 6070)
    assert (settings.log_level, settings.response_dynamic_metadata) == ("DEBUG", True)
    assert (settings.expiration_jitter_seconds, settings.redis_timeout_ms) == (300, 10_000)
    assert settings.response_headers is None


def test_counting_options_and_header_names_are_read() -> None:
    settings = rls_settings_from(
        {
            **TCP,
            "LOCAL_CACHE_SIZE_IN_BYTES": "1000",
            "CACHE_KEY_PREFIX": "prefix:",
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true",
            "SHADOW_MODE": "1",
            "QUOTA_MODE": "T",
            "LIMIT_RESPONSE_HEADERS_ENABLED": "true",
            "LIMIT_REMAINING_HEADER": "X-Left",
            "REDIS_TIMEOUT": "500ms",
            "GRPC_PORT": "9000",
        }
    )
    assert (settings.local_cache, settings.shadow_mode, settings.quota_mode) == (True, True, True)
    assert (settings.cache_key_prefix, settings.stop_cache_key_increment_when_overlimit) == ("prefix:", True)
    assert settings.response_headers == ("RateLimit-Limit", "X-Left", "RateLimit-Reset")
    assert (settings.redis_timeout_ms, settings.grpc_port) == (500, 9000)


@pytest.mark.parametrize(
    ("environment", "url"),
    [
        ({**TCP, "REDIS_AUTH": "secret"}, "redis://secret@redis:6379"),
        ({**TCP, "REDIS_AUTH": "user:pa ss", "REDIS_TLS": "true"}, "rediss://user:pa%20ss@redis:6379"),
        ({**TCP, "REDIS_TYPE": "cluster", "REDIS_URL": "a:7000,b:7001"}, "redis+cluster://a:7000,b:7001"),
        (
            {**TCP, "REDIS_TYPE": "SENTINEL", "REDIS_URL": "mymaster,s1:26379,s2:26379"},
            "redis+sentinel://s1:26379,s2:26379/mymaster",
        ),
    ],
)
def test_redis_variables_become_one_url(environment: dict[str, str], url: str) -> None:
    assert redis_url_of(environment) == url


@pytest.mark.parametrize(
    "environment",
    [
        {"REDIS_URL": "/var/run/redis.sock", "REDIS_TYPE": "cluster"},
        {**TCP, "REDIS_TYPE": "twemproxy"},
        {**TCP, "BACKEND_TYPE": "memcache"},
        {**TCP, "REDIS_PERSECOND": "true"},
        {**TCP, "GRPC_PORT": "eighty"},
        {**TCP, "CONFIG_TYPE": "GRPC_XDS_SOTW"},
    ],
)
def test_what_meshtoll_cannot_do_is_refused_not_ignored(environment: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        rls_settings_from(environment)
