"""Bearer tokens signed with Ed25519.

A token is ``pt1.<claims>.<signature>``: the claims are compact JSON in
unpadded base64url, the signature is Ed25519 over ``pt1.<claims>``. Claims:
``kid`` (signing key id), ``sub`` (principal), ``ten`` (tenant, ``*`` for all),
``roles``, ``iat``, ``nbf``, ``exp`` (Unix seconds) and ``jti`` (token id).

Verifying an Ed25519 signature costs about 100 microseconds, a third of a
loopback RPC, so :class:`TokenVerifier` verifies each distinct token once and
keeps the result in a bounded cache; expiry and not-before are checked on every
use, and a token that failed verification is never cached.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidArgument, SettingsError, Unauthenticated
from .identity import ALL_TENANTS, ROLES, Identity
from .secrets import read_secret, secret_missing, write_secret

PREFIX = "pt1"
#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_BYTES = 4096
#: Allowed clock skew between issuer and verifier, in seconds.
CLOCK_SKEW = 30
#: The longest lifetime a token may have. Tokens are revoked only all at once, by a new signing key.
MAX_TOKEN_TTL = 366 * 24 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Unpadded base64url, strictly: a token has one spelling (urlsafe_b64decode alone skips characters
    outside the alphabet, so 'sig!!!!' would verify as 'sig' and be cached as another token)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not canonical base64url")  # stray bits in the last character
    return data


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 key pair with its key id."""

    private_key: Ed25519PrivateKey
    kid: str

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @classmethod
    def generate(cls) -> SigningKey:
        key = Ed25519PrivateKey.generate()
        return cls(key, key_id(key.public_key()))

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[SigningKey, bool]:
        """Load the key at ``path``, creating it (0600) if missing. Returns (key, created).

        Safe when several processes start at once: one key is published (see
        :func:`~planes.kernel.secrets.write_secret`) and every caller loads it.
        """
        created = False
        if secret_missing(path):
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            created = write_secret(path, pem)
        return cls.load(path), created

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(read_secret(path), password=None)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SettingsError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key, key_id(key.public_key()))

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SettingsError(f"{path} is not an Ed25519 public key")
    return key


def issue_token(
    key: SigningKey,
    *,
    principal: str,
    tenant: str,
    roles: list[str] | tuple[str, ...] | frozenset[str],
    ttl_seconds: float,
    now: float | None = None,
) -> str:
    """Sign a token for ``principal`` acting for ``tenant`` with ``roles``."""
    if not principal:
        raise InvalidArgument("a token needs a principal")
    if not tenant:
        raise InvalidArgument(f"a token needs a tenant (a tenant name, or {ALL_TENANTS!r} for all)")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise InvalidArgument(f"unknown roles {unknown}; known roles: {', '.join(ROLES)}")
    if not roles:
        raise InvalidArgument("a token needs at least one role")
    if ttl_seconds <= 0:
        raise InvalidArgument("token lifetime must be positive")
    if ttl_seconds > MAX_TOKEN_TTL:
        raise InvalidArgument(f"token lifetime {int(ttl_seconds)} s is longer than the maximum, {MAX_TOKEN_TTL} s "
                              "(366 days): tokens cannot be revoked one by one, so none lives longer")
    issued = int(now if now is not None else time.time())
    claims = {
        "kid": key.kid,
        "sub": principal,
        "ten": tenant,
        "roles": sorted(set(roles)),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_seconds),
        "jti": os.urandom(12).hex(),
    }
    body = f"{PREFIX}.{_b64(json.dumps(claims, separators=(',', ':'), sort_keys=True).encode())}"
    return f"{body}.{_b64(key.private_key.sign(body.encode('ascii')))}"


def decode_claims(token: str) -> dict:
    """The claims of a token, unverified (for ``planes token inspect``)."""
    try:
        prefix, claims_b64, _signature = token.strip().split(".")
        if prefix != PREFIX:
            raise ValueError
        claims = json.loads(_unb64(claims_b64))
        if not isinstance(claims, dict):
            raise ValueError
        return claims
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed token") from None


class TokenVerifier:
    """Verifies tokens against a set of trusted public keys, with a cache."""

    def __init__(self, keys: dict[str, Ed25519PublicKey], *, cache_size: int = 4096, clock=time.time):
        self._keys = dict(keys)
        self._cache: dict[str, tuple[Identity, int, int]] = {}
        self._cache_size = cache_size
        self._clock = clock

    def trust(self, public_key: Ed25519PublicKey) -> str:
        kid = key_id(public_key)
        self._keys[kid] = public_key
        return kid

    def verify(self, token: str) -> Identity:
        """The identity a valid token carries; Unauthenticated otherwise."""
        token = token.strip()  # one cache entry per token, however it was read
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify_signature(token)
            if len(self._cache) >= self._cache_size:
                # Dicts keep insertion order: drop the oldest entry.
                del self._cache[next(iter(self._cache))]
            self._cache[token] = cached
        identity, not_before, expires = cached
        now = self._clock()
        if now >= expires:
            raise Unauthenticated("token expired")
        if now + CLOCK_SKEW < not_before:
            raise Unauthenticated("token not yet valid")
        return identity

    def expiry(self, token: str) -> int:
        """When a token that :meth:`verify` accepted expires (Unix seconds)."""
        return self._cache[token.strip()][2] if token.strip() in self._cache else \
            self._verify_signature(token.strip())[2]

    def _verify_signature(self, token: str) -> tuple[Identity, int, int]:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"token too long ({len(token)} > {MAX_TOKEN_BYTES} bytes)")
        claims = decode_claims(token)
        body, _, signature_b64 = token.strip().rpartition(".")
        key = self._keys.get(str(claims.get("kid", "")))
        if key is None:
            raise Unauthenticated("token signed by an unknown key")
        try:
            key.verify(_unb64(signature_b64), body.encode("ascii"))
        except (InvalidSignature, binascii.Error, ValueError):
            raise Unauthenticated("token signature is invalid") from None
        try:
            roles = frozenset(str(role) for role in claims["roles"])
            identity = Identity(
                principal=str(claims["sub"]),
                tenant=str(claims["ten"]),
                roles=roles,
                source="token",
                token_id=str(claims.get("jti", "")),
            )
            return identity, int(claims.get("nbf", 0)), int(claims["exp"])
        except (KeyError, TypeError, ValueError):
            raise Unauthenticated("token claims are incomplete") from None
