"""The data plane's chunk codec: the pure-Python twin of ``codec.pyx``.

Same API, same results and the same errors as the compiled module, on
:mod:`hashlib`; ``PLANES_NO_EXTENSIONS=1`` selects it (see :mod:`planes.native`).

The wire format is the protobuf contract's (``proto/planes/data/v1``): a
request or response message (``PutPayloadRequest``, ``GetPayloadResponse``)
whose oneof field ``field`` (2 in both) holds a ``DataChunk``::

    DataChunk { uint64 offset = 1; bytes data = 2; bytes digest = 3; }

``encode_chunk`` writes exactly what the generated classes serialize (fields
in number order, proto3 defaults omitted), so the bytes are interchangeable
with any protobuf runtime's; digests are SHA-256 (32 bytes).

``decode_chunk`` reads a message that holds the chunk field and nothing else:
any other field of the outer message (its ``header``, an unknown one) is a
:class:`ChunkFormatError`, because a chunk stream must not smuggle anything
past the codec. Inside ``DataChunk`` it is stricter than protobuf in one way
and as lenient in another:

- ``offset``, ``data`` and ``digest`` may each appear at most once (protobuf
  would let the last one win; a repeated field here is a lie, so an error);
- well-formed unknown fields (wire types 0, 1, 2 and 5) are skipped, as
  protobuf does, so a newer producer may add fields; groups (wire types 3
  and 4) and the undefined wire types 6 and 7 are errors.

Each length prefix is checked against its limit (``max_chunk_bytes`` for
``data``, :data:`MAX_DIGEST_BYTES` for ``digest``) and then against the bytes
that remain before anything is sliced; varints longer than 10 bytes or beyond
64 bits are errors. Nothing in the message is ever allocated by its claimed
size: the payload comes back as a zero-copy ``pyarrow.Buffer`` slice of the
received bytes.

Error messages carry field numbers, positions, sizes and chunk indexes, never
payload bytes.
"""

from __future__ import annotations

import operator
from hashlib import sha256

import pyarrow as pa

__all__ = [
    "DIGEST_SIZE",
    "MAX_DIGEST_BYTES",
    "ChunkFormatError",
    "ChunkLimitError",
    "PayloadAssembler",
    "chunk_digest",
    "decode_chunk",
    "encode_chunk",
    "encode_chunk_with_digest",
    "field_ends",
]

#: SHA-256 digest size, the only digest the codec computes.
DIGEST_SIZE = 32
#: The longest ``digest`` field ``decode_chunk`` accepts (room for SHA-512 or a long BLAKE3 output).
MAX_DIGEST_BYTES = 64
#: The largest protobuf field number.
MAX_FIELD = 2**29 - 1
MAX_OFFSET = 2**64 - 1

# DataChunk's fields and their wire types.
_OFFSET, _DATA, _DIGEST = 1, 2, 3
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_FIELD_NAMES = {_OFFSET: "offset", _DATA: "data", _DIGEST: "digest"}
_WIRE_TYPES = {_OFFSET: _VARINT, _DATA: _LENGTH, _DIGEST: _LENGTH}


class ChunkFormatError(ValueError):
    """A chunk message or chunk sequence that is malformed, truncated or inconsistent."""


class ChunkLimitError(ValueError):
    """A size or count over its limit: ``name`` says which, ``limit`` and ``actual`` the numbers."""

    def __init__(self, name: str, limit: int, actual: int) -> None:
        super().__init__(f"{name} {actual} exceeds the limit of {limit}")
        self.name = name
        self.limit = limit
        self.actual = actual

    def __reduce__(self):
        return (type(self), (self.name, self.limit, self.actual))


# -- errors, shared with the compiled module (the one place codes become exceptions) --

#: Parse failure codes; the compiled module reports the same codes to :func:`_parse_error`.
TRUNCATED_VARINT, VARINT_OVERFLOW, ZERO_FIELD, UNEXPECTED_FIELD, WRONG_WIRE_TYPE = 1, 2, 3, 4, 5
DUPLICATE_FIELD, LENGTH_BEYOND_END, UNSUPPORTED_WIRE_TYPE, MISSING_CHUNK, DATA_LIMIT = 6, 7, 8, 9, 10
DIGEST_LIMIT, FIXED_BEYOND_END = 11, 12
#: Protobuf's largest field number (2^29 - 1): a tag past it is corrupt, not an unknown field.
MAX_FIELD_NUMBER = (1 << 29) - 1


def _parse_error(code: int, position: int, field: int, a: int, b: int) -> ValueError:
    """The exception for a parse failure at byte ``position``; ``a`` and ``b`` depend on ``code``."""
    where = f"at byte {position}"
    if code == TRUNCATED_VARINT:
        return ChunkFormatError(f"truncated varint {where}")
    if code == VARINT_OVERFLOW:
        return ChunkFormatError(f"varint {where} is longer than 64 bits")
    if code == ZERO_FIELD:  # 0, or past MAX_FIELD_NUMBER
        return ChunkFormatError(f"field number {field} {where} is invalid (field numbers run from 1 to "
                                f"{MAX_FIELD_NUMBER})")
    if code == UNEXPECTED_FIELD:
        return ChunkFormatError(f"unexpected field {a} {where}: a chunk message must hold only its "
                                f"chunk field {field}")
    if code == WRONG_WIRE_TYPE:
        return ChunkFormatError(f"field {field} {where} has wire type {a}, expected {b}")
    if code == DUPLICATE_FIELD:
        return ChunkFormatError(f"field {field} {where} appears more than once")
    if code == LENGTH_BEYOND_END:
        return ChunkFormatError(f"field {field} {where} claims {a} bytes but only {b} remain")
    if code == FIXED_BEYOND_END:
        return ChunkFormatError(f"field {field} {where} needs {a} bytes but only {b} remain")
    if code == UNSUPPORTED_WIRE_TYPE:
        return ChunkFormatError(f"field {field} {where} has unsupported wire type {a}")
    if code == MISSING_CHUNK:
        return ChunkFormatError(f"message holds no chunk field {field}")
    if code == DATA_LIMIT:
        return ChunkLimitError("chunk size", a, b)
    if code == DIGEST_LIMIT:
        return ChunkLimitError("digest size", a, b)
    return ChunkFormatError(f"malformed chunk message (code {code}) {where}")


class _ParseFailure(Exception):
    def __init__(self, code: int, position: int, field: int = 0, a: int = 0, b: int = 0) -> None:
        self.args_ = (code, position, field, a, b)


# -- arguments ---------------------------------------------------------------

def _bytes_view(value, name: str) -> memoryview:
    """A flat, C-contiguous byte view of a buffer-protocol object."""
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(value).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _field_arg(field) -> int:
    number = operator.index(field)
    if not 1 <= number <= MAX_FIELD:
        raise ValueError(f"field must be a protobuf field number in 1..{MAX_FIELD}, got {number}")
    return number


def _size_arg(value, name: str) -> int:
    number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    return number


def _offset_arg(value) -> int:
    number = operator.index(value)
    if not 0 <= number <= MAX_OFFSET:
        raise ValueError(f"offset must be in 0..2**64-1, got {number}")
    return number


def _as_arrow(message) -> pa.Buffer:
    return message if isinstance(message, pa.Buffer) else pa.py_buffer(message)


# -- encoding ----------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode(view: memoryview, offset: int, field: int, digest: bytes) -> bytes:
    size = view.nbytes
    inner = b""
    if offset:
        inner += b"\x08" + _varint(offset)
    head = _varint((field << 3) | _LENGTH)
    data_prefix = (b"\x12" + _varint(size)) if size else b""
    digest_field = (b"\x1a" + _varint(len(digest)) + digest) if digest else b""
    inner_size = len(inner) + len(data_prefix) + size + len(digest_field)
    out = bytearray(head + _varint(inner_size) + inner + data_prefix)
    out += view
    out += digest_field
    return bytes(out)


def chunk_digest(data) -> bytes:
    """SHA-256 of a buffer (what a chunk's ``digest`` field holds)."""
    return sha256(_bytes_view(data, "data")).digest()


def encode_chunk_with_digest(data, offset, *, field=2) -> tuple[bytes, bytes]:
    """Encode a chunk with its SHA-256 digest; ``(message, digest)``, hashing ``data`` once."""
    view = _bytes_view(data, "data")
    offset, field = _offset_arg(offset), _field_arg(field)
    digest = sha256(view).digest()
    return _encode(view, offset, field, digest), digest


def encode_chunk(data, offset, *, field=2, digest=True) -> bytes:
    """The protobuf bytes of a message whose field ``field`` holds ``DataChunk{offset, data, digest}``.

    ``digest=True`` adds the SHA-256 of ``data``; ``False`` leaves it empty.
    One allocation of the exact size and one copy of ``data`` (in the compiled
    module); the result is ``bytes``, as grpcio serializers must return.
    """
    view = _bytes_view(data, "data")
    offset, field = _offset_arg(offset), _field_arg(field)
    return _encode(view, offset, field, sha256(view).digest() if digest else b"")


# -- decoding ----------------------------------------------------------------

def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    start, value = pos, 0
    for i in range(10):
        if pos >= end:
            raise _ParseFailure(TRUNCATED_VARINT, start)
        byte = view[pos]
        pos += 1
        if i == 9:
            if byte > 1:
                raise _ParseFailure(VARINT_OVERFLOW, start)
            return value | (byte << 63), pos
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    raise AssertionError("unreachable")


def _read_tag(view: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """A field's number, wire type and the position after its tag; field number 0, or one past
    :data:`MAX_FIELD_NUMBER`, is malformed (protobuf refuses both as a corrupt wire format)."""
    at = pos
    key, pos = _read_varint(view, pos, end)
    if not 1 <= key >> 3 <= MAX_FIELD_NUMBER:
        raise _ParseFailure(ZERO_FIELD, at, key >> 3)
    return key >> 3, key & 7, pos


def _parse_inner(view: memoryview, pos: int, end: int, max_chunk_bytes: int):
    offset, data, digest = 0, (pos, 0), (pos, 0)
    seen = set()
    while pos < end:
        at = pos
        number, wire, pos = _read_tag(view, pos, end)
        if number in _WIRE_TYPES:
            if wire != _WIRE_TYPES[number]:
                raise _ParseFailure(WRONG_WIRE_TYPE, at, number, wire, _WIRE_TYPES[number])
            if number in seen:
                raise _ParseFailure(DUPLICATE_FIELD, at, number)
            seen.add(number)
            if number == _OFFSET:
                offset, pos = _read_varint(view, pos, end)
                continue
            length, pos = _read_varint(view, pos, end)
            if number == _DATA and length > max_chunk_bytes:
                raise _ParseFailure(DATA_LIMIT, at, number, max_chunk_bytes, length)
            if number == _DIGEST and length > MAX_DIGEST_BYTES:
                raise _ParseFailure(DIGEST_LIMIT, at, number, MAX_DIGEST_BYTES, length)
            if length > end - pos:
                raise _ParseFailure(LENGTH_BEYOND_END, at, number, length, end - pos)
            if number == _DATA:
                data = (pos, length)
            else:
                digest = (pos, length)
            pos += length
        else:
            pos = _skip_value(view, pos, end, at, number, wire)
    return offset, data, digest


def _skip_value(view: memoryview, pos: int, end: int, at: int, number: int, wire: int) -> int:
    """The position after the value of field ``number`` (key at ``at``), whatever its wire type."""
    if wire == _VARINT:
        return _read_varint(view, pos, end)[1]
    if wire == _FIXED64 or wire == _FIXED32:
        need = 8 if wire == _FIXED64 else 4
        if need > end - pos:
            raise _ParseFailure(FIXED_BEYOND_END, at, number, need, end - pos)
        return pos + need
    if wire == _LENGTH:
        length, pos = _read_varint(view, pos, end)
        if length > end - pos:
            raise _ParseFailure(LENGTH_BEYOND_END, at, number, length, end - pos)
        return pos + length
    raise _ParseFailure(UNSUPPORTED_WIRE_TYPE, at, number, wire)


def _parse(view: memoryview, field: int, max_chunk_bytes: int):
    pos, end, found = 0, view.nbytes, None
    while pos < end:
        at = pos
        number, wire, pos = _read_tag(view, pos, end)
        if number != field:
            raise _ParseFailure(UNEXPECTED_FIELD, at, field, number)
        if wire != _LENGTH:
            raise _ParseFailure(WRONG_WIRE_TYPE, at, number, wire, _LENGTH)
        if found is not None:
            raise _ParseFailure(DUPLICATE_FIELD, at, number)
        length, pos = _read_varint(view, pos, end)
        if length > end - pos:
            raise _ParseFailure(LENGTH_BEYOND_END, at, number, length, end - pos)
        found = _parse_inner(view, pos, pos + length, max_chunk_bytes)
        pos += length
    if found is None:
        raise _ParseFailure(MISSING_CHUNK, 0, field)
    return found


def decode_chunk(message, *, max_chunk_bytes, field=2, verify=False) -> tuple[int, pa.Buffer, bytes]:
    """``(offset, data, digest)`` of a chunk message; ``data`` is a zero-copy slice of ``message``.

    ``digest`` is the one sent (``b""`` when none). ``verify=True`` checks a
    sent digest against the data (SHA-256) and raises :class:`ChunkFormatError`
    on a mismatch; an empty digest is not checked.
    """
    buffer = _as_arrow(message)
    view = _bytes_view(buffer, "message")
    limit, field = _size_arg(max_chunk_bytes, "max_chunk_bytes"), _field_arg(field)
    try:
        offset, (data_at, data_size), (digest_at, digest_size) = _parse(view, field, limit)
    except _ParseFailure as failure:
        raise _parse_error(*failure.args_) from None
    digest = bytes(view[digest_at:digest_at + digest_size])
    if verify and digest and sha256(view[data_at:data_at + data_size]).digest() != digest:
        raise ChunkFormatError(f"chunk at offset {offset} ({data_size} bytes): digest does not match its data")
    return offset, buffer.slice(data_at, data_size), digest


def field_ends(message) -> list[int]:
    """The end offset of each top-level field of a protobuf message, from keys and lengths alone.

    The offsets split a message into its fields (a repeated field's entries,
    each with its key and length) without parsing any. A malformed message
    (field number 0 or past 2^29 - 1, a group or unknown wire type, a truncated varint or
    field) raises :class:`ChunkFormatError`, as :func:`decode_chunk` would.
    """
    view = _bytes_view(message, "message")
    ends, pos, end = [], 0, view.nbytes
    try:
        while pos < end:
            at = pos
            number, wire, pos = _read_tag(view, pos, end)
            pos = _skip_value(view, pos, end, at, number, wire)
            ends.append(pos)
    except _ParseFailure as failure:
        raise _parse_error(*failure.args_) from None
    return ends


# -- reassembly ----------------------------------------------------------------

class PayloadAssembler:
    """Reassembles a payload from its decoded chunks, in order, with one running SHA-256.

    ``declared_size`` over ``max_total_bytes`` is a :class:`ChunkLimitError`
    at construction, before anything is allocated. :meth:`add` checks, in this
    order: the chunk count against ``max_chunks``, the chunk's size against
    ``max_chunk_bytes``, its offset (a gap or an overlap, which covers a
    duplicate, is a :class:`ChunkFormatError`), its end against
    ``declared_size`` (a ``ChunkLimitError`` named ``payload size``) and its
    digest when sent (a ``ChunkFormatError`` naming the chunk's index). A
    chunk that fails changes nothing: the assembler can still take the right
    one.

    Copies: the payload is assembled in one buffer of ``declared_size``
    (allocated at the first chunk that does not cover the whole payload), each
    chunk copied into it once; that copy is the one a contiguous result needs,
    since the chunks arrive in separate messages. A single chunk covering the
    whole payload is returned as it is, without a copy. The content digest is
    updated as each chunk arrives, so :meth:`finish` reads no byte again;
    ``content_digest=False`` skips it (``finish`` then returns ``b""`` for it),
    for a stream already authenticated otherwise (TLS, an AEAD tag).
    """

    def __init__(self, declared_size, *, max_total_bytes, max_chunks, max_chunk_bytes, content_digest=True):
        self.declared_size = _size_arg(declared_size, "declared_size")
        self.max_total_bytes = _size_arg(max_total_bytes, "max_total_bytes")
        self.max_chunks = _size_arg(max_chunks, "max_chunks")
        self.max_chunk_bytes = _size_arg(max_chunk_bytes, "max_chunk_bytes")
        if self.declared_size > self.max_total_bytes:
            raise ChunkLimitError("declared size", self.max_total_bytes, self.declared_size)
        if self.declared_size > MAX_OFFSET:
            raise ChunkLimitError("declared size", MAX_OFFSET, self.declared_size)
        self.offset = 0
        self.chunks = 0
        self._running = sha256() if content_digest else None
        self._out: pa.Buffer | None = None
        self._whole: pa.Buffer | None = None
        self._result: tuple[pa.Buffer, bytes] | None = None

    def add(self, offset, buffer, digest=b"") -> None:
        """Take the next chunk: ``buffer`` at ``offset``, with its sent ``digest`` (``b""`` for none)."""
        if self._result is not None:
            raise ChunkFormatError("the payload is finished; no more chunks")
        offset = _size_arg(offset, "offset")
        view = _bytes_view(buffer, "buffer")
        sent = bytes(_bytes_view(digest, "digest"))
        index, size = self.chunks, view.nbytes
        if index + 1 > self.max_chunks:
            raise ChunkLimitError("chunk count", self.max_chunks, index + 1)
        if size > self.max_chunk_bytes:
            raise ChunkLimitError("chunk size", self.max_chunk_bytes, size)
        if offset < self.offset:
            raise ChunkFormatError(f"chunk {index} at offset {offset} overlaps the {self.offset} bytes "
                                   "already received")
        if offset > self.offset:
            raise ChunkFormatError(f"chunk {index} at offset {offset} leaves a gap after the {self.offset} "
                                   "bytes already received")
        if offset + size > self.declared_size:
            raise ChunkLimitError("payload size", self.declared_size, offset + size)
        if sent and len(sent) != DIGEST_SIZE:
            raise ChunkFormatError(f"chunk {index} digest is {len(sent)} bytes, expected a "
                                   f"{DIGEST_SIZE}-byte SHA-256")
        if sent and sha256(view).digest() != sent:
            raise ChunkFormatError(f"chunk {index} at offset {offset} ({size} bytes): digest does not "
                                   "match its data")
        if offset == 0 and size == self.declared_size and size:
            self._whole = _as_arrow(buffer)
        elif size:
            if self._out is None:
                self._out = pa.allocate_buffer(self.declared_size)
            memoryview(self._out).cast("B")[offset:offset + size] = view
        if self._running is not None:
            self._running.update(view)
        self.offset += size
        self.chunks += 1

    def finish(self) -> tuple[pa.Buffer, bytes]:
        """``(payload, sha256 of payload)`` once every declared byte has arrived."""
        if self._result is None:
            if self.offset != self.declared_size:
                raise ChunkFormatError(f"payload incomplete: {self.offset} of {self.declared_size} declared "
                                       f"bytes received in {self.chunks} chunks")
            payload = self._whole if self._whole is not None else self._out
            if payload is None:
                payload = pa.py_buffer(b"")
            self._result = (payload, self._running.digest() if self._running is not None else b"")
        return self._result

    def __repr__(self) -> str:
        return (f"PayloadAssembler(declared_size={self.declared_size}, received={self.offset}, "
                f"chunks={self.chunks})")
