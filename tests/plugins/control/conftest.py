"""Helpers of the control-plane tests: signed snapshots, a settable clock, a subscriber's cache."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.contract import ContractVersion
from planes.kernel.digests import HASHES
from planes.kernel.tokens import SigningKey
from planes.plugins.control.subscriber import SNAPSHOT_CONTEXT, CachedConfig

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed_snapshot(key: SigningKey, revision: int, *, valid_from=T0 - 10, valid_for=3600, lease=60,
                    policy=pb.LEASE_EXPIRY_POLICY_STOP_ADMITTING, requires=(), note="",
                    algorithm=common_pb2.DIGEST_ALGORITHM_BLAKE3) -> pb.SignedSnapshot:
    content = pb.SnapshotContent(resources=[pb.Resource(
        name=f"route-{revision}", tenant="acme", spec=struct_pb2.Struct(fields={
            "note": struct_pb2.Value(string_value=note or f"r{revision}")}))]).SerializeToString()
    header = pb.Snapshot(
        revision=revision,
        content_digest=common_pb2.Digest(algorithm=algorithm, value=HASHES.get(algorithm, HASHES[common_pb2.DIGEST_ALGORITHM_SHA256])(
            content).digest()),
        not_before=timestamp_pb2.Timestamp(seconds=int(valid_from)),
        expires_at=timestamp_pb2.Timestamp(seconds=int(valid_from + valid_for)),
        lease=duration_pb2.Duration(seconds=lease), on_lease_expiry=policy, key_id=key.kid,
        required_contracts=[common_pb2.ContractVersion(plane=p, major=a, minor=b) for p, a, b in requires],
    ).SerializeToString()
    return pb.SignedSnapshot(snapshot=header, signature=key.private_key.sign(SNAPSHOT_CONTEXT + header),
                             key_id=key.kid, content=content)


@pytest.fixture
def key():
    return SigningKey.generate()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(tmp_path, key, clock):
    return CachedConfig(tmp_path / "config", {key.kid: key.public_key},
                        served={"execution": ContractVersion(1, 0)}, clock=clock)
