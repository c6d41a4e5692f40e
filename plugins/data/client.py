"""The data plane's Python API: numpy arrays, pyarrow tensors and tables, files and bytes.

::

    data = DataClient(kernel.client(DataPlane, identity), tenant="acme")   # or connect(...) over gRPC
    info = await data.put_tensor(np.ones((1024, 1024), "float32"), classification="internal")
    array = await data.get_tensor(info.ref.payload_id)

Both directions speak the plane's wire format through the native codec
(:mod:`planes.native.codec`), never through generated protobuf chunk objects.

Copies, and why each remains:

* Put: one per chunk, into the outgoing message (``encode_chunk``): gRPC
  takes ``bytes`` and nothing else. A C-contiguous numpy array, a
  ``pyarrow.Tensor``, a file (memory-mapped) and ``bytes`` are read in place;
  a non-contiguous array is made contiguous first (one more copy), and a
  table is written to the Arrow IPC stream format first (one more copy).
* Get: one, from each received message into the payload's single buffer
  (``PayloadAssembler``): the chunks arrive in separate messages and a
  contiguous tensor needs them side by side. A payload that fits one chunk
  is the received message's bytes, with no copy. The returned numpy array,
  ``pyarrow.Tensor`` or table is a zero-copy view of that buffer.

The content digest (BLAKE3 unless ``digest_algorithm="sha256"``) is computed
on a thread beside the sending loop (both hashes release the GIL) and
declared in the trailer, so a put reads its payload once. A get checks it
only with ``verify=True`` (see :mod:`.plane` for why).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from planes.common.v1 import common_pb2
from planes.kernel import errors
from planes.kernel.contract import Encoded
from planes.kernel.digests import HASHES, NAMES
from planes.kernel.contracts.data import pb
from planes.native import load

from .limits import CLASSIFICATIONS, DESTINATION_KINDS
from .tensors import TensorLayoutError, check_layout

__all__ = ["DataClient", "EgressDenied", "IntegrityError", "TensorMismatch"]

#: The compiled codec, or its pure-Python twin under ``PLANES_NO_EXTENSIONS``.
codec = load("codec")

MiB = 1 << 20
GiB = 1 << 30
#: What gRPC holds beside the payload while a get's stream is read, in
#: messages: 6-8 of them at 8-16 MiB (peak receive memory of 1.24x and 1.40x
#: for 256 MiB), about 12 at 1-4 MiB (bench/RESULTS.md). Dividing a budget by
#: 12 kept a 256 MiB get within 1.17-1.19x with the default budget.
HELD_MESSAGES = 12
#: Below this a receive budget bounds nothing: smaller messages only cost more per byte.
MIN_GET_MESSAGE = 64 * 1024
ARROW_STREAM = "application/vnd.apache.arrow.stream"
SHA256 = common_pb2.DIGEST_ALGORITHM_SHA256
BLAKE3 = common_pb2.DIGEST_ALGORITHM_BLAKE3
_ALGORITHMS = {name: algorithm for algorithm, name in NAMES.items()}
_KINDS = {name: value for value, name in DESTINATION_KINDS.items()}


class EgressDenied(errors.PermissionDenied):
    """The egress rules refused a transfer; ``transfer_id`` names the recorded decision."""

    def __init__(self, message: str, transfer_id: str):
        super().__init__(message, metadata={"transfer_id": transfer_id})
        self.transfer_id = transfer_id


class IntegrityError(errors.FailedPrecondition):
    """Received bytes do not match the content digest the plane holds for them."""


class TensorMismatch(IntegrityError):
    """A tensor's dtype, shape and strides do not fit the bytes received, so no view of them is made."""


def _classification(value) -> int:
    if isinstance(value, str):
        try:
            return CLASSIFICATIONS[value.lower()]
        except KeyError:
            raise ValueError(f"classification must be one of {', '.join(CLASSIFICATIONS)}, not {value!r}") from None
    return int(value)


def _buffer(data) -> pa.Buffer:
    return data if isinstance(data, pa.Buffer) else pa.py_buffer(data)


class DataClient:
    """Puts and gets payloads of one tenant through a data plane client (local or remote)."""

    def __init__(self, client, tenant: str, *, chunk_bytes: int = MiB, max_chunk_bytes: int = 16 * MiB,
                 digest_algorithm: str = "blake3", task_credential: str = "",
                 receive_budget_bytes: int = 64 * MiB, max_payload_bytes: int = 64 * GiB):
        """``task_credential``: a worker's credential from its lease, sent with every request
        (the data plane requires one from callers acting only as workers).

        ``max_payload_bytes``: the largest payload :meth:`get` (and the
        tensor and table gets built on it) takes into memory: 64 GiB, a
        tenant's whole default quota. The size comes from the server, and a
        reader must not trust its server with its own memory: a larger one is
        refused (:class:`~planes.kernel.errors.LimitExceeded`) before anything
        is allocated. :meth:`get_file` streams to disk and takes any size,
        but no get takes more bytes than the size said.

        ``receive_budget_bytes``: memory a get may hold in received messages
        beside the payload's own buffer (0: no bound). gRPC holds several
        messages at once while a stream is read (its transport buffers, the
        slices of a message and the message joined from them), so a get asks
        for messages of at most 1/:data:`HELD_MESSAGES` of the budget,
        whatever its ``chunk_bytes``: with the default, about 5.3 MiB.
        """
        if digest_algorithm not in _ALGORITHMS:
            raise ValueError(f"digest_algorithm must be one of {', '.join(_ALGORITHMS)}")
        self.algorithm = _ALGORITHMS[digest_algorithm]
        self.client = client
        self.tenant = tenant
        self.task_credential = task_credential
        self.chunk_bytes = chunk_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.receive_budget_bytes = receive_budget_bytes
        self.max_payload_bytes = max_payload_bytes
        self._put = client.wire("put_payload")
        self._get = client.wire("get_payload")

    # -- put -----------------------------------------------------------------------

    async def put(self, data, *, classification, kind: int = pb.CONTENT_KIND_BLOB,
                  tensor: pb.TensorInfo | None = None, media_type: str = "", name: str = "",
                  ttl: float | None = None, correlation: common_pb2.Correlation | None = None,
                  digest: bytes | None = None, chunk_bytes: int | None = None,
                  timeout: float | None = None) -> pb.PayloadInfo:
        """Store ``data`` (anything with the buffer protocol, read in place); returns its info.

        ``digest``: the content digest (under the client's algorithm) when
        already known; otherwise it is computed while the chunks go out and
        sent in the trailer.
        """
        buffer = _buffer(data)
        size = buffer.size
        step = chunk_bytes or self.chunk_bytes
        header = pb.PayloadHeader(tenant=self.tenant, classification=_classification(classification), kind=kind,
                                  declared_size=size, declared_chunk_count=math.ceil(size / step),
                                  media_type=media_type, name=name, task_credential=self.task_credential)
        if tensor is not None:
            header.tensor.CopyFrom(tensor)
        if correlation is not None:
            header.correlation.CopyFrom(correlation)
        if ttl is not None:
            header.ttl.FromNanoseconds(int(ttl * 1e9))
        header.declared_digest.CopyFrom(common_pb2.Digest(algorithm=self.algorithm, value=digest or b""))

        async def requests() -> AsyncIterator:
            yield Encoded(pb.PutPayloadRequest(header=header).SerializeToString())
            hashing = None
            if digest is None:
                hashing = asyncio.get_running_loop().run_in_executor(None, _content_digest, self.algorithm, buffer)
            for offset in range(0, size, step):
                yield Encoded(codec.encode_chunk(buffer.slice(offset, min(step, size - offset)), offset,
                                                 digest=False))
            if hashing is not None:
                trailer = pb.PayloadTrailer(declared_digest=common_pb2.Digest(algorithm=self.algorithm,
                                                                              value=await hashing))
                yield Encoded(pb.PutPayloadRequest(trailer=trailer).SerializeToString())

        raw = await self._put(requests(), timeout=timeout)
        return pb.PutPayloadResponse.FromString(raw).payload

    async def put_tensor(self, tensor, *, classification, **options) -> pb.PayloadInfo:
        """A numpy array or ``pyarrow.Tensor``; stored C-contiguous with its dtype and shape."""
        array = tensor.to_numpy() if isinstance(tensor, pa.Tensor) else np.asarray(tensor)
        if array.dtype.hasobject:
            raise TypeError("an object array has no fixed-size bytes to store")
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # the one copy a strided tensor costs; keeps a 0-d array 0-d
        info = pb.TensorInfo(dtype=array.dtype.str if array.dtype.byteorder == ">" else array.dtype.name,
                             shape=array.shape)
        return await self.put(array.reshape(-1).view(np.uint8) if array.size else b"",
                              classification=classification, kind=pb.CONTENT_KIND_TENSOR, tensor=info,
                              **options)

    async def put_table(self, table, *, classification, **options) -> pb.PayloadInfo:
        """A ``pyarrow.Table`` or ``RecordBatch``, sent in the Arrow IPC stream format."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write(table)
        return await self.put(sink.getvalue(), classification=classification, kind=pb.CONTENT_KIND_ARROW_IPC,
                              media_type=options.pop("media_type", ARROW_STREAM), **options)

    async def put_file(self, path, *, classification, **options) -> pb.PayloadInfo:
        """A file, memory-mapped rather than read; its name goes with it."""
        path = Path(path)
        options.setdefault("name", path.name)
        if path.stat().st_size == 0:
            return await self.put(b"", classification=classification, kind=pb.CONTENT_KIND_FILE, **options)
        with pa.memory_map(str(path), "r") as mapped:
            buffer = mapped.read_buffer()
        return await self.put(buffer, classification=classification, kind=pb.CONTENT_KIND_FILE, **options)

    # -- get -----------------------------------------------------------------------

    def get_message_bytes(self, chunk_bytes: int | None = None) -> int:
        """The chunk size a get asks for: ``chunk_bytes`` (or the client's), bounded by the receive budget."""
        size = chunk_bytes or self.chunk_bytes
        if self.receive_budget_bytes:
            size = min(size, max(MIN_GET_MESSAGE, self.receive_budget_bytes // HELD_MESSAGES))
        return size

    def _request(self, payload_id: str, max_age: float | None, expected_digest: common_pb2.Digest | None,
                 chunk_bytes: int | None, chunk_digests: bool) -> pb.GetPayloadRequest:
        request = pb.GetPayloadRequest(tenant=self.tenant, payload_id=payload_id,
                                       chunk_size=self.get_message_bytes(chunk_bytes), chunk_digests=chunk_digests,
                                       task_credential=self.task_credential)
        if max_age is not None:
            request.max_age.FromNanoseconds(int(max_age * 1e9))
        if expected_digest is not None:
            request.expected_digest.CopyFrom(expected_digest)
        return request

    async def _chunks(self, request: pb.GetPayloadRequest, timeout: float | None):
        stream = self._get(request, timeout=timeout).__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise errors.Unavailable(f"payload {request.payload_id}: the stream ended before its info") from None
        info = pb.GetPayloadResponse.FromString(first).header
        return info, stream

    async def get(self, payload_id: str, *, max_age: float | None = None,
                  expected_digest: common_pb2.Digest | None = None,
                  verify: bool = False, chunk_bytes: int | None = None, chunk_digests: bool = False,
                  timeout: float | None = None) -> tuple[pb.PayloadInfo, pa.Buffer]:
        """``(info, bytes)`` of a payload, reassembled into one buffer.

        ``max_age`` (seconds) refuses an older payload; ``expected_digest``
        (``info.ref.digest`` of the reference held) one whose digest changed;
        ``verify`` checks the bytes against the content digest (one more
        pass over them); ``chunk_digests`` asks for and checks each chunk's
        SHA-256 as it arrives. ``chunk_bytes`` is the message size asked for,
        within the client's ``receive_budget_bytes``.
        """
        info, stream = await self._chunks(
            self._request(payload_id, max_age, expected_digest, chunk_bytes, chunk_digests), timeout)
        try:
            size = self._admit(payload_id, info.ref.size)
        except errors.LimitExceeded:
            await stream.aclose()  # ends the call: the server stops sending what will not be read
            raise
        assembler = codec.PayloadAssembler(size, max_total_bytes=size, max_chunks=size + 1,
                                           max_chunk_bytes=self.max_chunk_bytes, content_digest=False)
        try:
            try:
                async for raw in stream:
                    offset, data, sent = codec.decode_chunk(raw, max_chunk_bytes=self.max_chunk_bytes)
                    assembler.add(offset, data, sent)
                    # Let the message go now, not when the next one has arrived: one
                    # chunk less held at the peak.
                    del raw, data
                payload, _ = assembler.finish()
            finally:
                await stream.aclose()  # ends the call when left early, rather than leave it to the collector
        except (codec.ChunkFormatError, codec.ChunkLimitError) as exc:
            raise IntegrityError(f"payload {payload_id}: {exc}") from None
        except MemoryError:  # pyarrow's ArrowMemoryError too
            raise errors.Unavailable(f"payload {payload_id}: no memory for its {size} bytes in this process "
                                     "(get_file writes a payload to disk one chunk at a time)") from None
        if verify and _content_digest(info.ref.digest.algorithm, payload) != info.ref.digest.value:
            raise IntegrityError(f"payload {payload_id}: received bytes do not match its content digest")
        return info, payload

    async def get_bytes(self, payload_id: str, **options) -> bytes:
        return (await self.get(payload_id, **options))[1].to_pybytes()

    async def get_tensor(self, payload_id: str, **options) -> np.ndarray:
        """The payload as a numpy array: a zero-copy view of the received buffer."""
        info, buffer = await self.get(payload_id, **options)
        if info.kind != pb.CONTENT_KIND_TENSOR:
            raise errors.FailedPrecondition(f"payload {payload_id} is not a tensor")
        # The view reads wherever the strides point: check them against the
        # bytes that arrived, not the plane's word that they fit.
        # numpy's own constructor checks the strides against the buffer once more.
        try:
            dtype = check_layout(info.tensor, buffer.size, what="the received")
            return np.ndarray(tuple(info.tensor.shape), dtype, buffer=buffer,
                              strides=tuple(info.tensor.strides) or None)
        except (TensorLayoutError, TypeError, ValueError) as exc:
            raise TensorMismatch(f"payload {payload_id}: {exc}") from None

    async def get_arrow_tensor(self, payload_id: str, **options) -> pa.Tensor:
        return pa.Tensor.from_numpy(await self.get_tensor(payload_id, **options))

    async def get_table(self, payload_id: str, **options) -> pa.Table:
        """An Arrow IPC payload as a ``pyarrow.Table`` whose columns point into the received buffer."""
        info, buffer = await self.get(payload_id, **options)
        if info.kind != pb.CONTENT_KIND_ARROW_IPC:
            raise errors.FailedPrecondition(f"payload {payload_id} is not an Arrow IPC stream")
        return pa.ipc.open_stream(buffer).read_all()

    async def get_file(self, payload_id: str, path, *, max_age: float | None = None,
                       expected_digest: common_pb2.Digest | None = None,
                       timeout: float | None = None) -> pb.PayloadInfo:
        """Write a payload to ``path`` chunk by chunk (memory stays one chunk), checking its digest.

        The file appears only complete and checked: it is written beside
        ``path`` and renamed into place. It is created with mode 0600,
        whatever the payload's class: the bytes leave the plane decrypted.
        """
        path = Path(path)
        info, stream = await self._chunks(self._request(payload_id, max_age, expected_digest, None, False), timeout)
        size = info.ref.size  # to disk, a chunk at a time: not bounded by max_payload_bytes
        partial = path.with_name(f".{path.name}.partial")
        running = _hasher(info.ref.digest.algorithm)
        received = 0
        try:
            partial.unlink(missing_ok=True)  # a crashed earlier get's leftover, whatever its mode
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                async for raw in stream:
                    offset, data, _ = codec.decode_chunk(raw, max_chunk_bytes=self.max_chunk_bytes)
                    if offset != received:
                        raise IntegrityError(f"payload {payload_id}: chunk at offset {offset}, expected {received}")
                    if received + data.size > size:
                        raise IntegrityError(f"payload {payload_id}: more than its {size} declared bytes arrived")
                    running.update(data)
                    out.write(data)
                    received += data.size
            if received != info.ref.size or running.digest() != info.ref.digest.value:
                raise IntegrityError(f"payload {payload_id}: received {received} bytes not matching its info")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
            await stream.aclose()  # ends the call when left early
        return info

    def _admit(self, payload_id: str, size: int) -> int:
        """``size``, the server's word for a payload's size, if this client takes that much into memory."""
        if size > self.max_payload_bytes:
            raise errors.LimitExceeded("max_payload_bytes", self.max_payload_bytes, size,
                                       message=f"payload {payload_id} is {size} bytes, more than this client's "
                                               f"max_payload_bytes ({self.max_payload_bytes})")
        return size

    # -- the rest ------------------------------------------------------------------------

    async def stat(self, payload_id: str) -> pb.PayloadInfo:
        response = await self.client.stat_payload(pb.StatPayloadRequest(
            tenant=self.tenant, payload_id=payload_id, task_credential=self.task_credential))
        return response.payload

    async def delete(self, payload_id: str, reason: str = "") -> pb.PayloadInfo:
        response = await self.client.delete_payload(
            pb.DeletePayloadRequest(tenant=self.tenant, payload_id=payload_id, reason=reason))
        return response.payload

    async def transfer(self, payload_id: str, destination: str, *, raise_on_denial: bool = True
                       ) -> pb.TransferPayloadResponse:
        """Ask to hand a payload to ``destination`` (``tool:NAME``, ``model_route:NAME`` or ``sink:NAME``).

        A denial raises :class:`EgressDenied` (or, with ``raise_on_denial=False``,
        comes back with ``allowed`` false); either way it is recorded.
        """
        kind, _, name = destination.partition(":")
        if kind not in _KINDS or not name:
            raise ValueError(f"destination must be tool:NAME, model_route:NAME or sink:NAME, not {destination!r}")
        response = await self.client.transfer_payload(pb.TransferPayloadRequest(
            tenant=self.tenant, payload_id=payload_id, destination=pb.Destination(kind=_KINDS[kind], name=name),
            task_credential=self.task_credential))
        if not response.allowed and raise_on_denial:
            raise EgressDenied(response.refusal_reason, response.transfer_id)
        return response


def _hasher(algorithm: int):
    if algorithm not in HASHES:
        raise IntegrityError(f"unknown content digest algorithm {algorithm}")
    return HASHES[algorithm]()


def _content_digest(algorithm: int, buffer: pa.Buffer) -> bytes:
    hasher = _hasher(algorithm)
    hasher.update(memoryview(buffer))
    return hasher.digest()
