"""A throwaway PKI for mTLS tests: real keys and certificates, written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtoll.local.envoy_config import MtlsFiles

BOT_SPIFFE_ID = "spiffe://acme.test/ns/ci/sa/bot"
OTHER_SPIFFE_ID = "spiffe://acme.test/ns/other/sa/intruder"


@dataclass(frozen=True, slots=True)
class ClientCert:
    cert: Path
    key: Path
    uri: str

    @property
    def pair(self) -> tuple[str, str]:
        """(cert, key) as `httpx`/`ssl.load_cert_chain` take them."""
        return (str(self.cert), str(self.key))


@dataclass(frozen=True, slots=True)
class TestPki:
    __test__ = False  # not a test class, despite the name

    server: MtlsFiles  # CA and the server certificate for 127.0.0.1, for Envoy
    bot: ClientCert  # signed by the CA, URI SAN BOT_SPIFFE_ID
    other: ClientCert  # signed by the CA, URI SAN OTHER_SPIFFE_ID
    untrusted: ClientCert  # BOT_SPIFFE_ID again, but signed by a CA Envoy does not trust


@dataclass(frozen=True, slots=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def make_pki(directory: Path) -> TestPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "meshtoll test CA", "ca")
    rogue = _make_ca(directory, "rogue CA", "rogue-ca")
    server_cert, server_key = _issue(
        directory,
        "server",
        ca,
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    return TestPki(
        server=MtlsFiles(ca_cert=directory / "ca.pem", server_cert=server_cert, server_key=server_key),
        bot=_client(directory, "bot", ca, BOT_SPIFFE_ID),
        other=_client(directory, "other", ca, OTHER_SPIFFE_ID),
        untrusted=_client(directory, "untrusted", rogue, BOT_SPIFFE_ID),
    )


def _make_ca(directory: Path, common_name: str, stem: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return _Issuer(name, key)


def _client(directory: Path, stem: str, issuer: _Issuer, uri: str) -> ClientCert:
    cert, key = _issue(
        directory,
        stem,
        issuer,
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return ClientCert(cert=cert, key=key, uri=uri)


def _issue(
    directory: Path,
    stem: str,
    issuer: _Issuer,
    san: x509.SubjectAlternativeName,
    usage: x509.ObjectIdentifier,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    cert = (
        _builder(subject, issuer.name, key)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
