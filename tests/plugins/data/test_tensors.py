"""Tensor headers over real gRPC: strides stay inside the payload, on the plane and again in the client.

A tensor is viewed in place, so a shape and strides that reach outside the
bytes would read memory that is not the payload's. Each refusal here also
checks that nothing was stored. The client takes neither the plane's
strides nor its sizes on trust: the last tests lie about a payload's size.
"""

from __future__ import annotations

import blake3
import numpy as np
import pytest

from planes.common.v1 import common_pb2
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contract import Encoded
from planes.native import load
from planes.plugins.data.client import IntegrityError, TensorMismatch
from planes.plugins.data.tensors import MAX_DTYPE_CHARS

from .test_admission import nothing_left, put_raw

codec = load("codec")
VALUES = np.array([111, 222, 333], dtype=np.int64)


async def put_tensor_as_declared(data, raw: bytes, dtype: str, shape, strides=()):
    """A tensor put with a hand-written TensorInfo (``put_tensor`` always sends a C-contiguous one)."""
    return await data.put(raw, classification="internal", kind=pb.CONTENT_KIND_TENSOR,
                          tensor=pb.TensorInfo(dtype=dtype, shape=shape, strides=strides))


@pytest.mark.parametrize("shape, strides, message", [
    ([3], [-8], "reach 16 bytes before the payload's first byte"),
    ([3, 1], [-8, 8], "reach 16 bytes before the payload's first byte"),
    ([3], [16], "reach 40 bytes, past the declared 24"),
    ([2, 2], [16, 4], "reach 28 bytes, past the declared 24"),
])
def test_strides_reaching_outside_the_payload_are_refused_with_the_numbers(serve, shape, strides, message):
    async def scenario(served):
        with pytest.raises(errors.InvalidArgument, match=message) as refused:
            await put_tensor_as_declared(served.data(), VALUES.view(np.uint8), "int64", shape, strides)
        nothing_left(served)
        return str(refused.value)

    assert "header.tensor" in serve(scenario)


def test_strides_just_inside_the_payload_are_viewed_exactly(serve):
    """The edge cases that fit: the last byte reached is the last byte stored, and a negative stride on length 1."""
    async def scenario(served):
        data = served.data()
        raw = VALUES.view(np.uint8)
        every_other = await put_tensor_as_declared(data, raw, "int64", [2], [16])
        reversed_one = await put_tensor_as_declared(data, raw, "int64", [1, 3], [-8, 8])
        broadcast = await put_tensor_as_declared(data, raw, "int64", [2, 3], [0, 8])
        return [(await data.get_tensor(info.ref.payload_id)).tolist()
                for info in (every_other, reversed_one, broadcast)]

    assert serve(scenario) == [[111, 333], [[111, 222, 333]], [[111, 222, 333], [111, 222, 333]]]


@pytest.mark.parametrize("tensor", [
    pb.TensorInfo(dtype="int64", shape=[3], strides=[-8]),
    pb.TensorInfo(dtype="int64", shape=[4], strides=[8]),
    pb.TensorInfo(dtype="int64", shape=[4]),
    pb.TensorInfo(dtype="i4,(", shape=[1]),
], ids=["negative stride", "past the end", "contiguous, too long", "malformed dtype"])
def test_the_client_refuses_a_header_its_received_bytes_cannot_back(serve, tensor):
    """The client does not take the plane's word: a catalogue entry altered behind the plane's back is refused."""
    async def scenario(served):
        data = served.data()
        info = await data.put_tensor(VALUES, classification="internal")
        store = served.plugin.plane.store
        record = store.get(info.ref.payload_id)
        record.info.tensor.CopyFrom(tensor)
        store.update(record)
        with pytest.raises(TensorMismatch, match=f"payload {info.ref.payload_id}: .*tensor"):
            await data.get_tensor(info.ref.payload_id)
        return await data.get_bytes(info.ref.payload_id)

    assert serve(scenario) == VALUES.tobytes(), "the bytes are still there; only the view was refused"
    assert issubclass(TensorMismatch, IntegrityError)


def _short_tensor_put(body: bytes, declared: int):
    """A tensor put that declares ``declared`` bytes of int64 [declared // 8] but sends ``body``: quarantined."""
    made = pb.PayloadHeader(tenant="acme", classification=common_pb2.CLASSIFICATION_INTERNAL,
                            kind=pb.CONTENT_KIND_TENSOR, declared_size=declared,
                            tensor=pb.TensorInfo(dtype="int64", shape=[declared // 8], strides=[8]),
                            declared_digest=common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_BLAKE3,
                                                              value=blake3.blake3(body).digest()))
    return (Encoded(pb.PutPayloadRequest(header=made).SerializeToString()),
            Encoded(codec.encode_chunk(body, 0, digest=False)))


def test_a_quarantined_tensor_shorter_than_its_header_is_not_released(serve):
    async def scenario(served):
        with pytest.raises(errors.InvalidArgument, match="quarantined") as refused:
            await put_raw(served.remote(), *_short_tensor_put(VALUES[:1].tobytes(), 32))
        payload_id = refused.value.metadata["payload_id"]
        operator = served.data(roles=("operator",)).client
        with pytest.raises(errors.FailedPrecondition,
                           match="cannot be released as a tensor: .*reach 32 bytes, past the stored 8"):
            await operator.release_quarantine(pb.ReleaseQuarantineRequest(
                tenant="acme", payload_id=payload_id, reason="looks fine"))
        still = await served.data().stat(payload_id)
        with pytest.raises(errors.FailedPrecondition, match="quarantined"):
            await served.data().get_tensor(payload_id)
        return still, await served.events()

    still, events = serve(scenario)
    assert still.state == pb.PAYLOAD_STATE_QUARANTINED and still.ref.size == 8
    assert not [e for e in events if e.event_type == "data.released"], "a refused release records no release"


def test_a_quarantined_tensor_that_fits_its_bytes_is_released(serve):
    """A digest mismatch of the full size: the header fits what arrived, so the operator may release it."""
    async def scenario(served):
        body = VALUES.tobytes()
        stream = list(_short_tensor_put(body, 24))
        stream[0] = Encoded(stream[0].data.replace(blake3.blake3(body).digest(), bytes(32)))
        with pytest.raises(errors.InvalidArgument, match="quarantined") as refused:
            await put_raw(served.remote(), *stream)
        payload_id = refused.value.metadata["payload_id"]
        await served.data(roles=("operator",)).client.release_quarantine(pb.ReleaseQuarantineRequest(
            tenant="acme", payload_id=payload_id, reason="checked by hand"))
        return await served.data().get_tensor(payload_id)

    assert serve(scenario).tolist() == VALUES.tolist()


@pytest.mark.parametrize("dtype", [
    "(2147483648,)i8",   # ValueError from numpy
    "i4,(",              # SyntaxError
    "nonsense",          # TypeError
    "O",                 # an object pointer, not bytes
    "(2,)i4",            # a sub-array: dimensions the shape does not hold
    "i8" + " " * 10_000,  # longer than any type name: refused unparsed
])
def test_a_malformed_dtype_is_invalid_argument_naming_the_field(serve, dtype):
    async def scenario(served):
        data = served.data()
        with pytest.raises(errors.InvalidArgument, match="header.tensor: tensor dtype") as refused:
            await put_tensor_as_declared(data, b"\0" * 8, dtype, [1])
        nothing_left(served)
        budget = served.plugin.plane.tenant_budget("acme").used
        after = await data.put_tensor(VALUES, classification="internal")
        return str(refused.value), budget, after

    message, budget, after = serve(scenario)
    assert len(message) < 300, "the refusal does not echo unbounded input"
    assert budget == 0 and after.ref.size == 24, "the refused stream left no bytes held, and the plane goes on"
    if len(dtype) > MAX_DTYPE_CHARS:
        assert f"{len(dtype)} characters" in message


def _lie_about_size(served, payload_id: str, size: int) -> None:
    """Make the plane state ``size`` for a payload whose stored bytes are others, behind its back."""
    store = served.plugin.plane.store
    record = store.get(payload_id)
    record.info.ref.size = size
    store.update(record)


def test_the_client_refuses_a_size_over_its_limit_before_allocating(serve, tmp_path):
    (tmp_path / "out").mkdir()

    async def scenario(served):
        data = served.data()
        info = await data.put(VALUES.tobytes(), classification="internal")
        _lie_about_size(served, info.ref.payload_id, 1 << 40)
        with pytest.raises(errors.LimitExceeded) as by_default:
            await data.get(info.ref.payload_id)
        data.max_payload_bytes = 1 << 20
        _lie_about_size(served, info.ref.payload_id, (1 << 20) + 1)
        with pytest.raises(errors.LimitExceeded) as by_setting:
            await data.get(info.ref.payload_id)
        # To disk a chunk at a time, any size is taken: the lie shows as bytes missing, and nothing is kept.
        with pytest.raises(IntegrityError, match="not matching its info"):
            await data.get_file(info.ref.payload_id, tmp_path / "out" / "out.bin")
        return by_default.value, by_setting.value

    by_default, by_setting = serve(scenario)
    assert (by_default.name, by_default.limit, by_default.actual) == ("max_payload_bytes", 64 << 30, 1 << 40)
    assert (by_setting.limit, by_setting.actual) == (1 << 20, (1 << 20) + 1)
    assert "more than this client's max_payload_bytes" in by_setting.message
    assert list((tmp_path / "out").iterdir()) == [], "nothing written"


def test_a_size_the_client_cannot_allocate_is_a_typed_error(serve):
    async def scenario(served):
        data = served.data()
        data.max_payload_bytes = 1 << 63
        info = await data.put(VALUES.tobytes(), classification="internal")
        _lie_about_size(served, info.ref.payload_id, 1 << 62)
        with pytest.raises(errors.Unavailable, match=f"payload {info.ref.payload_id}: no memory for its") as refused:
            await data.get(info.ref.payload_id)
        return refused.value

    assert str(1 << 62) in serve(scenario).message


def test_get_file_stops_at_the_declared_size(serve, tmp_path):
    (tmp_path / "out").mkdir()

    async def scenario(served):
        data = served.data()
        info = await data.put(VALUES.tobytes(), classification="internal", chunk_bytes=8)
        _lie_about_size(served, info.ref.payload_id, 8)
        with pytest.raises(IntegrityError, match="more than its 8 declared bytes arrived"):
            await data.get_file(info.ref.payload_id, tmp_path / "out" / "out.bin")

    serve(scenario)
    assert list((tmp_path / "out").iterdir()) == [], "no partial or final file left"
