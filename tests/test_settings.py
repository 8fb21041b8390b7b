"""Settings of `meshtoll serve`: flags over environment over defaults, bad values named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshtoll.errors import ConfigError
from meshtoll.server.admin import AdminPort
from meshtoll.server.services import build
from meshtoll.settings import Settings, settings_from

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.yaml"


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    environ = {"MESHTOLL_GRPC_PORT": "9001", "MESHTOLL_WORKERS": "3", "MESHTOLL_POLICY": "/etc/p.yaml"}
    settings = settings_from({"grpc_port": 7001, "workers": None}, environ)
    assert settings.grpc_port == 7001
    assert settings.workers == 3
    assert settings.policy == Path("/etc/p.yaml")
    assert settings.http_authz_port == Settings().http_authz_port


def test_bad_environment_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"MESHTOLL_ADMIN_PORT='eighty' is not a valid admin port"):
        settings_from({}, {"MESHTOLL_ADMIN_PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"grpc_port: 70000 is not a TCP port"):
        settings_from({"grpc_port": 70000}, {})
    with pytest.raises(ConfigError, match=r"workers: 0 must be at least 1"):
        settings_from({"workers": 0}, {})


def respond(handler: AdminPort, path: str) -> bytes:
    answer = handler("GET", path, {}, "127.0.0.1", b"")
    assert isinstance(answer, bytes)
    return answer


def test_readyz_is_503_until_the_policy_has_loaded_then_200() -> None:
    handler = AdminPort()
    assert respond(handler, "/healthz").startswith(b"HTTP/1.1 200 ")
    assert respond(handler, "/readyz").startswith(b"HTTP/1.1 503 ")
    assert respond(handler, "/api/policy").startswith(b"HTTP/1.1 503 ")
    handler.ready(asyncio.run(build(Settings(policy=EXAMPLE))).admin)
    ready = respond(handler, "/readyz")
    assert ready.startswith(b"HTTP/1.1 200 ")
    assert ready.endswith(b'{"status": "ready", "policy_version": 1}')
    assert respond(handler, "/nope").startswith(b"HTTP/1.1 404 ")


def test_tls_and_admin_token_settings_come_from_their_environment_variables() -> None:
    environ = {
        "MESHTOLL_ADMIN_TOKEN": "s3cret-token",
        "MESHTOLL_TLS_CERT": "/etc/tls/cert.pem",
        "MESHTOLL_TLS_KEY": "/etc/tls/key.pem",
        "MESHTOLL_TLS_CLIENT_CA": "/etc/tls/ca.pem",
    }
    settings = settings_from({}, environ)
    assert settings.admin_token == "s3cret-token"
    assert (settings.tls_cert, settings.tls_key) == (Path("/etc/tls/cert.pem"), Path("/etc/tls/key.pem"))
    assert settings.tls_client_ca == Path("/etc/tls/ca.pem")
    assert "s3cret-token" not in repr(settings)
    assert Settings().tls_cert is None
    assert Settings().admin_token is None


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ({"tls_cert": Path("c.pem")}, "tls_cert and tls_key go together"),
        ({"tls_key": Path("k.pem")}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": Path("ca.pem")}, "tls_client_ca .* needs tls_cert and tls_key"),
        ({"admin_token": ""}, "admin_token must be non-empty printable ASCII"),
        ({"admin_token": "two words"}, "admin_token must be non-empty printable ASCII"),
    ],
)
def test_half_a_tls_configuration_or_an_unusable_token_is_a_config_error(
    flags: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings_from(flags, {})


def test_usage_sinks_come_from_repeated_flags_or_one_variable_and_bad_ones_are_named() -> None:
    flags = settings_from(
        {"usage_sinks": [("lago", "https://lago.test"), ("stripe", "https://api.stripe.com")]}, {}
    )
    assert flags.usage_sinks == (("lago", "https://lago.test"), ("stripe", "https://api.stripe.com"))
    environ = {"MESHTOLL_USAGE_SINKS": "openmeter=http://openmeter:8888, lago=https://lago.test"}
    assert settings_from({}, environ).usage_sinks == (
        ("openmeter", "http://openmeter:8888"),
        ("lago", "https://lago.test"),
    )
    with pytest.raises(ConfigError, match=r"MESHTOLL_USAGE_SINKS='lago' is not a valid usage sinks"):
        settings_from({}, {"MESHTOLL_USAGE_SINKS": "lago"})
    bad = [
        ([("chargebee", "https://x.test")], "'chargebee' is not one of openmeter, lago, stripe"),
        ([("lago", "ftp://lago.test")], "lago's URL 'ftp://lago.test' is not an http\\(s\\) URL"),
        ([("stripe", "https://sk_live_1:@api.stripe.com")], "stripe's URL carries a credential"),
        ([("lago", "https://lago.test?api_key=x")], "lago's URL carries a credential or a query"),
        ([("lago", "https://a.test"), ("lago", "https://b.test")], "lago is given twice"),
    ]
    for sinks, message in bad:
        with pytest.raises(ConfigError, match=message):
            settings_from({"usage_sinks": sinks}, {})
    with pytest.raises(ConfigError, match=r"usage_sink_timeout_seconds: 30.0 must be above 0 and at most 10"):
        settings_from({"usage_sink_timeout_seconds": 30.0}, {})
    with pytest.raises(ConfigError, match=r"stripe_api: 'v3' is not one of v2, v1"):
        settings_from({"stripe_api": "v3"}, {})
    assert settings_from({}, {"MESHTOLL_USAGE_SINK_SINCE": "2026-11-01"}).usage_sink_since == 1_793_491_200.0
