"""The evidence writer during a store outage: fail closed, or spool and replay, with gap events."""

from __future__ import annotations

import asyncio

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.identity import Identity
from planes.plugins.evidence.plane import Evidence
from planes.plugins.evidence.writer import MAGIC, EvidenceUnavailable, EvidenceWriter, Spool, SpoolCorrupted
from tests.plugins.evidence.conftest import event


class Switchable:
    """A real evidence plane behind a switch that makes it unreachable, like a store outage."""

    def __init__(self, log):
        self.plane = Evidence(log)
        self.up = True
        #: Batches the plane takes before it goes down, like an outage in mid-replay; None for no limit.
        self.down_after: int | None = None
        #: Awaited with each request before it is stored: what the writer's callers do while it waits.
        self.meanwhile = None
        #: Event ids of every batch the plane took, resent ones included.
        self.received: list[str] = []

    async def append_events(self, request, *, timeout=None):
        if self.down_after == 0:
            self.up = False
        if not self.up:
            raise errors.Unavailable("connection refused")
        if self.down_after is not None:
            self.down_after -= 1
        if self.meanwhile is not None:
            await self.meanwhile(request)
        self.received += [e.event_id for e in request.events]
        from planes.kernel.call import CallContext, TraceContext
        call = CallContext(Identity("svc", request.tenant or "*", frozenset({"service"})), "c",
                           TraceContext("a" * 32, "b" * 16))
        return await self.plane.append_events(request, call)


@pytest.fixture
def plane(log):
    switchable = Switchable(log)
    yield switchable
    switchable.plane.close()


def test_required_event_fails_closed_before_the_side_effect(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool", required=lambda kind: kind.startswith("effect."))
    side_effects = []

    async def governed_action():
        await writer.record("acme", [event("intent-1", event_type="effect.intent")])
        side_effects.append("charged the card")

    plane.up = False
    with pytest.raises(EvidenceUnavailable) as raised:
        run(governed_action())
    assert side_effects == []
    assert "effect.intent" in raised.value.message
    assert writer.spool.size == 0 and log.size == 0


def test_outage_buffers_then_replays_in_order(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool")

    async def scenario():
        await writer.record("acme", [event("a1")])
        plane.up = False
        await writer.record("acme", [event("a2"), event("a3")])
        await writer.record("globex", [event("g1")])
        plane.up = True
        await writer.record("acme", [event("a4")])  # still spooled: order is kept behind the backlog
        return await writer.replay()

    assert run(scenario()) == 4
    assert [e.event_id for e in log.query("acme")] == ["a1", "a2", "a3", "a4"]
    assert [e.event_id for e in log.query("globex")] == ["g1"]
    assert not writer.backlog and writer.spool.size == 0


def test_records_spooled_during_a_replay_are_kept_and_sent_after_the_earlier_ones(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool")

    async def meanwhile(request):
        if request.events[0].event_id == "a1":
            await writer.record("acme", [event("a3")])  # acknowledged while a1 is on its way

    async def scenario():
        plane.up = False
        await writer.record("acme", [event("a1")])
        await writer.record("acme", [event("a2")])
        plane.up, plane.meanwhile = True, meanwhile
        return await writer.replay()

    assert run(scenario()) == 3
    assert [e.event_id for e in log.query("acme")] == ["a1", "a2", "a3"]
    assert plane.received == ["a1", "a2", "a3"], "a3 waited behind the spooled records"
    assert not writer.backlog and writer.spool.size == 0


def test_losses_counted_while_a_gap_event_is_sent_get_a_gap_event_of_their_own(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=400)

    async def meanwhile(request):
        if request.events[0].event_type == "gap":
            plane.meanwhile = None
            await writer.record("acme", [event("too-big", blob=b"x" * 500)])  # can never fit: lost
            await writer.record("acme", [event("late")])

    async def scenario():
        plane.up = False
        for index in range(4):
            await writer.record("acme", [event(f"a{index}", blob=b"x" * 100)])
        plane.up, plane.meanwhile = True, meanwhile
        return await writer.replay()

    sent = run(scenario())
    events = log.query("acme")
    kinds = [e.event_id if e.event_type != "gap" else "gap" for e in events]
    assert kinds == [f"a{i}" for i in range(sent - 1)] + ["gap", "late", "gap"]
    counts = [{f.name: f.string_value for f in e.fields} for e in events if e.event_type == "gap"]
    assert [(c["lost_events"], c["lost_batches"]) for c in counts] == [(str(5 - sent), str(5 - sent)), ("1", "1")]
    assert not writer.backlog and not (tmp_path / "spool" / "gaps.state").exists()


def test_spool_holds_no_plaintext(run, plane, tmp_path):
    writer = EvidenceWriter(plane, tmp_path / "spool")
    plane.up = False
    run(writer.record("acme", [event("secret-event", prompt="the patient's diagnosis")]))
    raw = (tmp_path / "spool" / "spool.log").read_bytes()
    assert b"diagnosis" not in raw and b"secret-event" not in raw
    assert oct((tmp_path / "spool" / "spool.key").stat().st_mode & 0o777) == "0o600"


def test_overflow_writes_exactly_one_gap_event_per_tenant_with_counts(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=400)

    async def scenario():
        plane.up = False
        for index in range(6):
            await writer.record("acme", [event(f"a{index}", blob=b"x" * 60), event(f"b{index}")])
        spooled = sum(1 for _ in writer.spool.records())
        plane.up = True
        sent = await writer.replay()
        return spooled, sent

    spooled, sent = run(scenario())
    assert 0 < spooled < 6
    events = log.query("acme")
    gaps = [e for e in events if e.event_type == "gap"]
    assert len(gaps) == 1
    fields = {f.name: f.string_value for f in gaps[0].fields}
    assert fields["lost_events"] == str(12 - sent) and fields["lost_batches"] == str(6 - spooled)
    assert fields["cause"].startswith("Unavailable") or "unavailable" in fields["cause"]
    assert events[-1].event_type == "gap", "the gap is recorded after the replayed events"
    assert [e.event_id for e in events[:-1]] == [f"{p}{i}" for i in range(spooled) for p in "ab"]


def test_gap_counts_survive_a_restart_encrypted(run, plane, tmp_path, log):
    async def before_the_crash():
        writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=200)
        plane.up = False
        for index in range(10):
            await writer.record("acme-tenant", [event(f"e{index}")])
        return sum(1 for _ in writer.spool.records())

    async def after_the_restart():
        writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=200)
        assert writer.backlog
        plane.up = True
        return await writer.replay()

    spooled = run(before_the_crash())
    state = tmp_path / "spool" / "gaps.state"
    assert b"acme-tenant" not in state.read_bytes() and oct(state.stat().st_mode & 0o777) == "0o600"
    assert run(after_the_restart()) == spooled
    events = log.query("acme-tenant")
    gaps = [{f.name: f.string_value for f in e.fields} for e in events if e.event_type == "gap"]
    assert len(gaps) == 1 and events[-1].event_type == "gap"
    assert (gaps[0]["lost_events"], gaps[0]["lost_batches"]) == (str(10 - spooled), str(10 - spooled))
    assert "unavailable" in gaps[0]["cause"].lower() and "200 bytes" in gaps[0]["policy"]
    assert not state.exists() and not EvidenceWriter(plane, tmp_path / "spool").backlog


def test_undelivered_gap_event_survives_a_restart_apart_from_later_losses(run, plane, tmp_path, log):
    async def gap_refused():
        writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=10)
        plane.up = False
        await writer.record("acme", [event("lost-1"), event("lost-2")])
        plane.up, plane.down_after = True, 0
        with pytest.raises(errors.Unavailable):
            await writer.replay()
        await writer.record("acme", [event("lost-3")])  # counted in a gap of its own

    async def after_the_restart():
        plane.up, plane.down_after = True, None
        return await EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=10).replay()

    run(gap_refused())
    assert run(after_the_restart()) == 0
    gaps = [{f.name: f.string_value for f in e.fields} for e in log.query("acme")]
    assert [g["lost_events"] for g in gaps] == ["2", "1"]


def test_tampered_spool_is_refused_by_record(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    for index in range(3):
        spool.append(f"record {index}".encode())
    data = bytearray(spool.path.read_bytes())
    data[-1] ^= 1
    spool.path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupted, match="record 2 was altered"):
        Spool(tmp_path, max_bytes=10_000)


def test_removed_spool_record_breaks_the_chain(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"first")
    first_size = spool.size
    spool.append(b"second")
    spool.append(b"third")
    data = spool.path.read_bytes()
    spool.path.write_bytes(MAGIC + data[first_size:])  # drop the first record
    with pytest.raises(SpoolCorrupted, match="record 0"):
        Spool(tmp_path, max_bytes=10_000)


def test_replay_cut_short_by_a_second_outage_sends_the_rest_once_and_in_order(run, plane, tmp_path, log):
    writer = EvidenceWriter(plane, tmp_path / "spool")

    async def scenario():
        plane.up = False
        for index in range(1, 6):
            await writer.record("acme", [event(f"x{index}")])
        plane.up, plane.down_after = True, 2
        with pytest.raises(errors.Unavailable):
            await writer.replay()
        cut_short = [e.event_id for e in log.query("acme")], sum(1 for _ in writer.spool.records())
        plane.up, plane.down_after = True, None
        return cut_short, await writer.replay()

    (stored, left), second = run(scenario())
    assert stored == ["x1", "x2"] and left == 3, "the second outage hit after two deliveries; those left the spool"
    assert second == 3
    assert [e.event_id for e in log.query("acme")] == ["x1", "x2", "x3", "x4", "x5"]
    assert plane.received == ["x1", "x2", "x3", "x4", "x5"], "each event was sent exactly once"
    assert not writer.backlog


@pytest.mark.parametrize("kept", [7, 25], ids=["in the header", "in the ciphertext"])
def test_record_torn_by_a_crash_is_cut_and_the_rest_kept(tmp_path, kept):
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"acknowledged")
    acknowledged = spool.size
    spool.append(b"the crash hit while this was written")
    with open(spool.path, "r+b") as handle:
        handle.truncate(acknowledged + kept)
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert reopened.torn_bytes == kept
    assert list(reopened.records()) == [b"acknowledged"]
    reopened.append(b"next")
    assert list(Spool(tmp_path, max_bytes=10_000).records()) == [b"acknowledged", b"next"]


@pytest.mark.parametrize(("kept", "torn"), [(0, 0), (3, 3), (len(MAGIC) + 9, 9)],
                         ids=["empty", "in the signature", "in the first record"])
def test_first_write_torn_by_a_crash_leaves_an_empty_spool(tmp_path, kept, torn):
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"never acknowledged")
    with open(spool.path, "r+b") as handle:
        handle.truncate(kept)
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert reopened.torn_bytes == torn and list(reopened.records()) == []
    reopened.append(b"next")
    assert list(Spool(tmp_path, max_bytes=10_000).records()) == [b"next"]


@pytest.mark.parametrize("kept", [len(MAGIC), len(MAGIC) + 9], ids=["signature alone", "in the first record"])
def test_a_spool_left_with_no_record_is_no_backlog_and_replay_returns(run, plane, tmp_path, log, kept):
    """A crash in the first append must not leave a file that looks like a backlog forever (replay would spin)."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000)
    spool.append(b"never acknowledged")
    with open(spool.path, "r+b") as handle:
        handle.truncate(kept)
    writer = EvidenceWriter(plane, tmp_path / "spool")
    assert not writer.backlog and not writer.spool.path.exists()
    assert run(asyncio.wait_for(writer.replay(), 10)) == 0


def test_damaged_length_in_a_middle_record_is_corruption_not_a_torn_tail(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    ends = []
    for index in range(5):
        spool.append(f"record-{index}".encode() * 10)
        ends.append(spool.size)
    data = bytearray(spool.path.read_bytes())
    data[ends[0]] ^= 0x01  # one bit of record 1's length: it now runs past the end of the file
    spool.path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupted, match=f"record 1 \\(offset {ends[0]}\\) is damaged"):
        Spool(tmp_path, max_bytes=1 << 20)
    assert spool.path.read_bytes() == bytes(data), "nothing was cut"


def _legacy_spool(directory, records):
    """A spool file as written before record checksums: length, nonce, ciphertext from the first byte."""
    spool = Spool(directory, max_bytes=10_000)  # makes the key
    aead, previous, out = AESGCM((directory / "spool.key").read_bytes()), bytes(32), []
    for plaintext in records:
        nonce = bytes([len(out)]) * 12
        ciphertext = aead.encrypt(nonce, plaintext, previous)
        out.append(struct.pack(">I12s", len(ciphertext), nonce) + ciphertext)
        previous = hashlib.sha256(previous + ciphertext).digest()
    spool.path.write_bytes(b"".join(out))
    return spool.path


def test_spool_without_record_checksums_is_read_and_rewritten_with_them(tmp_path):
    path = _legacy_spool(tmp_path, [b"one", b"two", b"three"])
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert list(reopened.records()) == [b"one", b"two", b"three"]
    assert path.read_bytes().startswith(MAGIC)
    reopened.append(b"four")
    assert list(Spool(tmp_path, max_bytes=10_000).records()) == [b"one", b"two", b"three", b"four"]


def test_spool_without_record_checksums_ending_in_an_incomplete_record_is_refused(tmp_path):
    path = _legacy_spool(tmp_path, [b"one", b"two"])
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])
    keep = len(whole) - (16 + 3 + 16)
    with pytest.raises(SpoolCorrupted, match=f"{path}.*offset {keep}.*truncate the file to {keep} bytes"):
        Spool(tmp_path, max_bytes=10_000)
    assert path.read_bytes() == whole[:-3]


def test_a_gap_event_whose_acknowledgement_was_lost_is_resent_unchanged_after_a_restart_with_another_bound(
        run, plane, tmp_path, log):
    """The policy is kept with the sealed gap: the resent event is the stored one, not a changed replay."""
    async def acknowledgement_lost():
        writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=10)
        plane.up = False
        await writer.record("acme", [event("lost-1")])
        plane.up = True

        class StoredThenCut:
            async def append_events(self, request, *, timeout=None):
                await plane.append_events(request, timeout=timeout)
                raise errors.Unavailable("connection reset")

        writer.client = StoredThenCut()
        with pytest.raises(errors.Unavailable):
            await writer.replay()

    async def after_the_restart():
        writer = EvidenceWriter(plane, tmp_path / "spool", max_spool_bytes=4096)
        assert writer.backlog
        return await writer.replay()

    run(acknowledgement_lost())
    assert run(after_the_restart()) == 0
    gaps = [{f.name: f.string_value for f in e.fields} for e in log.query("acme") if e.event_type == "gap"]
    assert len(gaps) == 1 and gaps[0]["lost_events"] == "1"
    assert gaps[0]["policy"] == "buffer, spool bound 10 bytes", "the bound in force when the event was lost"


def test_a_spooled_batch_the_log_refuses_becomes_a_gap_and_does_not_block_the_rest(run, plane, tmp_path, log):
    """A spooled record the log will never take (here: its id now stored with other content) must not hold
    every later record, and every evidence-required event, behind it for good."""
    async def scenario():
        writer = EvidenceWriter(plane, tmp_path / "spool")
        plane.up = False
        await writer.record("acme", [event("e1", note="as spooled")])
        await writer.record("acme", [event("e2", note="behind it")])
        plane.up = True
        await plane.append_events(pb.AppendEventsRequest(tenant="acme", events=[event("e1", note="other")]))
        sent = await writer.replay()
        return sent, writer.backlog
    sent, backlog = run(scenario())
    assert sent == 1 and not backlog
    stored = {e.event_id: e for e in log.query("acme")}
    assert "e2" in stored, "the record behind the refused one was delivered"
    gaps = [{f.name: f.string_value for f in e.fields} for e in stored.values() if e.event_type == "gap"]
    assert len(gaps) == 1 and gaps[0]["lost_events"] == "1"
    assert gaps[0]["cause"].startswith("refused on replay: AlreadyExists: event 0: event id 'e1' was already "
                                       "appended")
