"""Task credentials: a malformed one is Unauthenticated, with a message that never echoes it."""

from __future__ import annotations

import base64
import json
import time

import pytest

from planes.kernel import errors
from planes.kernel.tokens import SigningKey
from planes.plugins.execution.credentials import (
    _CONTEXT,
    PREFIX,
    issue_credential,
    verify_credential,
)

KEY = SigningKey.generate()
KEYS = {KEY.kid: KEY.public_key}
SECRET = "s3cr3t-marker"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(body: bytes, *, signed: bool = False) -> str:
    text = f"{PREFIX}.{_b64(body)}"
    signature = KEY.private_key.sign(_CONTEXT + text.encode()) if signed else b"\0" * 64
    return f"{text}.{_b64(signature)}"


def _claims(**changes) -> bytes:
    claims = {"ten": "acme", "tid": "t-1", "ep": 1, "pids": ["p-1"], "exp": time.time() + 60, "kid": KEY.kid}
    claims.update(changes)
    return json.dumps({k: v for k, v in claims.items() if v is not ...}).encode()


def test_a_well_formed_credential_still_verifies():
    credential = issue_credential(KEY, tenant="acme", task_id="t-1", attempt_epoch=2, payload_ids=["p-1"],
                                  expires_at=time.time() + 60)
    scope = verify_credential(credential.token, KEYS, payload_id="p-1")
    assert (scope.tenant, scope.task_id, scope.attempt_epoch, scope.payload_ids) == ("acme", "t-1", 2,
                                                                                    frozenset({"p-1"}))


@pytest.mark.parametrize("token", [
    _token(b"[]"), _token(b'"x"'), _token(b"1"), _token(b"null"), _token(json.dumps({"kid": []}).encode()),
    _token(json.dumps({"kid": {"a": SECRET}}).encode()), _token(b"{" + SECRET.encode()),
    _token(b"[" * 100_000 + b"]" * 100_000),
    f"{PREFIX}.{SECRET}!!!.AAAA", f"{PREFIX}.\u00e9{SECRET}.AAAA", f"{PREFIX}.{_b64(b'{}')}.{SECRET}*",
    f"{PREFIX}.{SECRET}", "", "...", SECRET,
    f"{PREFIX}.{'A' * (2 << 20)}.AAAA",
], ids=["list", "string", "number", "null", "kid-list", "kid-object", "not-json", "deeply-nested", "not-base64",
        "non-ascii", "bad-signature-base64", "two-parts", "empty", "dots", "no-prefix", "huge"])
def test_a_malformed_credential_is_unauthenticated_and_not_echoed(token):
    with pytest.raises(errors.Unauthenticated) as refused:
        verify_credential(token, KEYS, payload_id="p-1")
    assert SECRET not in str(refused.value) and len(str(refused.value)) < 100


def test_a_credential_that_is_not_a_string_is_unauthenticated():
    with pytest.raises(errors.Unauthenticated):
        verify_credential(_token(_claims()).encode(), KEYS)  # type: ignore[arg-type]


# Signed by the right key, so only the claims' types are wrong: a key that
# signed them is trusted, but a wrong type is still a refusal, not a crash.
@pytest.mark.parametrize("changes", [
    {"ten": ["acme"]}, {"ten": ...}, {"tid": 7}, {"tid": ...}, {"ep": "1"}, {"ep": True}, {"ep": 1.5}, {"ep": ...},
    {"pids": "p-1"}, {"pids": [1]}, {"pids": {"p-1": 1}}, {"pids": ...}, {"exp": "soon"}, {"exp": None},
    {"exp": True}, {"exp": ...},
], ids=lambda changes: "-".join(f"{k}={'missing' if v is ... else type(v).__name__}" for k, v in changes.items()))
def test_a_signed_credential_with_a_claim_of_the_wrong_type_is_unauthenticated(changes):
    with pytest.raises(errors.Unauthenticated, match="malformed task credential"):
        verify_credential(_token(_claims(**changes), signed=True), KEYS, payload_id="p-1")
