"""The evidence log: appends, limits, checkpoints, proofs, corrections, redactions, isolation."""

from __future__ import annotations

import hashlib

import pytest

from planes.common.v1 import common_pb2
from planes.kernel import errors
from planes.kernel.identity import Identity
from planes.native import load
from planes.plugins.evidence import open_log
from tests.plugins.evidence.conftest import SERVICE, event

chain = load("chain")


def test_append_assigns_sequences_and_chains(log):
    result = log.append("acme", [event("e1", prompt="hi"), event("e2", output=b"\x00\x01")], SERVICE)
    assert result.sequences == [1, 2] and result.appended == 2 and result.duplicates == 0
    assert log.size == 2 and result.chain_head == log.head
    stored = [log.store.event_at(s) for s in (1, 2)]
    assert chain.verify_chain(bytes(32), b"".join(e.leaf_hash for e in stored),
                              b"".join(e.chain_head for e in stored)) == -1
    events = log.query("acme")
    assert [e.event_id for e in events] == ["e1", "e2"]
    assert events[0].fields[0].string_value == "hi" and len(events[0].fields[0].commitment.value) == 32
    assert events[0].correlation.actor == "billing-svc", "the appender is the actor when none is named"


def test_replayed_batch_is_not_appended_twice(log):
    first = log.append("acme", [event("e1"), event("e2")], SERVICE)
    again = log.append("acme", [event("e2"), event("e3"), event("e3")], SERVICE)
    assert again.sequences == [2, 3, 3]
    assert (again.appended, again.duplicates) == (1, 2)
    assert log.size == 3
    assert first.sequences == [1, 2]


@pytest.mark.parametrize(("bad", "error", "message"), [
    (lambda: event(""), errors.InvalidArgument, "event_id is required"),
    (lambda: event("x", event_type="Not A Type"), errors.InvalidArgument, "dotted lower-case"),
    (lambda: event("x", tenant="globex"), errors.PermissionDenied, "not the request's tenant"),
])
def test_invalid_event_is_refused_and_nothing_is_appended(log, bad, error, message):
    log.append("acme", [event("ok-1")], SERVICE)
    with pytest.raises(error, match=message):
        log.append("acme", [event("ok-2"), bad()], SERVICE)
    assert log.size == 1, "the whole batch is refused; nothing from it was stored"
    assert [e.event_id for e in log.query("acme")] == ["ok-1"]


def test_sequence_is_assigned_by_the_log(log):
    bad = event("x")
    bad.sequence = 7
    with pytest.raises(errors.InvalidArgument, match="assigned by the log"):
        log.append("acme", [bad], SERVICE)


def test_duplicate_field_names_are_refused(log):
    bad = event("x", a="1")
    bad.fields.add(name="a", string_value="2")
    with pytest.raises(errors.InvalidArgument, match="appears twice"):
        log.append("acme", [bad], SERVICE)


@pytest.mark.parametrize("size,accepted", [(64 * 1024 - 1, True), (64 * 1024, True), (64 * 1024 + 1, False)])
def test_field_value_limit(log, size, accepted):
    attempt = event("big", blob=b"x" * size)
    if accepted:
        assert log.append("acme", [attempt], SERVICE).appended == 1
    else:
        with pytest.raises(errors.LimitExceeded) as raised:
            log.append("acme", [attempt], SERVICE)
        assert (raised.value.limit, raised.value.actual) == (64 * 1024, size)
        assert log.size == 0


def test_batch_and_field_count_limits(tmp_path):
    from dataclasses import replace
    opened = open_log(tmp_path)
    opened.limits = replace(opened.limits, events_per_batch=3, fields_per_event=2)
    assert opened.append("acme", [event(f"e{i}") for i in range(3)], SERVICE).appended == 3
    with pytest.raises(errors.LimitExceeded) as batch:
        opened.append("acme", [event(f"f{i}") for i in range(4)], SERVICE)
    assert (batch.value.name, batch.value.limit, batch.value.actual) == ("events_per_batch", 3, 4)
    with pytest.raises(errors.LimitExceeded) as fields:
        opened.append("acme", [event("g", a="1", b="2", c="3")], SERVICE)
    assert (fields.value.limit, fields.value.actual) == (2, 3)
    assert opened.size == 3


def test_supplied_commitment_must_match(log):
    from planes.plugins.evidence import leaf as leaves
    good = event("c1", secret="v")
    good.fields[0].salt = b"s" * 16
    good.fields[0].commitment.value = leaves.commitment(b"s" * 16, "secret", leaves.KIND_STRING, b"v")
    assert log.append("acme", [good], SERVICE).appended == 1
    bad = event("c2", secret="v")
    bad.fields[0].salt = b"s" * 16
    bad.fields[0].commitment.value = b"\x00" * 32
    with pytest.raises(errors.InvalidArgument, match="does not match"):
        log.append("acme", [bad], SERVICE)


def test_checkpoint_every_n_events_and_proofs(log):
    log.append("acme", [event(f"e{i}", n=str(i)) for i in range(10)], SERVICE)
    sizes = [row[0] for row in log.store.checkpoints()]
    assert sizes == [10], "one checkpoint after the batch crossed the threshold"
    log.append("acme", [event("e10")], SERVICE)
    signed = log.checkpoint_now()
    from planes.evidence.v1 import evidence_service_pb2 as pb
    checkpoint = pb.Checkpoint.FromString(signed.checkpoint)
    assert checkpoint.tree_size == 11 and checkpoint.chain_head == log.head
    for index in range(11):
        proof = log.prove_inclusion("acme", f"e{index}", 11)
        assert proof.leaf_index == index
        # The proof is of this event's own leaf, hashed here, not of whatever hash the log sent along.
        assert proof.leaf_hash == hashlib.sha256(b"\x00" + log.store.event("acme", f"e{index}").leaf).digest()
        assert chain.verify_inclusion(proof.leaf_hash, index, 11, list(proof.audit_path), checkpoint.root_hash)
    consistency = log.prove_consistency(10, 11)
    first = pb.Checkpoint.FromString(consistency.first.checkpoint)
    assert chain.verify_consistency(10, 11, first.root_hash, checkpoint.root_hash, list(consistency.proof))


def test_correction_links_to_the_original_which_never_changes(log):
    log.append("acme", [event("e1", amount="100")], SERVICE)
    before = log.store.event("acme", "e1")
    from planes.evidence.v1 import evidence_service_pb2 as pb
    correction = log.correct("acme", "e1", [pb.EventField(name="amount", string_value="110")], "typo", SERVICE)
    assert correction.event_type == "correction" and correction.corrects_event_id == "e1"
    assert {f.name: f.string_value for f in correction.fields} == {"amount": "110", "reason": "typo"}
    assert log.store.event("acme", "e1") == before


def test_redaction_removes_the_value_keeps_the_commitment_and_proofs(log):
    log.append("acme", [event("e1", prompt="my card is 4111", model="m1")], SERVICE)
    signed_before = log.checkpoint_now()
    redaction, redacted = log.redact("acme", "e1", "prompt", "PII", Identity("rev", "acme", frozenset({"reviewer"})))
    field = {f.name: f for f in redacted.fields}["prompt"]
    assert field.redacted and not field.string_value and not field.salt and len(field.commitment.value) == 32
    assert {f.name: f for f in redacted.fields}["model"].string_value == "m1"
    assert redaction.event_type == "redaction" and redaction.correlation.actor == "rev"
    assert {f.name: f.string_value for f in redaction.fields} == {"field": "prompt", "reason": "PII"}
    from planes.evidence.v1 import evidence_service_pb2 as pb
    checkpoint = pb.Checkpoint.FromString(signed_before.checkpoint)
    proof = log.prove_inclusion("acme", "e1", checkpoint.tree_size)
    assert proof.leaf_hash == hashlib.sha256(b"\x00" + log.store.event("acme", "e1").leaf).digest()
    assert chain.verify_inclusion(proof.leaf_hash, 0, 1, list(proof.audit_path), checkpoint.root_hash)
    from planes.plugins.evidence.fsck import fsck
    assert fsck(log.store, log.key.public_key).ok


def test_tenants_are_isolated(log):
    log.append("acme", [event("a1")], SERVICE)
    log.append("globex", [event("g1")], Identity("g", "globex", frozenset({"service"})))
    assert [e.event_id for e in log.query("acme")] == ["a1"]
    assert [e.event_id for e in log.query("globex")] == ["g1"]
    with pytest.raises(errors.NotFound):
        log.prove_inclusion("acme", "g1")
    with pytest.raises(errors.NotFound):
        log.redact("acme", "g1", "x", "r", SERVICE)


def test_event_ids_are_per_tenant_another_tenants_id_is_a_new_event(tmp_path):
    """A reused id from another tenant is stored as that tenant's event, never taken for a replay of the first."""
    globex = Identity("g", "globex", frozenset({"service"}))
    initech = Identity("i", "initech", frozenset({"service"}))
    log = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    first = log.append("acme", [event("order-42", amount="100")], SERVICE)
    second = log.append("globex", [event("order-42", amount="999")], globex)  # one event: the native path
    assert (second.appended, second.duplicates) == (1, 0) and second.sequences != first.sequences
    mixed = log.append("initech", [event("order-42", amount="7"), event("order-43", amount="8")], initech)
    assert (mixed.appended, mixed.duplicates) == (2, 0)
    replay = log.append("globex", [event("order-42", amount="999"), event("order-44")], globex)
    assert replay.sequences[0] == second.sequences[0] and (replay.appended, replay.duplicates) == (1, 1)
    assert log.store._write.execute("SELECT count(*) FROM event_id_collisions").fetchone()[0] == 0, \
        "another tenant's id is no collision: the index keys ids by tenant"

    def amounts(tenant):
        return [(e.event_id, {f.name: f.string_value for f in e.fields}.get("amount")) for e in log.query(tenant)]

    def checks(log):
        assert amounts("acme") == [("order-42", "100")]
        assert amounts("globex") == [("order-42", "999"), ("order-44", None)]
        assert amounts("initech") == [("order-42", "7"), ("order-43", "8")]
        for tenant, sequence in (("acme", first.sequences[0]), ("globex", second.sequences[0]),
                                 ("initech", mixed.sequences[0])):
            assert log.prove_inclusion(tenant, "order-42").leaf_index == sequence - 1
        with pytest.raises(errors.NotFound):
            log.prove_inclusion("umbrella", "order-42")

    checks(log)
    log.redact("globex", "order-42", "amount", "mistake", globex)
    assert amounts("acme") == [("order-42", "100")], "redacting one tenant's event leaves the other's"
    log.close()
    reopened = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})  # index rebuilt from disk
    try:
        again = reopened.append("initech", [event("order-42", amount="7")], initech)
        assert (again.appended, again.duplicates, again.sequences) == (0, 1, [mixed.sequences[0]])
        assert reopened.prove_inclusion("initech", "order-42").leaf_index == mixed.sequences[0] - 1
        assert reopened.store.event("acme", "order-42").sequence == first.sequences[0]
        assert reopened.store.event("umbrella", "order-42") is None
    finally:
        reopened.close()


def test_collisions_of_the_earlier_format_move_to_the_per_tenant_table(tmp_path):
    import sqlite3
    log = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    log.append("acme", [event("a1"), event("a2")], SERVICE)
    path = log.store.path
    log.close()
    with sqlite3.connect(path) as connection:  # as a log written before ids were per tenant had it
        connection.execute("CREATE TABLE id_collisions (event_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL) "
                           "WITHOUT ROWID")
        connection.execute("INSERT INTO id_collisions VALUES ('a2', 2)")
    reopened = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    try:
        tables = {row[0] for row in reopened.store._write.execute("SELECT name FROM sqlite_master")}
        assert "id_collisions" not in tables
        assert reopened.store._write.execute("SELECT * FROM event_id_collisions").fetchall() == [("a2", 2)]
        assert reopened.store.event("acme", "a2").sequence == 2
    finally:
        reopened.close()


def test_query_filters(log):
    from google.protobuf import timestamp_pb2
    events = [event("e1", correlation="c1", event_type="tool.invoked"),
              event("e2", correlation="c2", event_type="tool.completed"),
              event("e3", correlation="c1", event_type="tool.completed")]
    for index, item in enumerate(events):
        item.time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_000 + index))
    log.append("acme", events, SERVICE)
    assert [e.event_id for e in log.query("acme", correlation_id="c1")] == ["e1", "e3"]
    assert [e.event_id for e in log.query("acme", event_types=("tool.completed",))] == ["e2", "e3"]
    window = log.query("acme", start_ns=1_001 * 10**9, end_ns=1_002 * 10**9)
    assert [e.event_id for e in window] == ["e2"]
    assert [e.event_id for e in log.query("acme", after_sequence=1, limit=1)] == ["e2"]


def test_reopen_continues_the_chain(tmp_path):
    first = open_log(tmp_path)
    first.append("acme", [event("e1"), event("e2")], SERVICE)
    head, root = first.head, first.frontier.root()
    first.store.close()
    second = open_log(tmp_path)
    assert (second.size, second.head, second.frontier.root()) == (2, head, root)
    second.append("acme", [event("e3")], SERVICE)
    from planes.plugins.evidence.fsck import fsck
    assert fsck(second.store, second.key.public_key).ok


def test_retention_prunes_values_and_records_it(log):
    from google.protobuf import timestamp_pb2
    old = event("old", prompt="stale", event_type="model.called")
    old.time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(log.clock()) - 10_000))
    fresh = event("fresh", prompt="new", event_type="model.called")
    other = event("kept", prompt="other type", event_type="tool.invoked")
    other.time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(log.clock()) - 10_000))
    log.append("acme", [old, fresh, other], SERVICE)
    notices = log.prune({"model.called": 3600})
    assert len(notices) == 1 and notices[0].event_type == "retention.pruned"
    assert {f.name: f.string_value for f in notices[0].fields}["events"] == "1"
    by_id = {e.event_id: e for e in log.query("acme")}
    assert by_id["old"].fields[0].redacted and not by_id["old"].fields[0].string_value
    assert by_id["fresh"].fields[0].string_value == "new"
    assert by_id["kept"].fields[0].string_value == "other type"
    assert log.prune({"model.called": 3600}) == [], "a second prune finds nothing left"
    from planes.plugins.evidence.fsck import fsck
    assert fsck(log.store, log.key.public_key).ok


def test_append_encoded_takes_request_bytes(log):
    from planes.evidence.v1 import evidence_service_pb2 as pb

    data = pb.AppendEventsRequest(events=[event("b1", prompt="hi"), event("b2", output=b"\x01")]).SerializeToString()
    result = log.append_encoded("acme", data, SERVICE)
    assert result.sequences == [1, 2] and result.appended == 2 and result.chain_head == log.head
    events = log.query("acme")
    assert [e.event_id for e in events] == ["b1", "b2"] and events[0].fields[0].string_value == "hi"
    again = log.append_encoded("acme", data, SERVICE)
    assert (again.sequences, again.appended, again.duplicates) == ([1, 2], 0, 2), "a replay is harmless"


def test_malformed_request_bytes_are_refused_and_nothing_is_stored(log):
    log.append("acme", [event("ok-1")], SERVICE)
    with pytest.raises(errors.InvalidArgument, match="not a well-formed protobuf"):
        log.append_encoded("acme", b"\x12\x05abc", SERVICE)
    assert log.size == 1


def test_encodings_the_native_path_leaves_to_protobuf_still_append(log):
    from planes.common.v1 import common_pb2

    raw = event("m1", correlation="c-9").SerializeToString()
    extra = common_pb2.Correlation(actor="merged-actor").SerializeToString()
    raw += b"\x12" + bytes([len(extra)]) + extra  # a second correlation: protobuf merges the two
    data = b"\x12" + bytes([len(raw)]) + raw
    assert log.append_encoded("acme", data, SERVICE).sequences == [1]
    stored = log.query("acme")[0]
    assert (stored.correlation.correlation_id, stored.correlation.actor) == ("c-9", "merged-actor")


def test_proofs_against_one_checkpoint_read_the_leaf_hashes_once(log, monkeypatch):
    log.append("acme", [event(f"p{i}") for i in range(13)], SERVICE)
    checkpoint = log.checkpoint_now()
    size = pb_checkpoint_size(checkpoint)
    reads = []
    original = log.store.leaf_hashes
    monkeypatch.setattr(log.store, "leaf_hashes", lambda n: reads.append(n) or original(n))
    from planes.evidence.v1 import evidence_service_pb2 as pb
    root = pb.Checkpoint.FromString(checkpoint.checkpoint).root_hash
    for index in range(13):
        proof = log.prove_inclusion("acme", f"p{index}", size)
        assert chain.verify_inclusion(proof.leaf_hash, index, size, list(proof.audit_path), root)
        assert list(proof.audit_path) == chain.inclusion_proof(original(size), index, size)
    assert reads == [size], "the tree's leaf hashes are read once, then its subtree roots are reused"


def pb_checkpoint_size(signed) -> int:
    from planes.evidence.v1 import evidence_service_pb2 as pb
    return pb.Checkpoint.FromString(signed.checkpoint).tree_size


# -- replays: an id stored again is acknowledged only with the same content -----------------------------------


def _state(log):
    return log.size, log.head, [(e.event_id, [(f.name, f.string_value, f.bytes_value) for f in e.fields])
                                for e in log.query("acme")]


def _changed(change):
    replay = event("e1", note="hello")
    change(replay)
    return replay


@pytest.mark.parametrize(("change", "what"), [
    (lambda e: setattr(e.fields[0], "string_value", "different"), "field 'note'"),
    (lambda e: setattr(e, "event_type", "tool.failed"), "event_type"),
    (lambda e: setattr(e.correlation, "correlation_id", "corr-2"), "correlation_id"),
    (lambda e: setattr(e.correlation, "request_id", "r-2"), "request_id"),
    (lambda e: setattr(e.correlation, "trace_id", "t-2"), "trace_id"),
    (lambda e: setattr(e.correlation, "actor", "someone-else"), "actor"),
    (lambda e: e.time.FromNanoseconds(5), "time"),
    (lambda e: setattr(e.config, "revision", 9), "config"),
    (lambda e: setattr(e, "corrects_event_id", "e0"), "corrects_event_id"),
    (lambda e: setattr(e.fields[0], "name", "other"), "field names"),
    (lambda e: e.fields.add(name="extra", string_value="x"), "field names"),
    (lambda e: setattr(e.fields[0], "bytes_value", b"hello"), "field 'note'"),
    (lambda e: setattr(e.fields[0], "classification", 1), "field 'note'"),
    (lambda e: setattr(e.fields[0].commitment, "value", bytes(32)), "field 'note'"),
], ids=["value", "type", "correlation", "request", "trace", "actor", "time", "config", "corrects", "name",
        "extra-field", "kind", "classification", "commitment"])
def test_a_replay_with_other_content_is_refused_and_nothing_of_its_batch_is_stored(log, change, what):
    first = log.append("acme", [event("e1", note="hello")], SERVICE)
    before = _state(log)
    with pytest.raises(errors.AlreadyExists) as caught:
        log.append("acme", [event("e2", note="new"), _changed(change)], SERVICE)
    message = caught.value.message
    assert "event 1: event id 'e1' was already appended (sequence 1) with different content" in message
    assert f"({what})" in message and "hello" not in message, "it says which part differs, never a value"
    assert caught.value.metadata == {"event_id": "e1", "sequence": "1"}
    assert _state(log) == before, "nothing of the refused batch was stored"
    assert log.store.event("acme", "e2") is None
    again = log.append("acme", [event("e1", note="hello")], SERVICE)
    assert (again.sequences, again.appended, again.duplicates, again.chain_head) == ([1], 0, 1, first.chain_head)


def test_an_identical_replay_is_acknowledged_with_the_stored_sequence(log):
    stamped = event("e2", note="at five")
    stamped.time.FromNanoseconds(5)
    stamped.correlation.actor = "billing-svc"  # the appender, named: what the log records when none is named
    first = log.append("acme", [event("e1", note="hello", blob=b"\x00\x01"), stamped], SERVICE)
    unstamped = event("e1", note="hello", blob=b"\x00\x01")  # no time, no actor: both are the log's to fill in
    again = log.append("acme", [unstamped, stamped, event("e3")], SERVICE)
    assert (again.sequences, again.appended, again.duplicates) == ([1, 2, 3], 1, 2)
    assert first.sequences == [1, 2] and log.size == 3
    reordered = event("e1", blob=b"\x00\x01", note="hello")  # fields are compared by name
    assert log.append("acme", [reordered], SERVICE).sequences == [1]


def test_one_id_twice_in_a_batch_with_other_content_is_refused(log):
    log.append("acme", [event("e0")], SERVICE)
    before = _state(log)
    with pytest.raises(errors.InvalidArgument,
                       match=r"event 2: event id 'e1' appears earlier in this batch with different content "
                             r"\(field 'note'\)"):
        log.append("acme", [event("e1", note="hello"), event("e5"), event("e1", note="different")], SERVICE)
    assert _state(log) == before
    same = log.append("acme", [event("e1", note="hello"), event("e1", note="hello")], SERVICE)
    assert (same.sequences, same.appended, same.duplicates) == ([2, 2], 1, 1)


def test_a_replay_of_an_event_whose_value_was_redacted_is_confirmed_only_through_its_salt(log):
    """The salt goes with the value, so the commitment cannot be recomputed from the store: a replay is
    acknowledged only when it carries the salt it was first sent with; everything else is still compared."""
    salted = event("e1", note="card 4111", model="m1")
    salted.fields[0].salt = b"s" * 16
    log.append("acme", [salted], SERVICE)
    log.redact("acme", "e1", "note", "PII", Identity("rev", "acme", frozenset({"reviewer"})))
    before = _state(log)
    assert log.append("acme", [salted], SERVICE).sequences == [1], "the sent salt confirms the commitment"
    unsalted = event("e1", note="card 4111", model="m1")
    with pytest.raises(errors.FailedPrecondition,
                       match=r"event id 'e1' was already appended \(sequence 1\) and the raw value of its field "
                             r"'note' is not stored"):
        log.append("acme", [event("e9"), unsalted], SERVICE)
    other = event("e1", note="card 5500", model="m1")
    other.fields[0].salt = b"s" * 16
    with pytest.raises(errors.FailedPrecondition, match="cannot be confirmed"):
        log.append("acme", [other], SERVICE)
    with pytest.raises(errors.AlreadyExists, match=r"\(field 'model'\)"):
        log.append("acme", [event("e1", note="card 4111", model="m2")], SERVICE)
    assert _state(log) == before, "no refused replay stored anything"


def test_a_replay_of_a_pruned_event_is_compared_by_what_the_leaf_still_says(log):
    log.append("acme", [event("e1", event_type="chat.message", note="hello")], SERVICE)
    log.clock = lambda: 4e9  # 2096: long past the event
    assert log.prune({"chat.message": 1.0})
    with pytest.raises(errors.FailedPrecondition, match="'note' is not stored"):
        log.append("acme", [event("e1", event_type="chat.message", note="hello")], SERVICE)
    with pytest.raises(errors.AlreadyExists, match=r"\(event_type\)"):
        log.append("acme", [event("e1", note="hello")], SERVICE)


def test_a_field_withheld_at_the_source_is_compared_by_its_commitment(log):
    withheld = event("e1")
    withheld.fields.add(name="doc", commitment=common_pb2.Digest(value=b"c" * 32))
    log.append("acme", [withheld], SERVICE)
    assert log.append("acme", [withheld], SERVICE).sequences == [1]
    other = event("e1")
    other.fields.add(name="doc", commitment=common_pb2.Digest(value=b"d" * 32))
    with pytest.raises(errors.AlreadyExists, match=r"\(field 'doc'\)"):
        log.append("acme", [other], SERVICE)


class _Reads:
    """Counts the store's segment reads and leaf decodes."""

    def __init__(self, monkeypatch, store):
        from planes.plugins.evidence import leaf

        self.loads = self.decodes = 0
        load_segment, decode = store._load, leaf.decode

        def counted_load(row):
            self.loads += 1
            return load_segment(row)

        def counted_decode(data):
            self.decodes += 1
            return decode(data)

        monkeypatch.setattr(store, "_load", counted_load)
        monkeypatch.setattr(leaf, "decode", counted_decode)


def _aged(log, seconds: float) -> None:
    start = log.clock()
    log.clock = lambda: start + seconds


def test_a_retention_rule_that_matches_nothing_decodes_no_leaf(log, monkeypatch):
    """A rule for a type the log does not hold once decoded every leaf of the log on every tick."""
    for batch in range(30):
        log.append("acme", [event(f"e{batch}-{i}", prompt="p", blob=b"b") for i in range(3)], SERVICE)
    _aged(log, 3600)
    log.store._local.segments.clear()
    reads = _Reads(monkeypatch, log.store)
    calls = 0
    while True:
        calls += 1
        loads = reads.loads
        assert log.prune({"model.called": 1}, max_segments=4) == []
        assert reads.loads - loads <= 4, "a prune reads a bounded number of segments"
        if log._retention_scans["model.called"].cutoff is None:
            break
    assert calls == 8 and reads.decodes == 0
    reads.loads = 0
    _aged(log, 60)
    assert log.prune({"model.called": 1}, max_segments=4) == []
    assert (reads.loads, reads.decodes) == (0, 0), "a finished pass is not read again"


def test_a_bounded_prune_prunes_every_match_over_successive_ticks(log, monkeypatch):
    from google.protobuf import timestamp_pb2

    from planes.evidence.v1 import evidence_service_pb2 as pb
    from planes.plugins.evidence.fsck import fsck

    for batch in range(20):
        log.append("acme", [event(f"m{batch}-{i}", event_type="model.called", prompt=f"secret-{batch}-{i}")
                            for i in range(2)] + [event(f"t{batch}", prompt="kept")], SERVICE)
    fresh = event("late", event_type="model.called", prompt="fresh")
    _aged(log, 3600)
    reads = _Reads(monkeypatch, log.store)
    pruned, calls = [], 0
    while True:
        calls += 1
        notices = log.prune({"model.called": 60}, max_segments=3)
        assert sum(int({f.name: f.string_value for f in n.fields}["events"]) for n in notices) <= 6
        pruned += notices
        if log._retention_scans["model.called"].cutoff is None:
            break
    assert calls == 7
    assert reads.decodes <= 40 + 4 * len(pruned), "only leaves holding the type, and the notices, are decoded"
    matched = [e for e in log.query("acme", event_types=("model.called",))]
    assert len(matched) == 40 and all(f.redacted for e in matched for f in e.fields)
    assert all(not f.redacted for e in log.query("acme", event_types=("tool.invoked",)) for f in e.fields)
    counted = sorted(int({f.name: f.string_value for f in n.fields}["events"]) for n in pruned)
    assert sum(counted) == 40 and all(n.event_type == "retention.pruned" for n in pruned)
    # Appended later with an old time, into a log whose pass is over: still found.
    fresh.time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(log.clock()) - 7200))
    log.append("acme", [fresh], SERVICE)
    assert len(log.prune({"model.called": 60}, max_segments=3)) == 1
    assert log.query("acme", event_types=("model.called",))[-1].fields[0].redacted
    assert log.prune({"model.called": 60}, max_segments=3) == []
    log.checkpoint_now()
    assert fsck(log.store, log.key.public_key).ok
    proof = log.prove_inclusion("acme", "m0-0")
    checkpoint = pb.Checkpoint.FromString(proof.checkpoint.checkpoint)
    assert chain.verify_inclusion(proof.leaf_hash, proof.leaf_index, checkpoint.tree_size, list(proof.audit_path),
                                  checkpoint.root_hash)
