"""The evidence batch encoder: leaves equal to the reference encoder's, twin parity, hostile input.

Every test runs against the compiled module and its twin (fixture ``batch``,
ids ``native``/``python``); the parity tests compare the two byte for byte.
"""

from __future__ import annotations

import importlib
import random

import pytest

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.plugins.evidence import leaf as leaves

from .conftest import KINDS, implementation

LIMITS = dict(max_events=100, max_fields=8, max_value_bytes=256, max_id_chars=32)


@pytest.fixture(params=KINDS)
def batch(request):
    return implementation("eventbatch", request.param)


def counting_salts(size: int) -> bytes:
    """A deterministic salt source, so both implementations draw the same salts."""
    return bytes(i % 251 for i in range(size))


def sample_events() -> list[pb.Event]:
    first = pb.Event(event_id="e-1", event_type="tool.invoked",
                     correlation=common_pb2.Correlation(correlation_id="c-1", request_id="r", trace_id="t" * 32,
                                                        span_id="s" * 16, actor="worker-7"))
    first.time.seconds, first.time.nanos = 1_700_000_000, 123
    first.config.revision, first.config.digest = 42, b"\x09" * 32
    first.fields.add(name="tool", string_value="grep \u00e9t\u00e9", classification=common_pb2.CLASSIFICATION_INTERNAL)
    first.fields.add(name="payload", bytes_value=b"\x00\xff" * 20, salt=b"client-salt")
    first.fields.add(name="secret", commitment=common_pb2.Digest(value=b"\x07" * 32), classification=3)
    second = pb.Event(event_id="\u00e9v\u00e9nement", event_type="correction", corrects_event_id="e-1")
    second.fields.add(name="empty", string_value="")
    return [first, second]


def request_bytes(events: list[pb.Event], tenant: str = "acme") -> bytes:
    return pb.AppendEventsRequest(tenant=tenant, events=events).SerializeToString()


def encode(batch, data, **overrides):
    arguments = dict(LIMITS, salts=counting_salts)
    arguments.update(overrides)
    return batch.encode_events(data, "acme", "svc", 10, 5_000_000_000, **arguments)


def test_leaves_decode_to_the_events_sent_with_checkable_commitments(batch):
    result = encode(batch, request_bytes(sample_events()))
    assert len(result) == 2 and list(result.offsets)[0] == 0 and result.offsets[-1] == len(result.leaves)
    first = leaves.decode(result.leaves[result.offsets[0]:result.offsets[1]])
    second = leaves.decode(result.leaves[result.offsets[1]:result.offsets[2]])
    assert (first.sequence, first.event_id, first.tenant, first.actor) == (10, "e-1", "acme", "worker-7")
    assert (first.trace_id, first.time_ns, first.config_revision) == ("t" * 32, 1_700_000_000_000_000_123, 42)
    assert (second.sequence, second.actor, second.time_ns) == (11, "svc", 5_000_000_000)
    assert second.corrects_event_id == "e-1" and second.event_id == "\u00e9v\u00e9nement"
    assert [f.name for f in first.fields] == ["tool", "payload", "secret"]
    assert first.field("secret").commitment == b"\x07" * 32, "a withheld value keeps the commitment sent"
    values = {(v[0], v[1]): v for v in batch.decode_values(result.values)}
    assert set(values) == {(10, "tool"), (10, "payload"), (11, "empty")}
    assert values[(10, "payload")][2] == b"client-salt", "a salt sent with the field is used as is"
    for (sequence, name), (_, _, salt, value) in values.items():
        decoded = first if sequence == 10 else second
        committed = decoded.field(name)
        assert leaves.commitment(salt, name, committed.kind, value) == committed.commitment
    assert result.first_sequence == 10 and result.correlations == [("c-1", 10, 10, None), ("", 11, 11, None)]
    assert (result.min_time, result.max_time) == (5_000_000_000, 1_700_000_000_000_000_123)
    assert result.id_hashes == b"".join(batch.id_hash(i.encode()).to_bytes(8, "little")
                                        for i in ("e-1", "\u00e9v\u00e9nement"))


def test_leaf_bytes_equal_the_reference_encoder(batch):
    result = encode(batch, request_bytes(sample_events()))
    for index in range(len(result)):
        raw = result.leaves[result.offsets[index]:result.offsets[index + 1]]
        assert leaves.encode(leaves.decode(raw)) == raw


def test_twin_parity_on_random_batches(batch):
    other = implementation("eventbatch", "python" if batch.__name__.endswith("eventbatch") else "native")
    rng = random.Random(4)
    for _ in range(30):
        events = []
        for number in range(rng.randrange(0, 6)):
            event = pb.Event(event_id=f"id-{number}-{rng.random()}", event_type=rng.choice(["a", "tool.invoked"]))
            if rng.random() < 0.5:
                event.correlation.correlation_id = "c" * rng.randrange(0, 20)
            if rng.random() < 0.3:
                event.time.seconds = rng.randrange(-2**33, 2**33)
            for f in range(rng.randrange(0, 5)):
                if rng.random() < 0.5:
                    event.fields.add(name=f"f{f}", bytes_value=rng.randbytes(rng.randrange(0, 200)))
                else:
                    event.fields.add(name=f"f{f}", string_value="x" * rng.randrange(0, 200),
                                     classification=rng.randrange(0, 5))
            events.append(event)
        data = request_bytes(events)
        mine, theirs = encode(batch, data), encode(other, data)
        assert (mine.leaves, list(mine.offsets), mine.values, mine.id_hashes, mine.correlations, mine.min_time,
                mine.max_time) == (theirs.leaves, list(theirs.offsets), theirs.values, theirs.id_hashes,
                                   theirs.correlations, theirs.min_time, theirs.max_time)


@pytest.mark.parametrize("requests", [1, 3, 40, 600])
def test_correlations_of_interleaved_requests_match_the_twin_on_two_threads(requests):
    """Grouping by correlation id is done in C by the compiled encoder; a batch of 700 is split between two
    threads there, so groups and runs cross the split."""
    native, twin = implementation("eventbatch", "native"), implementation("eventbatch", "python")
    rng = random.Random(requests)
    ids = []
    while len(ids) < 700:  # requests taking turns, each for a stretch of 1-5 events
        ids += [f"req-{rng.randrange(requests)}"] * rng.randrange(1, 6)
    events = [pb.Event(event_id=f"e{i}", event_type="tool.invoked",
                       correlation=common_pb2.Correlation(correlation_id=c)) for i, c in enumerate(ids[:700])]
    data = request_bytes(events)
    arguments = dict(LIMITS, max_events=1000)
    compiled = native.encode_events(data, "acme", "svc", 3, 0, threads=2, **arguments).correlations
    assert compiled == twin.encode_events(data, "acme", "svc", 3, 0, **arguments).correlations
    covered = {}
    for correlation, first, last, runs in compiled:  # every event exactly once, under its own id
        sequences = list(range(first, last + 1)) if runs is None else [
            first + int.from_bytes(runs[at:at + 8], "little") + k
            for at in range(0, len(runs), 16) for k in range(int.from_bytes(runs[at + 8:at + 16], "little"))]
        covered.update({sequence: correlation for sequence in sequences})
    assert covered == {3 + i: c for i, c in enumerate(ids[:700])}


@pytest.mark.parametrize(("seconds", "nanos"), [(9223372037, -1_000_000_000), (-9223372037, 1_000_000_000),
                                               (9223372036, 854775807), (9223372036, 854775808),
                                               (-9223372037, 145224192), (-9223372037, 145224191)])
def test_times_at_the_edge_of_int64_nanoseconds_get_one_verdict(batch, seconds, nanos):
    """seconds * 1e9 may overflow while seconds * 1e9 + nanos does not: only the sum counts."""
    event = pb.Event(event_id="t", event_type="tool.invoked")
    event.time.seconds, event.time.nanos = seconds, nanos
    fits = -2**63 <= seconds * 10**9 + nanos < 2**63
    if fits:
        assert encode(batch, request_bytes([event])).min_time == seconds * 10**9 + nanos
    else:
        with pytest.raises(batch.BatchRuleError, match="time"):
            encode(batch, request_bytes([event]))


def test_sequences_never_run_past_what_the_store_holds(batch):
    events = [pb.Event(event_id=f"s{i}", event_type="tool.invoked") for i in range(3)]
    last = batch.encode_events(request_bytes(events), "acme", "svc", 2**63 - 3, 0, **LIMITS)
    assert last.first_sequence == 2**63 - 3 and last.correlations == [("", 2**63 - 3, 2**63 - 1, None)]
    for first in (2**63 - 2, 2**63, 2**64 - 2, 2**70):
        with pytest.raises(ValueError, match="run past"):
            batch.encode_events(request_bytes(events), "acme", "svc", first, 0, **LIMITS)
    assert len(batch.encode_events(b"", "acme", "svc", 2**70, 0, **LIMITS)) == 0


@pytest.mark.parametrize("case", ["now-float", "now-too-big", "now-bool", "threads-huge", "salts-unused",
                                  "bad-data-and-head"])
def test_odd_arguments_get_the_twins_verdict(case):
    """The compiled encoder answers arguments its C types cannot hold exactly as the twin does."""
    native, twin = implementation("eventbatch", "native"), implementation("eventbatch", "python")
    timed = pb.Event(event_id="t", event_type="tool.invoked")
    timed.time.seconds = 5
    salted = pb.Event(event_id="s", event_type="tool.invoked")
    salted.fields.add(name="f", string_value="v", salt=bytes(16))
    untimed = pb.Event(event_id="u", event_type="tool.invoked")
    data, arguments, now = request_bytes([timed, untimed]), dict(LIMITS), 7
    if case == "now-float":
        now = 1.5
    elif case == "now-too-big":
        data, now = request_bytes([timed]), 2**70  # no event takes now: the twin accepts
    elif case == "now-bool":
        now = True
    elif case == "threads-huge":
        arguments["threads"] = 2**40
    elif case == "salts-unused":
        data, arguments["salts"] = request_bytes([salted]), lambda size: b""
    else:
        data, arguments["previous_head"] = 12345, b"short"

    def verdict(module):
        try:
            result = module.encode_events(data, "acme", "svc", 1, now, **arguments)
        except Exception as exc:  # the verdict is the exception's type
            return type(exc).__name__
        return (result.leaves, result.values, result.correlations, result.min_time, result.max_time)

    assert verdict(native) == verdict(twin)


def test_empty_request_is_an_empty_batch(batch):
    result = encode(batch, b"")
    assert (result.leaves, list(result.offsets), result.values, result.id_hashes, result.correlations) == \
           (b"", [0], b"", b"", [])


def test_salts_are_random_by_default(batch):
    data = request_bytes(sample_events())
    one = batch.encode_events(data, "acme", "svc", 1, 0, **LIMITS)
    two = batch.encode_events(data, "acme", "svc", 1, 0, **LIMITS)
    first, second = batch.decode_values(one.values)[0], batch.decode_values(two.values)[0]
    assert first[2] != second[2] and len(first[2]) == 16
    assert one.leaves != two.leaves, "fresh salts give fresh commitments"


# -- hostile input -------------------------------------------------------------


def test_every_truncation_is_a_format_error_or_a_shorter_batch(batch):
    data = request_bytes(sample_events())
    for cut in range(1, len(data)):
        try:
            encode(batch, data[:cut])
        except batch.BatchFormatError as exc:
            assert 0 <= exc.offset <= cut
        except (batch.BatchRuleError, batch.NotCanonical):
            pass  # a cut that still parses can leave an event without its id, or a field without a value


@pytest.mark.parametrize(("data", "offset"), [
    (b"\x12\x05abc", 0),                          # length past the end
    (b"\x12", 1),                                 # truncated length
    (b"\x12\x02\x0a", 0),                         # the event runs past the end
    (b"\x12\x04\x0a\x02\xff\xfe", 4),             # event_id is not UTF-8
    (b"\x00\x00", 0),                             # field number 0
    (b"\x12\x01\x80", 2),                         # truncated varint inside an event
    (b"\x12\x0b\x18" + b"\xff" * 10, 3),          # varint longer than 64 bits
    (b"\x16", 0),                                 # wire type 6 does not exist
], ids=["past-end", "no-length", "event-past-end", "not-utf8", "field-zero", "inner-varint", "long-varint",
        "wire-type-6"])
def test_malformed_bytes_are_format_errors_that_name_the_offset(batch, data, offset):
    with pytest.raises(batch.BatchFormatError) as caught:
        encode(batch, data)
    assert caught.value.offset == offset and "malformed evidence batch" in str(caught.value)


@pytest.mark.parametrize("tail", [b"\xff", b"\xc3\xa9", b"\xc3", b"\xe2\x82\xac", b"\xed\xa0\x80", b"\xe0\x80\xaf",
                                  b"\xf0\x9f\x98\x80", b"\xf4\x90\x80\x80", b"\x80"],
                         ids=["ff", "e-acute", "cut-2-byte", "euro", "surrogate", "overlong", "emoji", "past-10ffff",
                              "lone-continuation"])
def test_utf8_is_checked_as_python_decodes_it_after_any_run_of_ascii(batch, tail):
    """The validator skips ASCII eight bytes at a time: a sequence at every offset after a run is still seen."""
    for run in range(0, 20):
        for after in (b"", b"abc"):
            raw_id = b"a" * run + tail + after
            placeholder = "x" * len(raw_id)
            event = pb.Event(event_id=placeholder, event_type="tool.invoked").SerializeToString()
            event = event.replace(placeholder.encode(), raw_id)
            data = b"\x12" + bytes([len(event)]) + event
            try:
                raw_id.decode("utf-8")
            except UnicodeDecodeError:
                with pytest.raises(batch.BatchFormatError, match="UTF-8"):
                    encode(batch, data)
            else:
                assert len(encode(batch, data)) == 1


def test_random_garbage_never_crashes(batch):
    rng = random.Random(9)
    base = request_bytes(sample_events())
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            encode(batch, bytes(data))
        except (batch.BatchFormatError, batch.BatchLimitError, batch.BatchRuleError, batch.NotCanonical):
            pass


def test_too_many_events_is_counted_before_any_work(batch):
    data = request_bytes([pb.Event(event_id=f"e{i}", event_type="a") for i in range(5)])
    with pytest.raises(batch.BatchLimitError) as caught:
        encode(batch, data, max_events=4)
    assert (caught.value.limit_name, caught.value.limit, caught.value.actual) == ("events_per_batch", 4, 5)
    assert len(encode(batch, data, max_events=5)) == 5, "at the limit passes"


def test_too_many_fields_and_too_large_values_carry_the_numbers(batch):
    event = pb.Event(event_id="e", event_type="a")
    for number in range(9):
        event.fields.add(name=f"f{number}", string_value="v")
    with pytest.raises(batch.BatchLimitError) as caught:
        encode(batch, request_bytes([event]))
    assert (caught.value.limit_name, caught.value.limit, caught.value.actual) == ("fields_per_event", 8, 9)
    del event.fields[8]
    assert len(encode(batch, request_bytes([event]))) == 1
    big = pb.Event(event_id="e", event_type="a")
    big.fields.add(name="blob", bytes_value=b"x" * 257)
    with pytest.raises(batch.BatchLimitError) as caught:
        encode(batch, request_bytes([big]))
    assert (caught.value.limit_name, caught.value.limit, caught.value.actual) == ("field_value_bytes", 256, 257)
    assert "x" * 10 not in str(caught.value), "errors never carry values"
    big.fields[0].bytes_value = b"x" * 256
    assert len(encode(batch, request_bytes([big]))) == 1


@pytest.mark.parametrize(("change", "message", "denied"), [
    (lambda e: setattr(e, "event_id", ""), "event_id is required", False),
    (lambda e: setattr(e, "event_id", "x" * 33), "longer than 32 characters", False),
    (lambda e: setattr(e, "event_type", "Tool.Invoked"), "dotted lower-case", False),
    (lambda e: setattr(e, "event_type", "tool..x"), "dotted lower-case", False),
    (lambda e: setattr(e, "event_type", "tool."), "dotted lower-case", False),
    (lambda e: setattr(e, "sequence", 3), "assigned by the log", False),
    (lambda e: e.correlation.__setattr__("tenant", "globex"), "not the request's tenant", True),
    (lambda e: e.time.__setattr__("seconds", 2**62), "time is out of range", False),
    (lambda e: e.fields.add(name="tool", string_value="again"), "appears twice", False),
    (lambda e: e.fields.add(name="", string_value="v"), "field names must be", False),
    (lambda e: e.fields.add(name="w"), "neither a value nor", False),
    (lambda e: e.fields.add(name="c", string_value="v", classification=300), "classification 300", False),
    (lambda e: e.fields.add(name="c", string_value="v", commitment=common_pb2.Digest(value=b"\x00" * 32)),
     "does not match its value", False),
], ids=["no-id", "long-id", "upper-type", "double-dot", "trailing-dot", "sequence", "tenant", "time", "dup-field",
        "empty-name", "withheld-no-commitment", "classification", "wrong-commitment"])
def test_rule_breaking_events_are_refused_with_their_index(batch, change, message, denied):
    good = pb.Event(event_id="ok", event_type="tool.invoked")
    bad = pb.Event(event_id="bad", event_type="tool.invoked")
    bad.fields.add(name="tool", string_value="grep")
    change(bad)
    with pytest.raises(batch.BatchRuleError, match=message) as caught:
        encode(batch, request_bytes([good, bad]))
    assert caught.value.index == 1 and caught.value.denied == denied
    assert "grep" not in str(caught.value)


def test_merged_message_fields_are_left_to_protobuf(batch):
    event = pb.Event(event_id="e", event_type="a", correlation=common_pb2.Correlation(correlation_id="c"))
    extra = common_pb2.Correlation(actor="x").SerializeToString()
    raw = event.SerializeToString() + b"\x12" + bytes([len(extra)]) + extra
    data = b"\x12" + bytes([len(raw)]) + raw
    assert pb.AppendEventsRequest.FromString(data).events[0].correlation.actor == "x", "protobuf merges them"
    with pytest.raises(batch.NotCanonical):
        encode(batch, data)


def test_arguments_are_checked(batch):
    with pytest.raises(TypeError, match="bytes-like"):
        batch.encode_events("text", "acme", "svc", 1, 0, **LIMITS)
    with pytest.raises(ValueError, match="first_sequence"):
        batch.encode_events(b"\x0a\x00", "acme", "svc", 0, 0, **LIMITS)
    with pytest.raises(ValueError, match="max_fields must not be negative"):
        batch.encode_events(b"\x0a\x00", "acme", "svc", 1, 0, **dict(LIMITS, max_fields=-1))


def test_runs_follow_consecutive_correlation_ids(batch):
    events = [pb.Event(event_id=f"e{i}", event_type="a", correlation=common_pb2.Correlation(correlation_id=c))
              for i, c in enumerate(["x", "x", "y", "x", "x", "x"])]
    pairs = (0).to_bytes(8, "little") + (2).to_bytes(8, "little") + (3).to_bytes(8, "little") \
        + (3).to_bytes(8, "little")  # x: 10-11 and 13-15, as (offset from 10, length)
    assert encode(batch, request_bytes(events)).correlations == [("x", 10, 15, pairs), ("y", 12, 12, None)]


def test_values_blob_round_trips_and_refuses_damage(batch):
    records = [(1, "name", b"s" * 16, b"value"), (2, "\u00e9", b"", b"")]
    blob = batch.pack_values(records)
    assert batch.decode_values(blob) == records
    for cut in range(1, len(blob)):
        if cut == len(batch.pack_values(records[:1])):
            continue
        with pytest.raises(batch.ValuesFormatError):
            batch.decode_values(blob[:cut])


def test_id_index_finds_first_sequences_and_refuses_repeats(batch):
    index = batch.IdIndex()
    keys = [batch.id_hash(f"id-{n}".encode()) for n in range(5000)]
    blob = b"".join(key.to_bytes(8, "little") for key in keys)
    assert index.unknown(blob) and len(index) == 0
    index.add(blob, 1)
    assert len(index) == 5000
    assert [index.get(key) for key in keys[:3]] == [1, 2, 3] and index.get(keys[-1]) == 5000
    assert index.get(batch.id_hash(b"absent")) is None
    assert not index.unknown(blob[8:16]), "a stored hash is known"
    fresh = [batch.id_hash(f"new-{n}".encode()).to_bytes(8, "little") for n in range(3)]
    assert index.unknown(b"".join(fresh))
    assert not index.unknown(fresh[0] + fresh[1] + fresh[0]), "a hash repeated within the batch"
    index.add(blob[:8] + fresh[0], 9000)
    assert index.get(keys[0]) == 1, "a present hash keeps its first sequence"
    assert index.get(int.from_bytes(fresh[0], "little")) == 9001
    assert index.unknown(b"")
    with pytest.raises(ValueError, match="multiple of 8"):
        index.add(b"123", 1)
    with pytest.raises(ValueError, match="first_sequence"):
        index.add(blob[:8], 0)


def test_id_index_keys_of_one_scope_never_meet_another_scopes(batch):
    """The store scopes each tenant's ids with a 64-bit value XORed into every key: ids are per tenant."""
    index = batch.IdIndex()
    acme, globex = batch.id_hash(b"tenant\x00acme"), batch.id_hash(b"tenant\x00globex")
    key = batch.id_hash(b"order-42")
    blob = key.to_bytes(8, "little")
    index.add(blob, 5, acme)
    assert not index.unknown(blob, acme) and index.unknown(blob, globex) and index.unknown(blob)
    assert index.get(key ^ acme) == 5 and index.get(key ^ globex) is None
    index.add(blob, 9, globex)
    assert (index.get(key ^ acme), index.get(key ^ globex), len(index)) == (5, 9, 2)


def test_two_threads_encode_what_one_thread_does(batch):
    """A large batch is split between two threads; with every salt sent, the output is deterministic."""
    events = []
    for number in range(1000):
        event = pb.Event(event_id=f"id-{number}", event_type="tool.invoked",
                         correlation=common_pb2.Correlation(correlation_id=f"c-{number // 7}"))
        event.time.seconds = 1_000_000 + (number * 7919) % 1000
        event.fields.add(name="tool", string_value="x" * (number % 50), salt=number.to_bytes(16, "big"))
        events.append(event)
    data = request_bytes(events)
    arguments = dict(LIMITS, max_events=1000)
    one = batch.encode_events(data, "acme", "svc", 5, 0, threads=1, **arguments)
    two = batch.encode_events(data, "acme", "svc", 5, 0, threads=2, **arguments)
    assert (one.leaves, list(one.offsets), one.values, one.id_hashes, one.correlations, one.min_time, one.max_time,
            one.leaf_hashes) == (two.leaves, list(two.offsets), two.values, two.id_hashes, two.correlations, two.min_time,
                                 two.max_time, two.leaf_hashes)
    assert one.correlations[71] == ("c-71", 5 + 497, 5 + 503, None), "a run across the halves is one run"
    chain = importlib.import_module("planes.native.chain_py")
    assert two.leaf_hashes == chain.leaf_hashes(two.leaves, two.offsets)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        batch.encode_events(data, "acme", "svc", 5, 0, threads=0, **arguments)


def test_random_damage_to_a_large_batch_never_crashes_either_thread(batch):
    events = [pb.Event(event_id=f"e{n}", event_type="tool.invoked",
                       correlation=common_pb2.Correlation(correlation_id=f"c{n // 3}")) for n in range(300)]
    for event in events:
        event.fields.add(name="tool", string_value="grep")
    base = request_bytes(events)
    rng = random.Random(12)
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            encode(batch, bytes(data), max_events=300, salts=None, threads=2)
        except (batch.BatchFormatError, batch.BatchLimitError, batch.BatchRuleError, batch.NotCanonical):
            pass


def many_field_events(count: int) -> list[pb.Event]:
    """Events of 0 to 40 fields with values around SHA-256 block boundaries, some with the client's salt
    and a correct commitment: commitments and leaves are hashed in chunks, many messages side by side."""
    events = []
    for number in range(count):
        event = pb.Event(event_id=f"id-{number}", event_type="tool.invoked")
        for f in range((number * 7) % 41):
            value = bytes([number % 256]) * ((number * 13 + f * 29) % 300)
            field = event.fields.add(name=f"field-{f}" * (1 + f % 3), bytes_value=value)
            if (number + f) % 5 == 0:
                field.salt = f"salt-{number}-{f}".encode()
                field.commitment.value = leaves.commitment(field.salt, field.name, leaves.KIND_BYTES, value)
        events.append(event)
    return events


def test_chunks_of_many_commitments_match_the_twin(batch):
    other = implementation("eventbatch", "python" if batch.__name__.endswith("eventbatch") else "native")
    events = many_field_events(200)
    data = request_bytes(events)
    limits = dict(max_events=200, max_fields=64, max_value_bytes=300, max_id_chars=32)
    mine = batch.encode_events(data, "acme", "svc", 1, 0, salts=counting_salts, **limits)
    theirs = other.encode_events(data, "acme", "svc", 1, 0, salts=counting_salts, **limits)
    assert (mine.leaves, list(mine.offsets), mine.values, mine.leaf_hashes) == \
           (theirs.leaves, list(theirs.offsets), theirs.values, theirs.leaf_hashes)
    random_salts = batch.encode_events(data, "acme", "svc", 1, 0, threads=2, **limits)
    chain = importlib.import_module("planes.native.chain_py")
    assert random_salts.leaf_hashes == chain.leaf_hashes(random_salts.leaves, random_salts.offsets)
    stored = {(sequence, name): (salt, value) for sequence, name, salt, value in
              batch.decode_values(random_salts.values)}
    assert len(stored) == sum(len(event.fields) for event in events)
    for index in range(len(random_salts)):
        leaf = leaves.decode(random_salts.leaves[random_salts.offsets[index]:random_salts.offsets[index + 1]])
        for field in leaf.fields:
            salt, value = stored[(index + 1, field.name)]
            assert leaves.commitment(salt, field.name, field.kind, value) == field.commitment

    events[150].fields[20].commitment.value = bytes(32)
    with pytest.raises(batch.BatchRuleError, match="does not match its value") as caught:
        batch.encode_events(request_bytes(events), "acme", "svc", 1, 0, threads=2, **limits)
    assert caught.value.index == 150


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("count", [0, 1, 255, 256, 1000])
def test_chain_heads_come_back_when_the_previous_head_is_given(batch, threads, count):
    """With two threads the chain follows the helper thread's progress; the heads are the chain's either way."""
    events = many_field_events(count)
    data = request_bytes(events)
    limits = dict(max_events=1000, max_fields=64, max_value_bytes=300, max_id_chars=32)
    previous = bytes(range(32))
    result = batch.encode_events(data, "acme", "svc", 1, 0, threads=threads, previous_head=previous, **limits)
    chain = importlib.import_module("planes.native.chain_py")
    assert result.heads == chain.chain(previous, result.leaf_hashes)
    assert result.leaf_hashes == chain.leaf_hashes(result.leaves, result.offsets)
    assert batch.encode_events(data, "acme", "svc", 1, 0, threads=threads, **limits).heads is None


def test_a_refused_batch_with_a_previous_head_still_names_the_event(batch):
    events = many_field_events(600)
    events[450].fields[0].commitment.value = bytes(32)
    limits = dict(max_events=1000, max_fields=64, max_value_bytes=300, max_id_chars=32)
    with pytest.raises(batch.BatchRuleError, match="does not match its value") as caught:
        batch.encode_events(request_bytes(events), "acme", "svc", 1, 0, threads=2, previous_head=bytes(32), **limits)
    assert caught.value.index == 450
    with pytest.raises(ValueError, match="previous_head must be a 32-byte SHA-256 hash, got 31 bytes"):
        batch.encode_events(request_bytes(events[:1]), "acme", "svc", 1, 0, previous_head=bytes(31), **limits)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_smallest_events_and_fields_grow_the_most_and_still_fit(batch, threads):
    """Leaves and values are written into outputs sized from the request: the tightest case is many
    one-letter fields with empty values (each becomes a 32-byte commitment and a salted record)."""
    other = implementation("eventbatch", "python" if batch.__name__.endswith("eventbatch") else "native")
    events = []
    for number in range(600):
        event = pb.Event(event_id=chr(97 + number % 26), event_type="a")
        for f in range(number % 65):
            event.fields.add(name=chr(65 + f % 26) + chr(65 + f // 26) if f >= 26 else chr(65 + f), string_value="")
        events.append(event)
    data = request_bytes(events)
    limits = dict(max_events=600, max_fields=64, max_value_bytes=300, max_id_chars=32)
    tenant, actor = "t" * 100, "a" * 100
    mine = batch.encode_events(data, tenant, actor, 1, 0, threads=threads, **limits)
    theirs = other.encode_events(data, tenant, actor, 1, 0, **limits)
    assert (len(mine.leaves), list(mine.offsets), len(mine.values)) == \
           (len(theirs.leaves), list(theirs.offsets), len(theirs.values))
    assert mine.leaf_hashes == importlib.import_module("planes.native.chain_py").leaf_hashes(mine.leaves, mine.offsets)
