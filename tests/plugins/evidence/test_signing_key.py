"""The log's checkpoint key: made for a new log; for an existing log only ever the key it already has."""

from __future__ import annotations

import shutil

import pytest

from planes.kernel.errors import FailedPrecondition
from planes.kernel.tokens import SigningKey
from planes.plugins.evidence import open_log
from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import SERVICE, event


@pytest.fixture
def stopped(tmp_path):
    """A closed log of 5 events under 2 checkpoints; its key id."""
    log = open_log(tmp_path)
    log.append("acme", [event(f"e{i}") for i in range(3)], SERVICE)
    log.checkpoint_now()
    log.append("acme", [event(f"f{i}") for i in range(2)], SERVICE)
    log.checkpoint_now()
    kid = log.key.kid
    log.close()
    return tmp_path, kid


def _keys(state):
    return state / "keys" / "evidence-signing.pem", state / "keys" / "evidence-signing.pub.pem"


def _unchanged(state):
    return {path: path.read_bytes() for path in sorted(state.rglob("*")) if path.is_file()}


def test_a_missing_key_of_a_signed_log_refuses_start_and_makes_no_new_key(stopped):
    state, kid = stopped
    private, public = _keys(state)
    private.unlink()
    before = _unchanged(state)
    with pytest.raises(FailedPrecondition) as caught:
        open_log(state)
    assert caught.value.message == (
        f"evidence signing key {private} is missing, and the evidence log holds 5 events and 2 checkpoints signed "
        f"by key id {kid}: restore the key from backup (a new key cannot sign on for the old one); nothing was "
        "changed")
    assert not private.exists() and _unchanged(state) == before


def test_a_restored_key_lets_the_log_start_and_check_clean(stopped):
    state, kid = stopped
    private, _ = _keys(state)
    saved = state / "key-backup.pem"
    shutil.copy(private, saved)
    private.unlink()
    with pytest.raises(FailedPrecondition):
        open_log(state)
    shutil.copy(saved, private)
    private.chmod(0o600)
    log = open_log(state)
    try:
        assert log.key.kid == kid and fsck(log.store, log.key.public_key).ok
    finally:
        log.close()


def test_a_missing_key_of_a_log_with_events_but_no_checkpoint_refuses_start(tmp_path):
    log = open_log(tmp_path, {"checkpoint_every": 1000, "checkpoint_seconds": 3600})
    log.append("acme", [event("e0")], SERVICE)
    log.store.close()  # a crash before the first checkpoint: the plugin's stop would have signed one
    private, _ = _keys(tmp_path)
    private.unlink()
    with pytest.raises(FailedPrecondition, match="holds 1 events and no checkpoint yet: restore the key"):
        open_log(tmp_path)
    assert not private.exists()


def test_another_private_key_refuses_start(stopped):
    state, kid = stopped
    private, public = _keys(state)
    private.unlink()
    SigningKey.load_or_create(private)  # a key made by hand, not the one the log has
    made = SigningKey.load(private)
    before = _unchanged(state)
    with pytest.raises(FailedPrecondition) as caught:
        open_log(state)
    assert caught.value.message == (
        f"evidence signing key {private} (key id {made.kid}) is not the private half of {public} (key id {kid}): "
        "restore the matching pair from backup; the evidence log does not rotate keys")
    assert _unchanged(state) == before
    assert made.kid != kid


def test_a_new_pair_over_a_signed_log_refuses_start(stopped):
    """Both key files replaced: the checkpoints already signed still name the old key."""
    state, kid = stopped
    private, public = _keys(state)
    private.unlink()
    public.unlink()
    made, _ = SigningKey.load_or_create(private)
    public.write_bytes(made.public_pem())
    with pytest.raises(FailedPrecondition) as caught:
        open_log(state)
    assert caught.value.message == (
        f"evidence signing key {private} has key id {made.kid}, but the evidence log holds 2 checkpoints signed by "
        f"key id {kid}: restore that key from backup; the evidence log does not rotate keys")
    assert public.read_bytes() == made.public_pem()


def test_a_missing_public_key_is_written_again_from_the_log_key(stopped):
    state, kid = stopped
    private, public = _keys(state)
    old = public.read_bytes()
    public.unlink()
    open_log(state).close()
    assert public.read_bytes() == old


def test_a_new_log_makes_its_key_and_a_stale_public_half_alone_refuses(tmp_path):
    private, public = _keys(tmp_path)
    log = open_log(tmp_path)
    kid = log.key.kid
    log.close()
    assert private.stat().st_mode & 0o777 == 0o600 and SigningKey.load(private).kid == kid
    private.unlink()
    with pytest.raises(FailedPrecondition, match=f"{private} is missing but its public half {public} is there"):
        open_log(tmp_path)
    public.unlink()
    log = open_log(tmp_path)  # a log with no events may start again with a new key
    try:
        assert log.key.kid != kid and public.exists()
    finally:
        log.close()
