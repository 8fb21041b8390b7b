"""Envoy bootstraps for the local stack, rendered from the templates in `envoy/`.

The templates use `${name}` placeholders (filled from the dataclasses below), YAML anchors
and `<<` merge keys so that every shared block is written once. Envoy's YAML parser has
no merge keys, so rendering also resolves them and emits plain YAML Envoy can load.
`src/meshtoll/envoy` is a symlink to the repository's `envoy/`, shipped as package data,
so a checkout and an installed wheel read the same files through one path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

LOCAL_TEMPLATE = "local.yaml"
MTLS_TEMPLATE = "mtls-listener.yaml"
STUB_TEMPLATE = "authz-stub.yaml"
# Top-level keys with this prefix hold anchors for the template only; Envoy rejects them.
_TEMPLATE_ONLY_PREFIX = "x-"


@dataclass(frozen=True, slots=True)
class EnvoyPorts:
    """Every port envoy/local.yaml listens on or connects to, all on 127.0.0.1."""

    admin_port: int
    listen_http_authz_port: int  # clients, ext_authz over HTTP to meshtoll
    listen_grpc_authz_port: int  # clients, ext_authz over gRPC to meshtoll
    listen_direct_port: int  # clients, direct 200 without upstream or authz
    listen_stub_authz_port: int  # clients, ext_authz over HTTP to the authz stub
    listen_rls_port: int  # clients, ext_authz over gRPC then the ratelimit filter (RLS)
    listen_full_port: int  # clients, HTTP ext_authz and the access log to the meter
    listen_metered_direct_port: int  # clients, direct 200 response, metered (benchmark)
    listen_mtls_port: int  # clients with certificates, ext_authz over gRPC (mTLS only)
    listen_mtls_http_authz_port: int  # clients with certificates, ext_authz over HTTP (mTLS only)
    upstream_port: int  # the demo upstream
    authz_grpc_port: int  # meshtoll's gRPC port
    authz_http_port: int  # meshtoll's HTTP ext_authz port
    stub_authz_port: int  # the authz stub's listener (envoy/authz-stub.yaml)


@dataclass(frozen=True, slots=True)
class StubPorts:
    """The ports of envoy/authz-stub.yaml, the Envoy that allows everything."""

    stub_admin_port: int
    stub_authz_port: int


@dataclass(frozen=True, slots=True)
class MtlsFiles:
    """PEM files for the mTLS listeners: client certificates must chain to `ca_cert`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def render_bootstrap(ports: EnvoyPorts, mtls: MtlsFiles | None = None) -> str:
    """The local stack's Envoy bootstrap; the mTLS listeners only when `mtls` is given."""
    text = read_template(LOCAL_TEMPLATE)
    values = _placeholders(asdict(ports))
    if mtls is not None:
        # Appended as text, not merged as data, so the fragment can use local.yaml's anchors.
        text += read_template(MTLS_TEMPLATE)
        values |= _placeholders(asdict(mtls))
    return _resolve(Template(text).substitute(values))


def render_authz_stub(ports: StubPorts) -> str:
    """The bootstrap of the Envoy that answers 200 to every authorization request."""
    return _resolve(Template(read_template(STUB_TEMPLATE)).substitute(_placeholders(asdict(ports))))


def read_template(name: str) -> str:
    return (resources.files("meshtoll") / "envoy" / name).read_text(encoding="utf-8")


def _placeholders(values: dict[str, Any]) -> dict[str, str]:
    # JSON scalars are YAML scalars: a path with spaces or colons stays one string.
    return {
        name: json.dumps(value if isinstance(value, int) else str(value)) for name, value in values.items()
    }


def _resolve(text: str) -> str:
    document = yaml.safe_load(text)
    for key in [key for key in document if key.startswith(_TEMPLATE_ONLY_PREFIX)]:
        del document[key]
    return yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, width=120)


class _PlainDumper(yaml.SafeDumper):
    """Writes shared blocks out in full: the output is for Envoy and for people, not a template."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
