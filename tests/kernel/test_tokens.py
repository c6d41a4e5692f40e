"""Token issue and verification, and the 0600 secret files behind them."""

from __future__ import annotations

import os
import stat

import pytest

from planes.kernel import errors
from planes.kernel.secrets import read_secret, write_secret
from planes.kernel.tokens import SigningKey, TokenVerifier, decode_claims, issue_token


@pytest.fixture
def key():
    return SigningKey.generate()


def test_round_trip_carries_the_identity(key):
    token = issue_token(key, principal="alice", tenant="acme", roles=["operator", "reviewer"], ttl_seconds=60)
    identity = TokenVerifier({key.kid: key.public_key}).verify(token)
    assert (identity.principal, identity.tenant, identity.roles) == ("alice", "acme", frozenset({"operator", "reviewer"}))
    assert identity.token_id == decode_claims(token)["jti"]


def test_cached_token_still_expires(key):
    clock = [1_000_000.0]
    verifier = TokenVerifier({key.kid: key.public_key}, clock=lambda: clock[0])
    token = issue_token(key, principal="a", tenant="t", roles=["service"], ttl_seconds=10, now=clock[0])
    assert verifier.verify(token).principal == "a"
    clock[0] += 10
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verifier.verify(token)


def test_not_yet_valid_token_is_refused(key):
    clock = [1_000_000.0]
    verifier = TokenVerifier({key.kid: key.public_key}, clock=lambda: clock[0])
    token = issue_token(key, principal="a", tenant="t", roles=["service"], ttl_seconds=600, now=clock[0] + 120)
    with pytest.raises(errors.Unauthenticated, match="not yet valid"):
        verifier.verify(token)


def test_failed_verification_is_not_cached(key):
    verifier = TokenVerifier({key.kid: key.public_key}, cache_size=4)
    token = issue_token(key, principal="a", tenant="t", roles=["service"], ttl_seconds=60)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(3):
        with pytest.raises(errors.Unauthenticated):
            verifier.verify(forged)
    assert forged not in verifier._cache


def test_a_token_has_one_spelling(key):
    """Characters outside base64url, padding or stray low bits make another string, never the same token."""
    verifier = TokenVerifier({key.kid: key.public_key})
    token = issue_token(key, principal="a", tenant="t", roles=["service"], ttl_seconds=60)
    body, _, signature = token.rpartition(".")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(signature[-1])
    variants = [token + "!!!!", token + "====", f"{body}.{signature}=", f"{body}.{signature[:-1]}"
                f"{'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'[last ^ 1]}",
                token.replace(".", ". ", 1), f"{body}.{signature[:10]}+/{signature[12:]}"]
    for variant in variants:
        with pytest.raises(errors.Unauthenticated):
            verifier.verify(variant)
    assert verifier.verify(f"  {token}\n").principal == "a" and verifier.verify(token).principal == "a"
    assert list(verifier._cache) == [token], "whitespace around a token is not another token"


def test_cache_is_bounded(key):
    verifier = TokenVerifier({key.kid: key.public_key}, cache_size=3)
    tokens = [issue_token(key, principal=f"p{i}", tenant="t", roles=["service"], ttl_seconds=60) for i in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._cache) == 3
    assert list(verifier._cache) == tokens[2:]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"principal": ""}, "principal"),
        ({"tenant": ""}, "tenant"),
        ({"roles": ["root"]}, "unknown roles"),
        ({"roles": []}, "at least one role"),
        ({"ttl_seconds": 0}, "positive"),
        ({"ttl_seconds": 366 * 24 * 3600 + 1}, "longer than the maximum, 31622400 s"),
    ],
)
def test_issue_refuses_bad_claims(key, kwargs, message):
    args = {"principal": "a", "tenant": "t", "roles": ["service"], "ttl_seconds": 60, **kwargs}
    with pytest.raises(errors.InvalidArgument, match=message):
        issue_token(key, **args)


def test_signing_key_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "keys" / "k.pem"
    first, created = SigningKey.load_or_create(path)
    second, created_again = SigningKey.load_or_create(path)
    assert created and not created_again
    assert first.kid == second.kid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_secret_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "token"
    assert write_secret(path, b"secret")
    assert not write_secret(path, b"other"), "an existing secret is never overwritten"
    assert read_secret(path) == b"secret"
    os.chmod(path, 0o644)
    with pytest.raises(errors.SettingsError, match="chmod 600"):
        read_secret(path)


def test_a_token_of_the_maximum_lifetime_is_issued(key):
    token = issue_token(key, principal="a", tenant="t", roles=["service"], ttl_seconds=366 * 24 * 3600, now=1000)
    assert decode_claims(token)["exp"] == 1000 + 366 * 24 * 3600
