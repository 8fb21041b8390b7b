"""Signing keys and JWTs for tests: real RSA keys, real signatures."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://id.acme.test"
AUDIENCE = "api"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        document.update(kid=self.kid, alg="RS256", use="sig")
        return document

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "ci-bot",
            "iat": now,
            "exp": now + 600,
        }
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid})


@cache
def signing_key(kid: str = "acme-1") -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def unsigned_token(**claims: Any) -> str:
    """An `alg: none` token: no signature at all."""

    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ci-bot", "exp": now + 600, **claims}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body)}."


def hs256_confused_token(key: SigningKey) -> str:
    """HS256 signed with the RSA public key as the HMAC secret: the classic key confusion."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "ci-bot", "exp": now + 600}).encode())
    signature = hmac.new(key.public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"
