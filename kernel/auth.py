"""Authentication: who is calling, from a bearer token or a client certificate."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import Unauthenticated
from .identity import Identity
from .tokens import TokenVerifier


class Authenticator:
    """Turns a call's credentials into an :class:`Identity`.

    A ``Bearer`` token in the ``authorization`` metadata wins. Without one, and
    with mTLS configured, the client certificate is the identity: its common
    name is the principal, its organization the tenant and its organizational
    units the roles.
    """

    def __init__(self, verifier: TokenVerifier, *, mtls: bool = False):
        self.verifier = verifier
        self._verify = verifier.verify
        self.mtls = mtls
        self._certificates: dict[bytes, Identity] = {}

    def identify(self, authorization: str | None, auth_context: Any = None) -> Identity:
        if authorization:
            if authorization.startswith("Bearer "):
                return self._verify(authorization[7:])
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return self.verifier.verify(token.strip())
        if self.mtls and auth_context is not None:
            identity = self._from_certificate(auth_context())
            if identity is not None:
                return identity
        raise Unauthenticated("this call needs a token: send 'authorization: Bearer <token>'")

    def _from_certificate(self, context: dict[str, list[bytes]]) -> Identity | None:
        pems = context.get("x509_pem_cert") or ()
        if not pems:
            return None
        pem = pems[0]
        identity = self._certificates.get(pem)
        if identity is None:
            identity = identity_from_certificate(pem)
            if len(self._certificates) > 1024:
                self._certificates.clear()
            self._certificates[pem] = identity
        return identity


def identity_from_certificate(pem: bytes) -> Identity:
    """CN -> principal, O -> tenant, each OU -> a role."""
    cert = x509.load_pem_x509_certificate(pem)
    subject = cert.subject

    def values(oid):
        return [attr.value for attr in subject.get_attributes_for_oid(oid)]

    principals = values(NameOID.COMMON_NAME)
    tenants = values(NameOID.ORGANIZATION_NAME)
    if not principals or not tenants:
        raise Unauthenticated("client certificate needs a common name (principal) and an organization (tenant)")
    roles = frozenset(str(v) for v in values(NameOID.ORGANIZATIONAL_UNIT_NAME))
    return Identity(principal=str(principals[0]), tenant=str(tenants[0]), roles=roles, source="mtls")
