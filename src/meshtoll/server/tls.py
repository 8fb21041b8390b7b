"""TLS, and with a client CA mutual TLS, for the ports Envoy calls (gRPC and HTTP authz).

The admin port stays plain HTTP: kubelet probes and Prometheus scrapers talk to it, and its
tenant data is guarded by the admin token (see server/admin_access.py) instead.

The files are read once at start-up, where a missing file or a certificate that does not
match its key is a ConfigError naming the file; a certificate renewed on disk takes effect
at the next restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from meshtoll.errors import ConfigError
from meshtoll.settings import Settings


@dataclass(frozen=True, slots=True)
class ServiceTls:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None  # None: any client may connect; else it must present a certificate
    context: ssl.SSLContext  # for the HTTP authz port, built (and so checked) at load
    grpc_context: ssl.SSLContext  # for the gRPC port: the same, but for ALPN h2

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def load_service_tls(settings: Settings) -> ServiceTls | None:
    """None when no certificate is configured (plain text, as on a loopback-only setup)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None  # Settings refuses a half configuration, so this means "no TLS"
    ca = settings.tls_client_ca
    return ServiceTls(
        cert_chain=_read(settings.tls_cert, "tls_cert"),
        private_key=_read(settings.tls_key, "tls_key"),
        client_ca=None if ca is None else _read(ca, "tls_client_ca"),
        context=_ssl_context(settings.tls_cert, settings.tls_key, ca, "http/1.1"),
        # gRPC over TLS needs h2 negotiated by ALPN (grpc core refuses a server without it).
        grpc_context=_ssl_context(settings.tls_cert, settings.tls_key, ca, "h2"),
    )


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror})") from None


def _ssl_context(cert: Path, key: Path, client_ca: Path | None, protocol: str) -> ssl.SSLContext:
    """`protocol`: the one ALPN protocol the port speaks (Envoy's HTTP ext_authz client
    speaks HTTP/1.1, its gRPC clients h2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([protocol])
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls_cert {cert}, tls_key {key}: not a usable certificate and key ({exc})"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls_client_ca {client_ca}: not a usable CA bundle ({exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
