"""Quarantine and release, missing, deleted, expired and stale payloads, encryption at rest, restarts."""

from __future__ import annotations

import os
import stat

import blake3
import pytest

from planes.common.v1 import common_pb2
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contract import Encoded
from planes.native import load
from planes.plugins.data.client import IntegrityError

from .conftest import fields
from .test_admission import chunk, header, put_raw, trailer

codec = load("codec")

MARKER = b"PLAINTEXT-MARKER-7f3a9c" * 4000


@pytest.mark.parametrize("case, reason", [
    ("digest", pb.QUARANTINE_REASON_DIGEST_MISMATCH),
    ("size", pb.QUARANTINE_REASON_SIZE_MISMATCH),
    ("count", pb.QUARANTINE_REASON_CHUNK_COUNT_MISMATCH),
    ("chunk digest", pb.QUARANTINE_REASON_CHUNK_DIGEST_MISMATCH),
])
def test_mismatch_is_quarantined_kept_never_served_then_released_or_deleted(serve, case, reason):
    data = bytes(range(200)) * 5

    def stream():
        if case == "digest":
            return header(1000), chunk(data[:500], 0), chunk(data[500:], 500), trailer(data[::-1])
        if case == "size":
            return header(1200), chunk(data[:500], 0), chunk(data[500:], 500), trailer(data)
        if case == "count":
            return header(1000, chunks=3), chunk(data[:500], 0), chunk(data[500:], 500), trailer(data)
        lying = codec.encode_chunk(data[:500], 0, digest=True)
        lying = lying[:-32] + bytes(32)        # a chunk digest that is not its data's
        return header(1000), Encoded(lying), chunk(data[500:], 500), trailer(data)

    async def scenario(served):
        client = served.remote()
        with pytest.raises(errors.InvalidArgument, match="quarantined") as refused:
            await put_raw(client, *stream())
        payload_id = refused.value.metadata["payload_id"]
        data_client = served.data()
        with pytest.raises(errors.FailedPrecondition, match="quarantined"):
            await data_client.get(payload_id)
        stat_before = await data_client.stat(payload_id)
        operator = served.data("acme", roles=("operator",)).client
        listed = await operator.list_quarantine(pb.ListQuarantineRequest(tenant="acme"))
        with pytest.raises(errors.PermissionDenied):
            await served.data("globex", roles=("operator",)).client.list_quarantine(
                pb.ListQuarantineRequest(tenant="acme"))
        released = await operator.release_quarantine(pb.ReleaseQuarantineRequest(
            tenant="acme", payload_id=payload_id, reason="checked by hand"))
        got = await data_client.get_bytes(payload_id, verify=True)
        # A second quarantined payload, deleted for good this time.
        with pytest.raises(errors.InvalidArgument) as again:
            await put_raw(client, *stream())
        second = again.value.metadata["payload_id"]
        deleted = await operator.delete_quarantined(pb.DeleteQuarantinedRequest(tenant="acme", payload_id=second))
        with pytest.raises(errors.NotFound, match="deleted"):
            await data_client.get(second)
        on_disk = (served.state_dir / "data" / "objects" / second).exists()
        return stat_before, listed, released, got, deleted, on_disk, await served.events()

    stat_before, listed, released, got, deleted, on_disk, events = serve(scenario)
    assert stat_before.state == pb.PAYLOAD_STATE_QUARANTINED
    [entry] = listed.payloads
    assert entry.reason == reason and entry.declared.declared_size in (1000, 1200)
    assert entry.received_size == 1000 and entry.received_chunk_count == 2
    assert entry.received_digest.value == blake3.blake3(data).digest()
    assert released.payload.state == pb.PAYLOAD_STATE_AVAILABLE
    assert released.payload.ref.digest.value == blake3.blake3(data).digest(), "released with what arrived"
    assert got == data
    assert deleted.payload.reason == reason and not on_disk
    kinds = [e.event_type for e in events]
    assert kinds.count("data.quarantined") == 2 and "data.released" in kinds and "data.deleted" in kinds
    released_event = next(e for e in events if e.event_type == "data.released")
    assert fields(released_event)["reason"] == "checked by hand"


def test_missing_deleted_expired_stale_and_old_payloads_are_errors_naming_the_reference(serve):
    async def scenario(served):
        data = served.data()
        plane = served.plugin.plane
        missing = "pl_" + "0" * 32
        outcomes = {}

        async def attempt(name, payload_id, **options):
            try:
                await data.get(payload_id, **options)
                outcomes[name] = "served"
            except errors.PlanesError as exc:
                outcomes[name] = (type(exc).__name__, exc.message)

        await attempt("missing", missing)
        await attempt("malformed id", "../../etc/passwd")
        gone = await data.put(b"to delete", classification="internal")
        await data.delete(gone.ref.payload_id, reason="no longer needed")
        await attempt("deleted", gone.ref.payload_id)
        again = await data.delete(gone.ref.payload_id)

        fresh = await data.put(b"fresh", classification="internal", ttl=60)
        await attempt("stale digest", fresh.ref.payload_id,
                      expected_digest=common_pb2.Digest(algorithm=fresh.ref.digest.algorithm, value=bytes(32)))
        await attempt("right digest", fresh.ref.payload_id, expected_digest=fresh.ref.digest)
        real_clock = plane.clock
        plane.clock = lambda: real_clock() + 30 * 10**9             # 30 s later
        await attempt("too old", fresh.ref.payload_id, max_age=10)
        await attempt("young enough", fresh.ref.payload_id, max_age=45)
        plane.clock = lambda: real_clock() + 61 * 10**9             # past its time to live
        await attempt("expired", fresh.ref.payload_id)
        expired_stat = await data.stat(fresh.ref.payload_id)
        from planes.kernel.call import CallContext
        from planes.kernel.identity import Identity
        swept = await plane.sweep(CallContext(Identity("sweeper", "*", frozenset({"service"}))))
        on_disk = (served.state_dir / "data" / "objects" / fresh.ref.payload_id).exists()
        return outcomes, again, expired_stat, swept, on_disk

    outcomes, again, expired_stat, swept, on_disk = serve(scenario)
    missing = "pl_" + "0" * 32
    assert outcomes["missing"] == ("NotFound", f"payload {missing} not found in tenant acme")
    assert outcomes["malformed id"][0] == "InvalidArgument" and "passwd" not in outcomes["malformed id"][1]
    assert outcomes["deleted"][0] == "NotFound" and "was deleted" in outcomes["deleted"][1]
    assert again.state == pb.PAYLOAD_STATE_DELETED, "deleting twice returns it unchanged"
    assert outcomes["stale digest"][0] == "FailedPrecondition" and "stale reference" in outcomes["stale digest"][1]
    assert outcomes["right digest"] == "served" and outcomes["young enough"] == "served"
    assert outcomes["too old"][0] == "FailedPrecondition" and "older than" in outcomes["too old"][1]
    assert outcomes["expired"][0] == "NotFound" and "expired at" in outcomes["expired"][1]
    assert expired_stat.state == pb.PAYLOAD_STATE_EXPIRED
    assert swept == 1 and not on_disk


def test_encrypted_payloads_round_trip_across_segments(serve):
    async def scenario(served):
        data = served.data()
        # Several sealed segments, received in chunks that straddle them.
        secret = await data.put(MARKER * 30, classification="confidential")
        restricted = await data.put(MARKER * 30, classification="restricted", chunk_bytes=77777)
        public = await data.put(MARKER, classification="public")
        back = [await data.get_bytes(i.ref.payload_id, verify=True) for i in (secret, restricted)]
        return secret, restricted, public, back

    secret, restricted, public, back = serve(scenario)
    assert back == [MARKER * 30, MARKER * 30]
    assert secret.encrypted_at_rest and restricted.encrypted_at_rest and not public.encrypted_at_rest


def test_nothing_on_disk_holds_confidential_plaintext(serve, tmp_path):
    async def scenario(served):
        data = served.data()
        secret = await data.put(MARKER, classification="confidential")
        public = await data.put(MARKER, classification="public")
        return secret.ref.payload_id, public.ref.payload_id

    secret_id, public_id = serve(scenario)
    objects = tmp_path / "data" / "objects"
    assert (objects / public_id).read_bytes() == MARKER, "public payloads are stored as they are, for mmap"
    needle = MARKER[:23]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != public_id:
            assert needle not in path.read_bytes(), f"plaintext found in {path.relative_to(tmp_path)}"
    key = tmp_path / "keys" / "data-master.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32


@pytest.mark.parametrize("damage", ["flip a byte", "cut the tail", "swap the key"])
def test_tampered_encrypted_payload_is_never_served(serve, tmp_path, damage):
    async def scenario(served):
        data = served.data()
        info = await data.put(MARKER * 30, classification="restricted")     # several sealed segments
        path = served.state_dir / "data" / "objects" / info.ref.payload_id
        raw = bytearray(path.read_bytes())
        if damage == "flip a byte":
            raw[len(raw) // 2] ^= 1
            path.write_bytes(raw)
        elif damage == "cut the tail":
            path.write_bytes(raw[:(1 << 20) + 16])                             # exactly one whole record left
        else:
            other = await data.put(MARKER, classification="restricted")
            store = served.plugin.store
            record, donor = store.get(info.ref.payload_id), store.get(other.ref.payload_id)
            record.wrapped_key = donor.wrapped_key
            store.update(record)
        with pytest.raises((IntegrityError, errors.Internal)) as refused:
            await data.get(info.ref.payload_id)
        return refused.value

    refused = serve(scenario)
    assert b"PLAINTEXT" not in str(refused).encode()


def test_acknowledged_payloads_survive_a_restart_and_partial_puts_are_removed(serve, tmp_path):
    async def first(served):
        info = await served.data().put(MARKER, classification="confidential")
        # What a crash in the middle of a put leaves behind.
        (served.state_dir / "data" / "incoming" / ("pl_" + "f" * 32)).write_bytes(b"partial")
        return info

    async def second(served):
        return (await served.data().get_bytes(info.ref.payload_id, verify=True),
                os.listdir(served.state_dir / "data" / "incoming"), served.plugin.store.removed_partial)

    info = serve(first)
    got, incoming, removed = serve(second)
    assert got == MARKER and incoming == [] and removed == 1


def test_a_quarantined_put_keeps_no_task_credential(serve, caplog):
    """The worker's credential is a bearer secret: neither the catalogue nor the operator's review may hold it."""
    import time

    from planes.plugins.execution.credentials import issue_credential

    data = b"a worker's output" * 10

    async def scenario(served):
        credential = issue_credential(served.kernel.signing_key, tenant="acme", task_id="t-1", attempt_epoch=1,
                                      payload_ids=[], expires_at=time.time() + 60).token
        worker = served.data(roles=("worker",), task_credential=credential)
        payload_ids = []
        for _ in range(2):
            with pytest.raises(errors.InvalidArgument, match="quarantined") as refused:
                await worker.put(data, classification="confidential", digest=bytes(32))
            payload_ids.append(refused.value.metadata["payload_id"])
        operator = served.data(roles=("operator",)).client
        listed = await operator.list_quarantine(pb.ListQuarantineRequest(tenant="acme"))
        deleted = await operator.delete_quarantined(pb.DeleteQuarantinedRequest(
            tenant="acme", payload_id=payload_ids[0], reason="bad output"))
        return credential, listed, deleted, await served.events(), served.state_dir

    credential, listed, deleted, events, state_dir = serve(scenario)
    assert len(listed.payloads) == 2 and deleted.payload.declared.declared_size == len(data)
    for entry in (*listed.payloads, deleted.payload):
        assert entry.declared.task_credential == "" and entry.declared.tenant == "acme"
    secret = credential.encode()
    assert secret not in listed.SerializeToString() and secret not in deleted.SerializeToString()
    assert all(secret not in event.SerializeToString() for event in events)
    assert credential not in caplog.text
    stored = [path for path in state_dir.rglob("*") if path.is_file()]
    assert any(path.name.startswith("payloads.sqlite3") for path in stored)
    assert [path.name for path in stored if secret in path.read_bytes()] == [], "no file of the state holds it"
