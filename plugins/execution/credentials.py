"""Short-lived credentials scoped to one task attempt.

A lease hands its worker a :class:`~planes.execution.v1.TaskCredential`: a
token signed by the execution host that names the tenant, the task, the
attempt epoch and the payloads the task may read, and expires with the lease.
The data plane (or anything holding the public key) checks it with
:func:`verify_credential`; it grants nothing outside its payload list, and
nothing after it expires. Tool credentials are not in it: they are resolved
by reference only when a tool is invoked (see the adapters' context).
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import timestamp_pb2

from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.errors import PermissionDenied, Unauthenticated
from planes.kernel.tokens import SigningKey

PREFIX = "ptc1"
_CONTEXT = b"planes.execution.v1.TaskCredential\x00"
#: Longer is refused before it is decoded (a credential lists a task's payloads: far less than this).
MAX_TOKEN_CHARS = 1 << 20


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CredentialScope:
    tenant: str
    task_id: str
    attempt_epoch: int
    payload_ids: frozenset[str]
    expires_at: float


def issue_credential(key: SigningKey, *, tenant: str, task_id: str, attempt_epoch: int,
                     payload_ids: list[str], expires_at: float) -> pb.TaskCredential:
    claims = {"ten": tenant, "tid": task_id, "ep": attempt_epoch, "pids": sorted(set(payload_ids)),
              "exp": round(expires_at, 3), "kid": key.kid}
    body = f"{PREFIX}.{_b64(json.dumps(claims, separators=(',', ':'), sort_keys=True).encode())}"
    signature = key.private_key.sign(_CONTEXT + body.encode())
    expiry = timestamp_pb2.Timestamp()
    expiry.FromNanoseconds(int(expires_at * 1e9))
    return pb.TaskCredential(token=f"{body}.{_b64(signature)}", expires_at=expiry,
                             payload_ids=claims["pids"])


def _scope(claims: dict) -> CredentialScope:
    """The claims as a scope, if each has the type issue_credential gives it."""
    tenant, task_id, epoch, payloads, expires = (claims.get(name) for name in ("ten", "tid", "ep", "pids", "exp"))
    if not (isinstance(tenant, str) and isinstance(task_id, str)
            and isinstance(epoch, int) and not isinstance(epoch, bool)
            and isinstance(payloads, list) and all(isinstance(p, str) for p in payloads)
            and isinstance(expires, (int, float)) and not isinstance(expires, bool) and math.isfinite(expires)):
        raise Unauthenticated("malformed task credential")
    return CredentialScope(tenant, task_id, epoch, frozenset(payloads), float(expires))


def verify_credential(token: str, keys: dict[str, Ed25519PublicKey], *, payload_id: str | None = None,
                      now: float | None = None) -> CredentialScope:
    """Check a task credential; with ``payload_id``, also that it may read that payload.

    Raises:
        Unauthenticated: malformed, signed by an unknown key, forged or expired.
        PermissionDenied: valid, but ``payload_id`` is outside its scope.
    """
    # Every check before the signature is on attacker-chosen input: each
    # failure is Unauthenticated with a fixed message, never the token.
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated("malformed task credential")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise Unauthenticated("not a task credential")
    try:
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Unauthenticated("malformed task credential") from None
    kid = claims.get("kid") if isinstance(claims, dict) else None
    if not isinstance(kid, str):
        raise Unauthenticated("malformed task credential")
    key = keys.get(kid)
    if key is None:
        raise Unauthenticated("task credential signed by an unknown key")
    try:
        key.verify(signature, _CONTEXT + f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature:
        raise Unauthenticated("task credential signature does not verify") from None
    scope = _scope(claims)
    if (time.time() if now is None else now) >= scope.expires_at:
        raise Unauthenticated(f"task credential of {scope.task_id} attempt {scope.attempt_epoch} has expired")
    if payload_id is not None and payload_id not in scope.payload_ids:
        raise PermissionDenied(f"task credential of {scope.task_id} does not cover payload {payload_id!r}")
    return scope
