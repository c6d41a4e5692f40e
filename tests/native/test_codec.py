"""The data chunk codec (planes.native.codec and its twin).

Each test runs on both implementations (the ``codec`` fixture, ids ``native``
and ``python``). The foreign side is the generated protobuf classes: what we
encode parses with them, and what they serialize decodes with us.
"""

from __future__ import annotations

import os
from hashlib import sha256

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from planes.data.v1 import data_service_pb2 as pb

from .conftest import KINDS, OTHER, implementation

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MiB = 1 << 20


@pytest.fixture(params=KINDS)
def codec(request):
    """planes.native.codec (id ``native``) or planes.native.codec_py (id ``python``)."""
    return implementation("codec", request.param)


@pytest.fixture
def twin(request, codec):
    """The other implementation than ``codec``, for parity checks."""
    return implementation("codec", OTHER[request.node.callspec.params["codec"]])


def outcome(call):
    """The result of ``call``, or the error's type, attributes and message, for parity checks."""
    try:
        offset, data, digest = call()
    except ValueError as error:
        return (type(error).__name__, str(error), getattr(error, "limit", None), getattr(error, "actual", None))
    return (offset, data.to_pybytes(), digest)


def key(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wrap(inner: bytes, field: int = 2) -> bytes:
    return key(field, 2) + varint(len(inner)) + inner


# -- encoding, against the generated classes ----------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 200_000])
@pytest.mark.parametrize("offset", [0, 1, 300, 2**35, 2**64 - 1])
@pytest.mark.parametrize("digest", [True, False], ids=["digest", "no-digest"])
def test_encode_matches_the_generated_classes_byte_for_byte(codec, size, offset, digest):
    data = os.urandom(size)
    chunk = pb.DataChunk(offset=offset, data=data, digest=sha256(data).digest() if digest else b"")
    expected = pb.PutPayloadRequest(chunk=chunk).SerializeToString()
    encoded = codec.encode_chunk(data, offset, digest=digest)
    assert type(encoded) is bytes
    assert encoded == expected
    parsed = pb.PutPayloadRequest.FromString(encoded)
    assert parsed.WhichOneof("part") == "chunk"
    assert (parsed.chunk.offset, parsed.chunk.data, parsed.chunk.digest) == (offset, data, chunk.digest)


def test_encode_for_get_responses(codec):
    data = os.urandom(5000)
    encoded, digest = codec.encode_chunk_with_digest(data, 7)
    assert digest == sha256(data).digest()
    parsed = pb.GetPayloadResponse.FromString(encoded)
    assert (parsed.chunk.offset, parsed.chunk.data, parsed.chunk.digest) == (7, data, digest)


@pytest.mark.parametrize("field", [1, 15, 16, 2**29 - 1])
def test_encode_in_another_field(codec, field):
    encoded = codec.encode_chunk(b"abc", 5, field=field)
    offset, data, digest = codec.decode_chunk(encoded, max_chunk_bytes=3, field=field)
    assert (offset, data.to_pybytes(), digest) == (5, b"abc", sha256(b"abc").digest())


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview, pa.py_buffer, lambda b: np.frombuffer(b, np.uint8),
                                  lambda b: np.frombuffer(b, np.float32)],
                         ids=["bytes", "bytearray", "memoryview", "arrow", "numpy-u8", "numpy-f32"])
def test_encode_takes_any_buffer(codec, make):
    data = os.urandom(4096)
    assert codec.encode_chunk(make(data), 9) == codec.encode_chunk(data, 9)


def test_encode_rejects_bad_arguments(codec):
    with pytest.raises(ValueError, match="offset"):
        codec.encode_chunk(b"x", -1)
    with pytest.raises(ValueError, match="offset"):
        codec.encode_chunk(b"x", 2**64)
    with pytest.raises(ValueError, match="field"):
        codec.encode_chunk(b"x", 0, field=0)
    with pytest.raises(TypeError, match="bytes-like"):
        codec.encode_chunk("text", 0)
    with pytest.raises(ValueError, match="contiguous"):
        codec.encode_chunk(np.arange(10, dtype=np.uint8)[::2], 0)


# -- decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 300, 70_000])
def test_decode_what_the_generated_classes_serialize(codec, size):
    data = os.urandom(size)
    digest = sha256(data).digest()
    for message in (pb.PutPayloadRequest(chunk=pb.DataChunk(offset=42, data=data, digest=digest)),
                    pb.GetPayloadResponse(chunk=pb.DataChunk(offset=42, data=data, digest=digest))):
        offset, buffer, sent = codec.decode_chunk(message.SerializeToString(), max_chunk_bytes=size, verify=True)
        assert (offset, buffer.to_pybytes(), sent) == (42, data, digest)
        assert isinstance(buffer, pa.Buffer)


def test_decode_an_empty_chunk(codec):
    message = pb.PutPayloadRequest(chunk=pb.DataChunk()).SerializeToString()
    assert message == b"\x12\x00"
    offset, buffer, digest = codec.decode_chunk(message, max_chunk_bytes=0)
    assert (offset, buffer.size, digest) == (0, 0, b"")


@pytest.mark.parametrize("make", [bytes, pa.py_buffer, lambda b: np.frombuffer(b, np.uint8)],
                         ids=["bytes", "arrow", "numpy"])
def test_decode_is_zero_copy(codec, make):
    message = make(codec.encode_chunk(os.urandom(MiB), 3))
    whole = message if isinstance(message, pa.Buffer) else pa.py_buffer(message)
    _, data, _ = codec.decode_chunk(message, max_chunk_bytes=MiB)
    assert data.size == MiB
    assert whole.address <= data.address and data.address + data.size <= whole.address + whole.size
    assert data.to_pybytes() == bytes(memoryview(whole)[data.address - whole.address:][:MiB])


def test_decode_skips_unknown_fields_inside_the_chunk(codec):
    inner = (key(1, 0) + varint(77) + key(9, 0) + varint(2**63) + key(10, 1) + bytes(8) + key(11, 5) + bytes(4)
             + key(2, 2) + varint(3) + b"abc" + key(12, 2) + varint(4) + b"xxxx")
    offset, data, digest = codec.decode_chunk(wrap(inner), max_chunk_bytes=3)
    assert (offset, data.to_pybytes(), digest) == (77, b"abc", b"")
    generated = pb.PutPayloadRequest.FromString(wrap(inner))
    assert (generated.chunk.offset, generated.chunk.data) == (77, b"abc")


def test_decode_verifies_the_digest_on_request(codec):
    message = pb.PutPayloadRequest(chunk=pb.DataChunk(data=b"abc", digest=bytes(32))).SerializeToString()
    assert codec.decode_chunk(message, max_chunk_bytes=3)[2] == bytes(32)
    with pytest.raises(codec.ChunkFormatError, match="digest does not match"):
        codec.decode_chunk(message, max_chunk_bytes=3, verify=True)


MALFORMED = {
    "empty": (b"", "no chunk field 2"),
    "header": (pb.PutPayloadRequest(header=pb.PayloadHeader(tenant="t")).SerializeToString(), "unexpected field 1"),
    "chunk-then-header": (wrap(b"") + key(1, 2) + b"\x00", "unexpected field 1"),
    "unknown-outer": (wrap(b"") + key(7, 0) + b"\x01", "unexpected field 7"),
    "chunk-twice": (wrap(b"") + wrap(b""), "field 2 at byte 2 appears more than once"),
    "chunk-wire-type": (key(2, 0) + b"\x01", "wire type 0, expected 2"),
    "field-zero": (b"\x02\x00", "field number 0"),
    "field-past-2^29-inner": (wrap(key(1 << 29, 0) + b"\x00" + key(2, 2) + b"\x03abc"),
                              r"field number 536870912 at byte 2 is invalid \(field numbers run from 1 to 536870911\)"),
    "field-past-2^29-outer": (wrap(b"") + key(1 << 29, 0) + b"\x00", "field number 536870912 at byte 2 is invalid"),
    "truncated-key": (b"\x92", "truncated varint at byte 0"),
    "truncated-length": (b"\x12\x80", "truncated varint at byte 1"),
    "length-beyond-end": (b"\x12\x05\x08\x01", "claims 5 bytes but only 2 remain"),
    "varint-overflow": (b"\x12\x0b\x08" + b"\xff" * 9 + b"\x02", "longer than 64 bits"),
    "varint-11-bytes": (b"\x12\x0c\x08" + b"\xff" * 10 + b"\x01", "longer than 64 bits"),
    "offset-wire-type": (wrap(key(1, 2) + b"\x00"), "field 1 at byte 2 has wire type 2, expected 0"),
    "data-wire-type": (wrap(key(2, 0) + b"\x00"), "field 2 at byte 2 has wire type 0, expected 2"),
    "duplicate-offset": (wrap(b"\x08\x01\x08\x02"), "field 1 at byte 4 appears more than once"),
    "duplicate-data": (wrap(b"\x12\x01a\x12\x01b"), "field 2 at byte 5 appears more than once"),
    "duplicate-digest": (wrap(b"\x1a\x00\x1a\x00"), "field 3 at byte 4 appears more than once"),
    "data-beyond-chunk": (wrap(b"\x12\x03ab") + b"c", "claims 3 bytes but only 2 remain"),
    "group": (wrap(key(5, 3) + key(5, 4)), "unsupported wire type 3"),
    "wire-type-7": (wrap(key(5, 7)), "unsupported wire type 7"),
    "fixed64-truncated": (wrap(key(5, 1) + bytes(7)), "needs 8 bytes but only 7 remain"),
    "fixed32-truncated": (wrap(key(5, 5) + bytes(3)), "needs 4 bytes but only 3 remain"),
    "unknown-length-beyond": (wrap(key(5, 2) + b"\x09abc"), "claims 9 bytes but only 3 remain"),
    "truncated-offset": (wrap(b"\x08\xff"), "truncated varint at byte 3"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_clean_errors(codec, twin, name):
    message, expected = MALFORMED[name]
    with pytest.raises(codec.ChunkFormatError, match=expected):
        codec.decode_chunk(message, max_chunk_bytes=100)
    assert outcome(lambda: codec.decode_chunk(message, max_chunk_bytes=100)) == \
        outcome(lambda: twin.decode_chunk(message, max_chunk_bytes=100))


@pytest.mark.parametrize("number, accepted", [((1 << 29) - 1, True), (1 << 29, False), ((1 << 32) - 1, False)],
                         ids=["2^29-1", "2^29", "2^32-1"])
def test_field_numbers_are_accepted_exactly_where_protobuf_accepts_them(codec, number, accepted):
    message = wrap(key(number, 0) + b"\x00" + key(2, 2) + b"\x03abc")
    try:
        pb.PutPayloadRequest.FromString(message)
        protobuf_accepts = True
    except DecodeError:
        protobuf_accepts = False
    assert protobuf_accepts is accepted
    if accepted:  # an unknown field, skipped
        offset, data, _ = codec.decode_chunk(message, max_chunk_bytes=10)
        assert (offset, data.to_pybytes()) == (0, b"abc")
    else:
        with pytest.raises(codec.ChunkFormatError, match=f"field number {number} at byte 2 is invalid"):
            codec.decode_chunk(message, max_chunk_bytes=10)


@pytest.mark.parametrize("claimed", [2**31, 2**60, 2**64 - 1])
def test_a_lying_length_prefix_is_a_limit_error_before_any_allocation(codec, claimed):
    message = wrap(key(2, 2) + varint(claimed) + b"abc")
    with pytest.raises(codec.ChunkLimitError) as caught:
        codec.decode_chunk(message, max_chunk_bytes=16 * MiB)
    assert (caught.value.name, caught.value.limit, caught.value.actual) == ("chunk size", 16 * MiB, claimed)
    # Under a limit it does not trip, the same claim is a truncation, never a read past the end.
    with pytest.raises(codec.ChunkFormatError, match=f"claims {claimed} bytes but only 3 remain"):
        codec.decode_chunk(message, max_chunk_bytes=2**64)


@pytest.mark.parametrize("limit", [0, 1, 1000])
def test_chunk_size_limit_at_the_edges(codec, limit):
    for size in (limit - 1, limit):
        if size >= 0:
            data = os.urandom(size)
            _, buffer, _ = codec.decode_chunk(codec.encode_chunk(data, 0), max_chunk_bytes=limit)
            assert buffer.to_pybytes() == data
    with pytest.raises(codec.ChunkLimitError) as caught:
        codec.decode_chunk(codec.encode_chunk(os.urandom(limit + 1), 0), max_chunk_bytes=limit)
    assert (caught.value.limit, caught.value.actual, caught.value.name) == (limit, limit + 1, "chunk size")
    assert isinstance(caught.value, ValueError)


def test_digest_size_limit_at_the_edges(codec):
    limit = codec.MAX_DIGEST_BYTES
    for size in (limit - 1, limit):
        message = wrap(key(3, 2) + varint(size) + bytes(size))
        assert codec.decode_chunk(message, max_chunk_bytes=0)[2] == bytes(size)
    with pytest.raises(codec.ChunkLimitError) as caught:
        codec.decode_chunk(wrap(key(3, 2) + varint(limit + 1) + bytes(limit + 1)), max_chunk_bytes=0)
    assert (caught.value.name, caught.value.limit, caught.value.actual) == ("digest size", limit, limit + 1)


# -- property-based --------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=3000), offset=st.integers(0, 2**64 - 1), digest=st.booleans(),
       field=st.sampled_from([1, 2, 3, 16, 2**29 - 1]))
def test_round_trip(codec, twin, data, offset, digest, field):
    encoded = codec.encode_chunk(data, offset, field=field, digest=digest)
    assert encoded == twin.encode_chunk(data, offset, field=field, digest=digest)
    got_offset, buffer, sent = codec.decode_chunk(encoded, max_chunk_bytes=len(data), field=field, verify=True)
    assert (got_offset, buffer.to_pybytes(), sent) == (offset, data, sha256(data).digest() if digest else b"")


@FUZZ
@given(message=st.binary(max_size=200), limit=st.integers(0, 300))
def test_random_bytes_never_crash_and_agree(codec, twin, message, limit):
    result = outcome(lambda: codec.decode_chunk(message, max_chunk_bytes=limit))
    assert result == outcome(lambda: twin.decode_chunk(message, max_chunk_bytes=limit))
    if not isinstance(result[0], str):
        assert len(result[1]) <= min(limit, len(message))


@FUZZ
@given(data=st.binary(max_size=500), offset=st.integers(0, 2**64 - 1),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "cut", "put"])),
                      min_size=1, max_size=4))
def test_mutated_messages_never_crash_and_agree(codec, twin, data, offset, edits):
    message = bytearray(codec.encode_chunk(data, offset))
    for position, value, how in edits:
        position %= len(message) + 1
        if how == "set" and position < len(message):
            message[position] = value
        elif how == "cut":
            del message[position:]
        else:
            message[position:position] = bytes([value])
    message = bytes(message)
    result = outcome(lambda: codec.decode_chunk(message, max_chunk_bytes=600))
    assert result == outcome(lambda: twin.decode_chunk(message, max_chunk_bytes=600))


# -- reassembly ------------------------------------------------------------------------------

def assembler(codec, size, *, total=None, chunks=100, chunk_bytes=MiB):
    return codec.PayloadAssembler(size, max_total_bytes=size if total is None else total, max_chunks=chunks,
                                  max_chunk_bytes=chunk_bytes)


def split(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(start, data[start:start + size]) for start in range(0, len(data), size)]


@pytest.mark.parametrize("chunk", [1, 1000, 65536, 100_000, 300_000])
@pytest.mark.parametrize("digests", [True, False], ids=["digests", "no-digests"])
def test_reassembly_through_the_wire(codec, chunk, digests):
    payload = os.urandom(300_000)
    target = assembler(codec, len(payload), chunks=len(payload))
    for offset, part in split(payload, chunk):
        message = pb.PutPayloadRequest(chunk=pb.DataChunk(offset=offset, data=part,
                                                          digest=sha256(part).digest() if digests else b""))
        target.add(*codec.decode_chunk(message.SerializeToString(), max_chunk_bytes=chunk))
    buffer, digest = target.finish()
    assert buffer.to_pybytes() == payload
    assert digest == sha256(payload).digest()
    assert target.finish() == (buffer, digest)
    assert (target.offset, target.chunks) == (len(payload), -(-len(payload) // chunk))


@pytest.mark.parametrize("chunk", [1000, 300_000])
def test_reassembly_without_content_digest_still_checks_chunk_digests(codec, chunk):
    payload = os.urandom(300_000)
    target = codec.PayloadAssembler(len(payload), max_total_bytes=len(payload), max_chunks=len(payload),
                                    max_chunk_bytes=chunk, content_digest=False)
    for offset, part in split(payload, chunk):
        target.add(offset, part, sha256(part).digest())
    assert target.finish()[0].to_pybytes() == payload and target.finish()[1] == b""
    lying = codec.PayloadAssembler(10, max_total_bytes=10, max_chunks=2, max_chunk_bytes=10, content_digest=False)
    with pytest.raises(codec.ChunkFormatError, match="digest does not match"):
        lying.add(0, b"0123456789", sha256(b"something else").digest())


def test_one_chunk_covering_everything_is_not_copied(codec):
    message = codec.encode_chunk(os.urandom(MiB), 0)
    offset, data, digest = codec.decode_chunk(message, max_chunk_bytes=MiB)
    target = assembler(codec, MiB)
    target.add(offset, data, digest)
    buffer, whole = target.finish()
    assert buffer.address == data.address and whole == digest


def test_several_chunks_give_one_contiguous_aligned_buffer(codec):
    payload = np.arange(1 << 16, dtype=np.float32)
    raw = payload.tobytes()
    target = assembler(codec, len(raw))
    for offset, part in split(raw, 10_000):
        target.add(offset, pa.py_buffer(part))
    buffer, _ = target.finish()
    assert buffer.address % 64 == 0
    assert np.array_equal(np.frombuffer(buffer, dtype=np.float32), payload)


def test_empty_payload(codec):
    target = assembler(codec, 0, chunks=1, chunk_bytes=0)
    target.add(0, b"")
    buffer, digest = target.finish()
    assert (buffer.size, digest) == (0, sha256(b"").digest())
    with pytest.raises(codec.ChunkFormatError, match="finished"):
        target.add(0, b"")


def test_declared_size_limit_at_the_edges(codec):
    assembler(codec, 999, total=1000)
    assembler(codec, 1000, total=1000)
    with pytest.raises(codec.ChunkLimitError) as caught:
        assembler(codec, 1001, total=1000)
    assert (caught.value.name, caught.value.limit, caught.value.actual) == ("declared size", 1000, 1001)
    with pytest.raises(codec.ChunkLimitError):      # refused before any allocation: no MemoryError
        assembler(codec, 2**62, total=2**40)


def test_chunk_count_limit_at_the_edges(codec):
    for count in (2, 3):
        target = assembler(codec, count, chunks=3)
        for i in range(count):
            target.add(i, b"x")
        assert target.finish()[0].to_pybytes() == b"x" * count
    target = assembler(codec, 4, chunks=3)
    for i in range(3):
        target.add(i, b"x")
    with pytest.raises(codec.ChunkLimitError) as caught:
        target.add(3, b"x")
    assert (caught.value.name, caught.value.limit, caught.value.actual) == ("chunk count", 3, 4)
    assert (target.offset, target.chunks) == (3, 3)


def test_chunk_size_limit_in_the_assembler(codec):
    target = assembler(codec, 30, chunk_bytes=10)
    target.add(0, bytes(9))
    target.add(9, bytes(10))
    with pytest.raises(codec.ChunkLimitError) as caught:
        target.add(19, bytes(11))
    assert (caught.value.name, caught.value.limit, caught.value.actual) == ("chunk size", 10, 11)


def failing_add(codec, target, *args, error):
    before = (target.offset, target.chunks)
    with pytest.raises(error) as caught:
        target.add(*args)
    assert (target.offset, target.chunks) == before
    return caught.value


@pytest.mark.parametrize("case", ["gap", "overlap", "duplicate", "overrun", "digest-mismatch", "digest-size"])
def test_assembler_errors_change_nothing(codec, case):
    payload = os.urandom(100)
    target = assembler(codec, 100)
    target.add(0, payload[:40], sha256(payload[:40]).digest())
    if case == "gap":
        error = failing_add(codec, target, 41, payload[41:50], error=codec.ChunkFormatError)
        assert "chunk 1 at offset 41 leaves a gap" in str(error)
    elif case == "overlap":
        error = failing_add(codec, target, 39, payload[39:50], error=codec.ChunkFormatError)
        assert "chunk 1 at offset 39 overlaps" in str(error)
    elif case == "duplicate":
        error = failing_add(codec, target, 0, payload[:40], error=codec.ChunkFormatError)
        assert "chunk 1 at offset 0 overlaps" in str(error)
    elif case == "overrun":
        error = failing_add(codec, target, 40, os.urandom(61), error=codec.ChunkLimitError)
        assert (error.name, error.limit, error.actual) == ("payload size", 100, 101)
    elif case == "digest-mismatch":
        error = failing_add(codec, target, 40, payload[40:], sha256(b"other").digest(), error=codec.ChunkFormatError)
        assert "chunk 1 at offset 40 (60 bytes): digest does not match" in str(error)
    else:
        error = failing_add(codec, target, 40, payload[40:], b"short", error=codec.ChunkFormatError)
        assert "chunk 1 digest is 5 bytes" in str(error)
    target.add(40, payload[40:], sha256(payload[40:]).digest())
    buffer, digest = target.finish()
    assert (buffer.to_pybytes(), digest) == (payload, sha256(payload).digest())


def test_a_whole_chunk_with_a_wrong_digest_changes_nothing(codec):
    payload = os.urandom(64)
    target = assembler(codec, 64)
    failing_add(codec, target, 0, payload, bytes(32), error=codec.ChunkFormatError)
    target.add(0, payload, sha256(payload).digest())
    assert target.finish() [1] == sha256(payload).digest()


def test_a_big_chunk_with_a_wrong_digest_changes_nothing(codec):
    # Big enough for the compiled module to check its digest on a helper thread.
    payload = os.urandom(3 * MiB)
    target = assembler(codec, len(payload))
    target.add(0, payload[:MiB], sha256(payload[:MiB]).digest())
    error = failing_add(codec, target, MiB, payload[MiB:2 * MiB], sha256(b"x").digest(), error=codec.ChunkFormatError)
    assert f"chunk 1 at offset {MiB} ({MiB} bytes): digest does not match" in str(error)
    for offset in (MiB, 2 * MiB):
        part = payload[offset:offset + MiB]
        target.add(offset, part, sha256(part).digest())
    buffer, digest = target.finish()
    assert (buffer.to_pybytes(), digest) == (payload, sha256(payload).digest())


def test_incomplete_payload(codec):
    target = assembler(codec, 100)
    target.add(0, bytes(60))
    with pytest.raises(codec.ChunkFormatError, match="incomplete: 60 of 100 declared bytes received in 1 chunks"):
        target.finish()
    target.add(60, bytes(40))
    assert target.finish()[0].size == 100


@FUZZ
@given(sizes=st.lists(st.integers(0, 2000), max_size=12))
def test_assembly_of_any_split(codec, sizes):
    payload = os.urandom(sum(sizes))
    target = assembler(codec, len(payload), chunks=max(len(sizes), 1), chunk_bytes=2000)
    offset = 0
    for size in sizes:
        part = payload[offset:offset + size]
        target.add(offset, part, sha256(part).digest())
        offset += size
    buffer, digest = target.finish()
    assert (buffer.to_pybytes(), digest) == (payload, sha256(payload).digest())


# -- field_ends: a message split into its top-level fields ------------------------------------

def test_field_ends_split_a_message_into_its_fields(codec):
    pieces = [key(1, 2) + varint(3) + b"abc",            # length-delimited, one-byte length
              key(2, 0) + varint(300),                    # varint
              key(3, 1) + bytes(8),                       # fixed64
              key(4, 5) + bytes(4),                       # fixed32
              key(1, 2) + varint(20_000) + bytes(20_000),  # a three-byte length
              key(2**20, 2) + varint(0)]                  # a large field number, empty
    message = b"".join(pieces)
    ends = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    assert codec.field_ends(message) == ends
    assert codec.field_ends(b"") == []
    real = pb.PutPayloadRequest(chunk=pb.DataChunk(offset=5, data=b"x" * 500)).SerializeToString()
    assert codec.field_ends(real) == [len(real)]


@pytest.mark.parametrize("message, problem", [
    (key(1, 2) + varint(5) + b"abc", "claims 5 bytes but only 3 remain"),
    (key(3, 1) + bytes(4), "needs 8 bytes but only 4 remain"),
    (key(1, 3), "unsupported wire type 3"),
    (key(0, 0) + varint(1), "field number 0"),
    (key((1 << 29) + 5, 0) + varint(1), "field number 536870917 at byte 0 is invalid"),
    (b"\x0a\x80", "truncated varint"),
    (b"\xff" * 11, "longer than 64 bits"),
])
def test_field_ends_refuse_malformed_messages(codec, message, problem):
    with pytest.raises(codec.ChunkFormatError, match=problem):
        codec.field_ends(message)


@FUZZ
@given(data=st.binary(max_size=300))
def test_field_ends_agree_with_the_twin_on_any_bytes(codec, twin, data):
    def ends(module):
        try:
            return module.field_ends(data)
        except ValueError as error:
            return type(error).__name__, str(error)
    assert ends(codec) == ends(twin)
