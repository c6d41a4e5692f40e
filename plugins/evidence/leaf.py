"""The canonical bytes an evidence event commits to (its Merkle leaf).

A leaf holds everything about an event except raw field values: ids,
correlation, time, type, the config stamp in force, and for each field its
name, classification and a salted commitment to the value. Raw values and
their salts are stored beside the leaf, so a redaction or a retention prune
can delete them while the leaf, and so the chain and every proof, still
verify.

Encoding (version 1), all integers big-endian::

    b"PEL1"
    u64 sequence
    str event_id, tenant, correlation_id, request_id, trace_id, span_id, actor
    i64 time (ns since the Unix epoch, UTC)
    str event_type
    u64 config revision, bytes config digest
    str corrects_event_id
    u32 field count, then per field:
        str name, u8 classification, u8 value kind (1 string, 2 bytes), 32 bytes commitment

``str`` and ``bytes`` are a u32 length and the bytes (UTF-8 for ``str``).
Commitment = SHA-256(0x02 || salt || u32 len(name) || name || u8 kind || value),
with a 16-byte random salt per field; 0x02 keeps it apart from RFC 6962's
0x00 (leaf) and 0x01 (node) prefixes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from planes.kernel.errors import InvalidArgument

MAGIC = b"PEL1"
SALT_BYTES = 16
KIND_STRING = 1
KIND_BYTES = 2

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_FIELD_TAIL = struct.Struct(">BB32s")


@dataclass(frozen=True, slots=True)
class CommittedField:
    name: str
    classification: int
    kind: int
    commitment: bytes


@dataclass(frozen=True, slots=True)
class Leaf:
    """The decoded content of a leaf."""

    sequence: int
    event_id: str
    tenant: str
    correlation_id: str
    request_id: str
    trace_id: str
    span_id: str
    actor: str
    time_ns: int
    event_type: str
    config_revision: int
    config_digest: bytes
    corrects_event_id: str
    fields: tuple[CommittedField, ...]

    def field(self, name: str) -> CommittedField | None:
        return next((f for f in self.fields if f.name == name), None)


def commitment(salt: bytes, name: str, kind: int, value: bytes) -> bytes:
    encoded = name.encode()
    return hashlib.sha256(b"\x02" + salt + _U32.pack(len(encoded)) + encoded + bytes((kind,)) + value).digest()


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def _str(value: str) -> bytes:
    encoded = value.encode()
    return _U32.pack(len(encoded)) + encoded


def encode_header(sequence: int, event_id: str, tenant: str, correlation_id: str, request_id: str,
                  trace_id: str, span_id: str, actor: str, time_ns: int, event_type: str, config_revision: int,
                  config_digest: bytes, corrects_event_id: str, field_count: int) -> bytes:
    """Everything before the fields. With :func:`encode_field`, the one encoder:
    the log's append path calls them directly, :func:`encode` through a Leaf."""
    return b"".join((
        MAGIC, _U64.pack(sequence),
        _str(event_id), _str(tenant), _str(correlation_id), _str(request_id), _str(trace_id), _str(span_id),
        _str(actor), _I64.pack(time_ns), _str(event_type),
        _U64.pack(config_revision), _U32.pack(len(config_digest)), config_digest,
        _str(corrects_event_id), _U32.pack(field_count),
    ))


def encode_field(name: str, classification: int, kind: int, committed: bytes) -> bytes:
    if len(committed) != 32:
        raise InvalidArgument(f"field {name!r}: commitment must be 32 bytes, got {len(committed)}")
    return _str(name) + _FIELD_TAIL.pack(classification, kind, committed)


def encode(leaf: Leaf) -> bytes:
    header = encode_header(leaf.sequence, leaf.event_id, leaf.tenant, leaf.correlation_id, leaf.request_id,
                           leaf.trace_id, leaf.span_id, leaf.actor, leaf.time_ns, leaf.event_type,
                           leaf.config_revision, leaf.config_digest, leaf.corrects_event_id, len(leaf.fields))
    return header + b"".join(encode_field(f.name, f.classification, f.kind, f.commitment) for f in leaf.fields)


class _Reader:
    __slots__ = ("data", "at")

    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        end = self.at + size
        if size < 0 or end > len(self.data):
            raise ValueError(f"leaf truncated at byte {self.at} (needs {size} more)")
        chunk = self.data[self.at:end]
        self.at = end
        return chunk

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def bytes_(self) -> bytes:
        return bytes(self.take(self.u32()))

    def str_(self) -> str:
        return self.bytes_().decode()


def decode(data: bytes) -> Leaf:
    """Parse a leaf; ValueError naming the problem when it is not one."""
    reader = _Reader(bytes(data))
    if reader.take(4) != MAGIC:
        raise ValueError("not an evidence leaf (bad magic)")
    try:
        sequence = reader.u64()
        ids = [reader.str_() for _ in range(7)]
        time_ns = _I64.unpack(reader.take(8))[0]
        event_type = reader.str_()
        revision = reader.u64()
        digest = reader.bytes_()
        corrects = reader.str_()
        count = reader.u32()
        if count > 10_000:
            raise ValueError(f"leaf claims {count} fields")
        fields = []
        for _ in range(count):
            name = reader.str_()
            classification, kind, committed = _FIELD_TAIL.unpack(reader.take(_FIELD_TAIL.size))
            fields.append(CommittedField(name, classification, kind, committed))
    except UnicodeDecodeError:
        raise ValueError("leaf holds text that is not UTF-8") from None
    if reader.at != len(reader.data):
        raise ValueError(f"leaf has {len(reader.data) - reader.at} trailing bytes")
    return Leaf(sequence, *ids, time_ns, event_type, revision, digest, corrects, tuple(fields))
