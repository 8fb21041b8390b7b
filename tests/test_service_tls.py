"""TLS and mutual TLS on the ports Envoy calls: decisions for a verified client, a refused
handshake for one without a trusted certificate, directly and through a real Envoy."""

from __future__ import annotations

import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from meshtoll.cli import main
from meshtoll.errors import ConfigError
from meshtoll.local.dev import DEMO_ACME_KEY, DEMO_GLOBEX_KEY
from meshtoll.local.devstack import LocalStack, StackConfig
from meshtoll.local.envoy_config import MeshtollTlsFiles
from meshtoll.server.tls import load_service_tls
from meshtoll.settings import Settings
from tests.certs import ClientCert, TestPki
from tests.client import fetch
from tests.envoy_harness import local_stack
from tests.serve import EXAMPLE_POLICY, Serving, running_serve

ACME = {"x-api-key": DEMO_ACME_KEY}
# How a refused handshake reaches an HTTP client: an alert, a reset, or wrapped by urllib.
REFUSED = (ssl.SSLError, ConnectionError, urllib.error.URLError)


def serve_tls_flags(pki: TestPki, *, mutual: bool) -> tuple[str, ...]:
    flags = ("--tls-cert", str(pki.server.server_cert), "--tls-key", str(pki.server.server_key))
    return (*flags, "--tls-client-ca", str(pki.server.ca_cert)) if mutual else flags


def grpc_check(port: int, pki: TestPki, client: ClientCert | None, headers: dict[str, str]) -> int:
    """One ext_authz Check over TLS, as Envoy's gRPC client makes it; the gRPC status code."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.server.ca_cert.read_bytes(),
        private_key=None if client is None else client.key.read_bytes(),
        certificate_chain=None if client is None else client.cert.read_bytes(),
    )
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.address.socket_address.address = "127.0.0.1"  # acme's allow-list is loopback
    attributes.request.http.method, attributes.request.http.path = "GET", "/v1/search"
    attributes.request.http.headers.update(headers)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        answer = stub.Check(external_auth_pb2.CheckRequest(attributes=attributes), timeout=5)
    return int(answer.status.code)


def https_check(serving: Serving, pki: TestPki, client: ClientCert | None, headers: dict[str, str]) -> int:
    url = f"https://127.0.0.1:{serving.http_authz_port}/v1/search"
    return fetch(url, headers=headers, client_cert=client, ca_file=str(pki.server.ca_cert)).status


def test_a_missing_certificate_file_is_a_config_error_naming_it(tmp_path: Path, pki: TestPki) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"tls_key: cannot read .*nope\.pem"):
        load_service_tls(Settings(tls_cert=pki.server.server_cert, tls_key=missing))


def test_a_certificate_with_another_key_is_a_config_error(pki: TestPki) -> None:
    with pytest.raises(ConfigError, match="not a usable certificate and key"):
        load_service_tls(Settings(tls_cert=pki.server.server_cert, tls_key=pki.bot.key))


def test_without_certificates_the_ports_stay_plain() -> None:
    assert load_service_tls(Settings()) is None


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (("--tls-cert", "server.pem"), "tls_cert and tls_key go together"),
        (("--tls-client-ca", "ca.pem"), "tls_client_ca (mutual TLS) needs tls_cert and tls_key"),
        (("--tls-cert", "missing.pem", "--tls-key", "missing-key.pem"), "tls_cert: cannot read missing.pem"),
    ],
)
def test_serve_with_an_unusable_tls_configuration_exits_with_the_problem_before_serving(
    flags: tuple[str, ...], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--policy", str(EXAMPLE_POLICY), *flags]) == 1
    assert problem in capsys.readouterr().err


@pytest.fixture(scope="module")
def mutual_serve(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[Serving]:
    with running_serve(tmp_path_factory.mktemp("mtls"), *serve_tls_flags(pki, mutual=True)) as serving:
        yield serving


@pytest.mark.integration
def test_mutual_tls_grpc_port_decides_for_a_client_with_a_trusted_certificate(
    mutual_serve: Serving, pki: TestPki
) -> None:
    assert grpc_check(mutual_serve.grpc_port, pki, pki.bot, ACME) == grpc.StatusCode.OK.value[0]
    assert grpc_check(mutual_serve.grpc_port, pki, pki.bot, {}) == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "authz ports: mutual TLS" in mutual_serve.child.log_tail()


@pytest.mark.integration
@pytest.mark.parametrize("client", ["none", "untrusted"])
def test_mutual_tls_grpc_port_refuses_a_client_without_a_trusted_certificate(
    mutual_serve: Serving, pki: TestPki, client: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        grpc_check(mutual_serve.grpc_port, pki, None if client == "none" else pki.untrusted, ACME)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed


@pytest.mark.integration
def test_mutual_tls_http_port_decides_for_a_trusted_client_and_refuses_others_at_the_handshake(
    mutual_serve: Serving, pki: TestPki
) -> None:
    assert https_check(mutual_serve, pki, pki.bot, ACME) == 200
    assert https_check(mutual_serve, pki, pki.bot, {}) == 401
    for client in (None, pki.untrusted):
        with pytest.raises(REFUSED):  # never an HTTP answer
            https_check(mutual_serve, pki, client, ACME)
    with pytest.raises(REFUSED):  # plain text on a TLS port gets no answer either
        fetch(f"http://127.0.0.1:{mutual_serve.http_authz_port}/v1/search", headers=ACME)


@pytest.mark.integration
def test_tls_without_a_client_ca_serves_clients_without_certificates(tmp_path: Path, pki: TestPki) -> None:
    with running_serve(tmp_path, *serve_tls_flags(pki, mutual=False)) as serving:
        assert https_check(serving, pki, None, ACME) == 200
        assert grpc_check(serving.grpc_port, pki, None, ACME) == grpc.StatusCode.OK.value[0]
        # The admin port stays plain HTTP for probes.
        assert fetch(f"{serving.admin_url}/readyz").status == 200


def tls_stack(tmp_path: Path, envoy_binary: Path, files: MeshtollTlsFiles, *serve_args: str) -> LocalStack:
    config = StackConfig(
        policy=EXAMPLE_POLICY,
        meshtoll_tls=files,
        envoy_binary=envoy_binary,
        work_dir=tmp_path,
        serve_args=serve_args,
    )
    return local_stack(config)


@pytest.mark.integration
def test_envoy_with_a_client_certificate_gets_decisions_over_mutual_tls(
    tmp_path: Path, envoy_binary: Path, pki: TestPki
) -> None:
    server = pki.server
    files = MeshtollTlsFiles(server.ca_cert, server.server_cert, server.server_key, pki.bot.cert, pki.bot.key)
    with tls_stack(tmp_path, envoy_binary, files) as stack:
        assert "--tls-client-ca" in stack.children["meshtoll"].argv
        allowed = fetch(stack.url("listen_http_authz_port", "/v1/search"), headers=ACME)
        assert allowed.status == 200
        assert allowed.json()["headers"]["x-meshtoll-tenant"] == "acme"
        assert fetch(stack.url("listen_http_authz_port", "/v1/search")).status == 401
        bearer = {"authorization": f"Bearer {DEMO_GLOBEX_KEY}"}
        through_grpc = fetch(stack.url("listen_grpc_authz_port", "/anything"), headers=bearer)
        assert through_grpc.status == 200
        assert through_grpc.json()["headers"]["x-meshtoll-tenant"] == "globex"


@pytest.mark.integration
def test_envoy_without_a_client_certificate_is_refused_and_fails_closed(
    tmp_path: Path, envoy_binary: Path, pki: TestPki
) -> None:
    server = pki.server
    files = MeshtollTlsFiles(server.ca_cert, server.server_cert, server.server_key)
    with tls_stack(tmp_path, envoy_binary, files, "--tls-client-ca", str(server.ca_cert)) as stack:
        # Envoy cannot complete the handshake, so its authz call fails: 503, never a pass.
        assert fetch(stack.url("listen_http_authz_port", "/v1/search"), headers=ACME).status == 503
        bearer = {"authorization": f"Bearer {DEMO_GLOBEX_KEY}"}
        assert fetch(stack.url("listen_grpc_authz_port", "/anything"), headers=bearer).status == 503
