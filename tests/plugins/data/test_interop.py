"""A client with only proto/ (generated classes, plain grpc) talks to the plane, both ways."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np

from planes.common.v1 import common_pb2
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel.tokens import issue_token

PUT = "/planes.data.v1.DataService/PutPayload"
GET = "/planes.data.v1.DataService/GetPayload"


def _foreign(served):
    token = issue_token(served.kernel.signing_key, principal="foreign", tenant="acme", roles=["service"],
                        ttl_seconds=60)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{served.port}")
    served.made.append(channel)
    return channel, (("authorization", f"Bearer {token}"),)


def test_foreign_producer_with_generated_classes_and_sha256(serve):
    data = np.arange(100_000, dtype=np.int64).tobytes()

    async def scenario(served):
        channel, metadata = _foreign(served)
        put = channel.stream_unary(PUT, pb.PutPayloadRequest.SerializeToString, pb.PutPayloadResponse.FromString)

        def requests():
            yield pb.PutPayloadRequest(header=pb.PayloadHeader(
                tenant="acme", classification=common_pb2.CLASSIFICATION_INTERNAL, kind=pb.CONTENT_KIND_TENSOR,
                tensor=pb.TensorInfo(dtype="int64", shape=[100_000]), declared_size=len(data),
                declared_digest=common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256,
                                                  value=hashlib.sha256(data).digest())))
            for offset in range(0, len(data), 65536):
                piece = data[offset:offset + 65536]
                yield pb.PutPayloadRequest(chunk=pb.DataChunk(offset=offset, data=piece,
                                                              digest=hashlib.sha256(piece).digest()))

        response = await put(requests(), metadata=metadata, timeout=10)
        array = await served.data().get_tensor(response.payload.ref.payload_id, verify=True)
        return response.payload, array

    info, array = serve(scenario)
    assert info.ref.digest.algorithm == common_pb2.DIGEST_ALGORITHM_SHA256
    assert info.ref.digest.value == hashlib.sha256(data).digest()
    assert np.array_equal(array, np.arange(100_000, dtype=np.int64))


def test_foreign_consumer_reads_what_the_native_codec_wrote(serve):
    payload = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)

    async def scenario(served):
        info = await served.data().put_tensor(payload, classification="confidential")
        channel, metadata = _foreign(served)
        get = channel.unary_stream(GET, pb.GetPayloadRequest.SerializeToString, pb.GetPayloadResponse.FromString)
        messages = [m async for m in get(pb.GetPayloadRequest(tenant="acme", payload_id=info.ref.payload_id,
                                                             chunk_size=100_000, chunk_digests=True),
                                         metadata=metadata, timeout=10)]
        return info, messages

    info, messages = serve(scenario)
    head, chunks = messages[0], messages[1:]
    assert head.WhichOneof("part") == "header" and head.header.ref.payload_id == info.ref.payload_id
    assert all(m.WhichOneof("part") == "chunk" for m in chunks) and len(chunks) == 12
    assert [c.chunk.offset for c in chunks] == list(range(0, 1_200_000, 100_000))
    assert all(hashlib.sha256(c.chunk.data).digest() == c.chunk.digest for c in chunks)
    received = b"".join(c.chunk.data for c in chunks)
    assert np.array_equal(np.frombuffer(received, np.float32), payload)
    assert head.header.tensor.dtype == "float32" and list(head.header.tensor.shape) == [300_000]
