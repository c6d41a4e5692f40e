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
    # A plane this host does not serve is not its concern: the hosts that serve it check it.
    assert cache.offer(signed_snapshot(key, 1, requires=[("data", 1, 5)])).revision == 1


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


def _at_revision_2(tmp_path, key, clock):
    """A cache that applied revisions 1 then 2: its directory, the keys it trusts, and revision 1's snapshot."""
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    cache = CachedConfig(directory, keys, clock=clock)
    old = signed_snapshot(key, 1)
    cache.offer(old)
    cache.offer(signed_snapshot(key, 2))
    return directory, keys, old


def test_restart_refuses_a_cache_rolled_back_on_disk(tmp_path, key, clock):
    directory, keys, old = _at_revision_2(tmp_path, key, clock)
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


def _flip_one_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_cache_accepts_the_revision_it_trusted_again(tmp_path, key, clock):
    """A refused cache is no reason to refuse the fleet's revision: re-fetching it is not a rollback."""
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    cache = CachedConfig(directory, keys, clock=clock)
    for revision in (1, 2, 3):
        cache.offer(signed_snapshot(key, revision))
    _flip_one_byte(directory / "snapshot.bin")
    restarted = CachedConfig(directory, keys, clock=clock)
    state, reason = restarted.state()
    assert restarted.current is None and state is ConfigState.EMPTY and reason.startswith("cached snapshot refused")
    assert not restarted.admitting()
    assert _rejected(restarted, signed_snapshot(key, 2)).reason == pb.NACK_REASON_STALE_REVISION, \
        "below the floor stays refused"
    assert restarted.offer(signed_snapshot(key, 3)).revision == 3
    assert restarted.state() == (ConfigState.ACTIVE, "revision 3")
    assert _rejected(restarted, signed_snapshot(key, 3, note="other")).reason == pb.NACK_REASON_STALE_REVISION
    again = CachedConfig(directory, keys, clock=clock)
    assert again.current.revision == 3 and again.high_water == 3 and again.load_problem == "", \
        "the re-fetched revision is cached again"


def test_rolled_back_cache_accepts_the_high_water_revision_only(tmp_path, key, clock):
    directory, keys, old = _at_revision_2(tmp_path, key, clock)
    (directory / "snapshot.bin").write_bytes(old.SerializeToString())
    restarted = CachedConfig(directory, keys, clock=clock)
    error = _rejected(restarted, old)
    assert error.reason == pb.NACK_REASON_STALE_REVISION and "older than revision 2" in error.message
    assert restarted.offer(signed_snapshot(key, 2)).revision == 2


def test_health_reported_while_the_cache_is_refused_is_not_healthy(tmp_path, key, clock):
    from planes.plugins.control.subscriber import config_health

    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    CachedConfig(directory, keys, clock=clock).offer(signed_snapshot(key, 1, lease=60))
    _flip_one_byte(directory / "snapshot.bin")
    refused = CachedConfig(directory, keys, clock=clock)
    health = config_health(refused)
    assert health.state == common_pb2.HealthSummary.STATE_STOP_ADMITTING
    assert health.reason.startswith("configuration empty: cached snapshot refused")
    refused.offer(signed_snapshot(key, 1, lease=60))
    assert config_health(refused) == common_pb2.HealthSummary(state=common_pb2.HealthSummary.STATE_HEALTHY,
                                                              reason="configuration active: revision 1")
    clock.now += 61
    assert config_health(refused).state == common_pb2.HealthSummary.STATE_STOP_ADMITTING


@pytest.mark.parametrize("damage", [b'{"high_water": 3, "last_con', b"", b"[3]", b'{"high_water": "three"}'])
def test_damaged_state_file_keeps_the_floor_from_the_cached_snapshot(tmp_path, key, clock, caplog, damage):
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    cache = CachedConfig(directory, keys, clock=clock)
    for revision in (1, 2, 3):
        cache.offer(signed_snapshot(key, revision))
    (directory / "subscriber.json").write_bytes(damage)
    with caplog.at_level("WARNING", logger="planes.plugins.control.subscriber"):
        restarted = CachedConfig(directory, keys, clock=clock)
    assert restarted.current.revision == 3 and restarted.high_water == 3
    assert restarted.state()[0] is ConfigState.STOP_ADMITTING, "the lease is unknown until the next contact"
    [warning] = [r.getMessage() for r in caplog.records]
    assert "subscriber.json is damaged" in warning and "floor kept from the cached snapshot (revision 3)" in warning
    assert _rejected(restarted, signed_snapshot(key, 2)).reason == pb.NACK_REASON_STALE_REVISION
    restarted.heard_from_control()
    assert restarted.state()[0] is ConfigState.ACTIVE
    assert CachedConfig(directory, keys, clock=clock).high_water == 3, "the state file is whole again"


def test_damaged_state_file_and_cache_say_the_floor_is_lost(tmp_path, key, clock, caplog):
    directory = tmp_path / "config"
    keys = {key.kid: key.public_key}
    cache = CachedConfig(directory, keys, clock=clock)
    cache.offer(signed_snapshot(key, 1))
    cache.offer(signed_snapshot(key, 2))
    (directory / "subscriber.json").write_bytes(b'{"high_wa')
    _flip_one_byte(directory / "snapshot.bin")
    with caplog.at_level("WARNING", logger="planes.plugins.control.subscriber"):
        restarted = CachedConfig(directory, keys, clock=clock)
    assert restarted.current is None and restarted.state()[0] is ConfigState.EMPTY
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "snapshot.bin: cached snapshot refused" in messages
    assert "subscriber.json is damaged" in messages and "anti-rollback floor lost" in messages
    assert restarted.offer(signed_snapshot(key, 2)).revision == 2, "fetched afresh"
