"""Bounded cached configuration on a subscriber, with a deterministic clock."""

from __future__ import annotations

import pytest

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.tokens import SigningKey
from planes.plugins.control.subscriber import (
    CachedConfig, ConfigState, SnapshotRejected, verify_snapshot)

from .conftest import T0, signed_snapshot


def test_nothing_is_admitted_before_a_verified_snapshot(cache):
    assert cache.state()[0] is ConfigState.EMPTY and not cache.admitting()


def test_verified_snapshot_is_applied(cache, key):
    applied = cache.offer(signed_snapshot(key, 1))
    assert applied.revision == 1 and cache.state() == (ConfigState.ACTIVE, "revision 1")
    assert applied.content().resources[0].name == "route-1"


def _rejected(cache, signed) -> SnapshotRejected:
    before = cache.current
    with pytest.raises(SnapshotRejected) as raised:
        cache.offer(signed)
    assert cache.current is before, "a refused snapshot changes nothing"
    return raised.value


def test_tampered_signature(cache, key):
    signed = signed_snapshot(key, 1)
    signed.signature = bytes(64)
    assert _rejected(cache, signed).reason == pb.NACK_REASON_BAD_SIGNATURE


def test_tampered_header_and_content(cache, key):
    signed = signed_snapshot(key, 1)
    header = bytearray(signed.snapshot)
    header[2] ^= 1
    forged = pb.SignedSnapshot(snapshot=bytes(header), signature=signed.signature, key_id=signed.key_id,
                               content=signed.content)
    assert _rejected(cache, forged).reason == pb.NACK_REASON_BAD_SIGNATURE
    swapped = pb.SignedSnapshot(snapshot=signed.snapshot, signature=signed.signature, key_id=signed.key_id,
                                content=signed_snapshot(key, 1, note="evil").content)
    assert _rejected(cache, swapped).reason == pb.NACK_REASON_DIGEST_MISMATCH


def test_sha256_content_digests_still_verify(cache, key):
    """Snapshots cut and cached before BLAKE3 became the content digest stay valid."""
    applied = cache.offer(signed_snapshot(key, 1, algorithm=common_pb2.DIGEST_ALGORITHM_SHA256))
    assert applied.header.content_digest.algorithm == common_pb2.DIGEST_ALGORITHM_SHA256
    assert cache.state() == (ConfigState.ACTIVE, "revision 1")


def test_content_digest_with_no_known_algorithm_is_refused(cache, key):
    signed = signed_snapshot(key, 1, algorithm=common_pb2.DIGEST_ALGORITHM_UNSPECIFIED)
    assert _rejected(cache, signed).reason == pb.NACK_REASON_DIGEST_MISMATCH


def test_unknown_key(cache):
    assert _rejected(cache, signed_snapshot(SigningKey.generate(), 1)).reason == pb.NACK_REASON_UNKNOWN_KEY


def test_replayed_old_and_equal_revisions_are_refused(cache, key):
    first, second = signed_snapshot(key, 1), signed_snapshot(key, 2)
    cache.offer(first)
    cache.offer(second)
    assert _rejected(cache, first).reason == pb.NACK_REASON_STALE_REVISION
    other_two = signed_snapshot(key, 2, note="different content")
    assert _rejected(cache, other_two).reason == pb.NACK_REASON_STALE_REVISION
    assert cache.offer(second).revision == 2, "the applied snapshot itself is a harmless re-delivery"


def test_expired_and_not_yet_valid(cache, key):
    assert _rejected(cache, signed_snapshot(key, 1, valid_from=T0 - 7200, valid_for=3600)).reason == \
        pb.NACK_REASON_EXPIRED
    assert _rejected(cache, signed_snapshot(key, 1, valid_from=T0 + 60)).reason == pb.NACK_REASON_NOT_YET_VALID


def test_missing_contract_is_a_clear_nack(cache, key):
    error = _rejected(cache, signed_snapshot(key, 1, requires=[("execution", 1, 2)]))
    assert error.reason == pb.NACK_REASON_MISSING_CONTRACT
    assert "needs the execution contract 1.2; this host serves 1.0" in error.message
    assert _rejected(cache, signed_snapshot(key, 1, requires=[("data", 1, 0)])).message.endswith("serves none")


@pytest.mark.parametrize(("policy", "after_lease"), [
    (pb.LEASE_EXPIRY_POLICY_DEGRADED, ConfigState.DEGRADED),
    (pb.LEASE_EXPIRY_POLICY_STOP_ADMITTING, ConfigState.STOP_ADMITTING),
    (pb.LEASE_EXPIRY_POLICY_UNSPECIFIED, ConfigState.STOP_ADMITTING),
])
def test_lease_expiry_then_policy_then_expiry(cache, key, clock, policy, after_lease):
    cache.offer(signed_snapshot(key, 1, lease=60, policy=policy, valid_for=600))
    clock.now += 59
    assert cache.state()[0] is ConfigState.ACTIVE
    clock.now += 1
    assert cache.state()[0] is after_lease
    assert cache.admitting() is (after_lease is ConfigState.DEGRADED)
    cache.heard_from_control()
    assert cache.state()[0] is ConfigState.ACTIVE, "hearing from the control plane renews the lease"
    clock.now = T0 - 10 + 600
    cache.heard_from_control()
    assert cache.state()[0] is ConfigState.STOP_ADMITTING, "past expiry nothing is admitted, lease or not"


def test_offline_restart_within_and_beyond_the_lease(tmp_path, key, clock):
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    CachedConfig(directory, keys, clock=clock).offer(signed_snapshot(key, 3, lease=120))
    clock.now += 100
    restarted = CachedConfig(directory, keys, clock=clock)
    assert restarted.current.revision == 3 and restarted.state()[0] is ConfigState.ACTIVE
    clock.now += 21
    assert CachedConfig(directory, keys, clock=clock).state()[0] is ConfigState.STOP_ADMITTING


def test_restart_refuses_a_cache_rolled_back_on_disk(tmp_path, key, clock):
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    cache = CachedConfig(directory, keys, clock=clock)
    old = signed_snapshot(key, 1)
    cache.offer(old)
    cache.offer(signed_snapshot(key, 2))
    (directory / "snapshot.bin").write_bytes(old.SerializeToString())  # someone restores an old file
    restarted = CachedConfig(directory, keys, clock=clock)
    state, reason = restarted.state()
    assert state is ConfigState.EMPTY and "older than revision 2" in reason
    with pytest.raises(SnapshotRejected):
        restarted.offer(old)


def test_damaged_cache_runs_with_nothing(tmp_path, key, clock):
    directory = tmp_path / "config"
    CachedConfig(directory, {key.kid: key.public_key}, clock=clock).offer(signed_snapshot(key, 1))
    (directory / "snapshot.bin").write_bytes(b"\x0a\x05garbage")
    restarted = CachedConfig(directory, {key.kid: key.public_key}, clock=clock)
    assert restarted.state()[0] is ConfigState.EMPTY and "refused" in restarted.state()[1]


def test_cache_files_are_private(cache, key, tmp_path):
    cache.offer(signed_snapshot(key, 1))
    for name in ("snapshot.bin", "subscriber.json"):
        assert oct((tmp_path / "config" / name).stat().st_mode & 0o777) == "0o600"


def test_verify_snapshot_alone(key):
    verified = verify_snapshot(signed_snapshot(key, 7), {key.kid: key.public_key}, T0)
    assert verified.revision == 7
