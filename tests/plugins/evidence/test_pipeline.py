"""Pipelined appends (``EvidenceLog.append_many``): each batch encoded while the one before it is stored."""

from __future__ import annotations


import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel import errors
from planes.native import load
from planes.plugins.evidence import open_log
from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import SERVICE, event, in_forked_child

chain = load("chain")


def request(prefix: str, count: int, **fields) -> bytes:
    fields = fields or {"prompt": "hello", "digest": bytes(32)}
    return pb.AppendEventsRequest(events=[event(f"{prefix}-{i}", correlation=f"{prefix}-c{i // 7}", **fields)
                                          for i in range(count)]).SerializeToString()


def assert_log_verifies(log) -> None:
    stored = [log.store.event_at(s) for s in range(1, log.size + 1)]
    assert [e.sequence for e in stored] == list(range(1, log.size + 1))
    assert chain.verify_chain(bytes(32), b"".join(e.leaf_hash for e in stored),
                              b"".join(e.chain_head for e in stored)) == -1
    report = fsck(log.store, log.key.public_key)
    assert report.ok, report.problems


def test_append_many_acknowledges_every_batch_in_order(log):
    batches = [("acme", request(f"b{n}", 300)) for n in range(5)]
    results = log.append_many(batches, SERVICE)
    assert [r.sequences for r in results] == [list(range(n * 300 + 1, n * 300 + 301)) for n in range(5)]
    assert [r.appended for r in results] == [300] * 5
    for result in results:  # each acknowledgement carries the head as of its own last event
        assert result.chain_head == log.store.event_at(result.sequences[-1]).chain_head
    assert results[-1].chain_head == log.head and log.size == 1500
    assert [e.event_id for e in log.query("acme", correlation_id="b3-c2")] == [f"b3-{i}" for i in range(14, 21)]
    assert_log_verifies(log)


def test_append_many_of_one_batch_and_of_none(log):
    assert log.append_many([], SERVICE) == []
    [only] = log.append_many([("acme", request("solo", 10))], SERVICE)
    assert only.sequences == list(range(1, 11)) and log.size == 10


def test_a_replay_in_one_batch_re_encodes_the_batch_encoded_ahead_of_it(log):
    """Batch 1 repeats an event, so the log ends one short of where batch 2 was encoded: it is encoded again."""
    first = pb.AppendEventsRequest(events=[event(f"a-{i}") for i in range(100)])
    second = pb.AppendEventsRequest(events=[event("a-99")] + [event(f"b-{i}") for i in range(99)])
    results = log.append_many([("acme", first.SerializeToString()), ("acme", second.SerializeToString()),
                               ("acme", request("c", 100))], SERVICE)
    assert (results[1].appended, results[1].duplicates) == (99, 1)
    assert results[1].sequences == [100] + list(range(101, 200))
    assert results[2].sequences == list(range(200, 300)), "no gap and no reuse after the short batch"
    assert log.size == 299
    assert_log_verifies(log)


def test_a_bad_batch_is_named_and_only_the_batches_before_it_are_stored(log):
    bad = pb.AppendEventsRequest(events=[event("x-0"), event("x-1", event_type="Not A Type")]).SerializeToString()
    with pytest.raises(errors.InvalidArgument, match=r"^batch 1: event 1: event_type must be a dotted"):
        log.append_many([("acme", request("ok", 50)), ("acme", bad), ("acme", request("later", 50))], SERVICE)
    assert log.size == 50
    assert {e.event_id for e in log.query("acme", limit=1000)} == {f"ok-{i}" for i in range(50)}
    retried = log.append_many([("acme", request("ok", 50)), ("acme", request("later", 50))], SERVICE)
    assert (retried[0].appended, retried[0].duplicates) == (0, 50), "a retried list replays harmlessly"
    assert retried[1].sequences == list(range(51, 101))
    assert_log_verifies(log)


def test_a_batch_over_the_event_limit_is_named(log):
    too_many = pb.AppendEventsRequest(events=[event(f"m-{i}") for i in range(10_001)]).SerializeToString()
    with pytest.raises(errors.LimitExceeded, match=r"batch 1: 10001 events > 10000") as caught:
        log.append_many([("acme", request("ok", 5)), ("acme", too_many)], SERVICE)
    assert (caught.value.limit, caught.value.actual) == (10_000, 10_001)
    assert log.size == 5


def test_a_failed_store_keeps_the_batches_before_it_and_nothing_after(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    writes = []
    real = log.store._write_segment

    def fails_second(parts, at):
        writes.append(at)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return real(parts, at)

    monkeypatch.setattr(log.store, "_write_segment", fails_second)
    with pytest.raises(OSError, match="No space left"):
        log.append_many([("acme", request(f"f{n}", 200)) for n in range(4)], SERVICE)
    monkeypatch.undo()
    assert log.size == 200 and log.store.head()[0] == 200
    assert log.head == log.store.event_at(200).chain_head
    results = log.append_many([("acme", request(f"f{n}", 200)) for n in range(4)], SERVICE)
    assert [r.appended for r in results] == [0, 200, 200, 200] and log.size == 800
    log.close()
    reopened = open_log(tmp_path)
    assert reopened.size == 800
    assert_log_verifies(reopened)
    reopened.close()


def _append_many_in_child(log) -> int:
    results = log.append_many([("acme", request(f"child{n}", 100)) for n in range(3)], SERVICE)
    return results[-1].sequences[-1]


def test_a_forked_child_can_append_many(tmp_path):
    """The encoder worker does not survive fork; the child makes its own."""
    log = open_log(tmp_path)
    log.append_many([("acme", request(f"parent{n}", 100)) for n in range(3)], SERVICE)
    last, exitcode = in_forked_child(_append_many_in_child, log)
    assert exitcode == 0 and last == 600
    log.close()
    reopened = open_log(tmp_path)
    assert reopened.query("acme", limit=10_000)[-1].event_id == "child2-99"
    reopened.close()


def test_an_append_between_pushes_makes_the_batch_encoded_ahead_encode_again(log):
    pipeline = log.pipeline(SERVICE)
    assert pipeline.push("acme", request("p0", 50)) is None, "nothing is stored until the next push or finish"
    assert log.size == 0
    first = pipeline.push("acme", request("p1", 50))  # stores p0 while p1 is encoded on sequences 51..100
    assert first.sequences == list(range(1, 51))
    other = log.append("acme", [event("other-0"), event("other-1")], SERVICE)
    assert other.sequences == [51, 52], "an append between pushes is not held up"
    last = pipeline.finish()
    assert last.sequences == list(range(53, 103)) and log.size == 102
    assert pipeline.finish() is None
    assert_log_verifies(log)



def test_a_pipelined_replay_with_other_content_is_refused_and_named(log):
    """The native path finds the replay through the id index; the batch is refused whole, the ones before stay."""
    changed = pb.AppendEventsRequest(events=[event("new-0"), event("ok-3", correlation="ok-c0", prompt="different",
                                                                        digest=bytes(32))])
    with pytest.raises(errors.AlreadyExists,
                       match=r"^batch 1: event 1: event id 'ok-3' was already appended \(sequence 4\) with "
                             r"different content \(field 'prompt'\)"):
        log.append_many([("acme", request("ok", 50)), ("acme", changed.SerializeToString()),
                         ("acme", request("later", 50))], SERVICE)
    assert log.size == 50 and log.store.event("acme", "new-0") is None
    assert {f.name: f.string_value for f in log.query("acme", limit=10)[3].fields}["prompt"] == "hello"
    retried = log.append_many([("acme", request("ok", 50)), ("acme", request("later", 50))], SERVICE)
    assert (retried[0].appended, retried[0].duplicates) == (0, 50), "identical replays are still acknowledged"
    assert retried[1].sequences == list(range(51, 101))
    assert_log_verifies(log)


def test_append_encoded_refuses_one_id_twice_with_other_content_and_a_changed_replay(log):
    log.append_encoded("acme", request("ok", 5), SERVICE)
    head = log.head
    twice = pb.AppendEventsRequest(events=[event("d-1", prompt="a"), event("d-1", prompt="b")])
    with pytest.raises(errors.InvalidArgument, match=r"event 1: event id 'd-1' appears earlier in this batch"):
        log.append_encoded("acme", twice.SerializeToString(), SERVICE)
    changed = pb.AppendEventsRequest(events=[event("ok-0", event_type="tool.failed", correlation="ok-c0",
                                                   prompt="hello", digest=bytes(32))])
    with pytest.raises(errors.AlreadyExists, match=r"event 0: event id 'ok-0' .* \(event_type\)"):
        log.append_encoded("acme", changed.SerializeToString(), SERVICE)
    assert (log.size, log.head) == (5, head)
    assert log.append_encoded("acme", request("ok", 5), SERVICE).sequences == [1, 2, 3, 4, 5]
