"""Evidence batches from wire bytes to leaves: the pure-Python twin of ``eventbatch.pyx``.

Same API, results and errors as the compiled module; ``PLANES_NO_EXTENSIONS=1``
selects it (see :mod:`planes.native`).

:func:`encode_events` takes a serialized ``AppendEventsRequest`` (or
``AppendEventStreamRequest``: field 2 is ``repeated Event`` in both; every
other top-level field is skipped) and, in one pass per event, validates it,
commits each field value with a salted SHA-256 and writes the event's
canonical leaf (the format of ``planes.plugins.evidence.leaf``, version 1).
It hashes each leaf (RFC 6962) and writes what the store keeps beside the leaves: the raw values
(salt and value per field, one blob, :func:`decode_values` reads it), a
64-bit FNV-1a hash of each event id (the store's in-memory replay index)
and, for its query index, each correlation id with the sequences of its
events (:func:`correlations`). The caller chains the leaf hashes (``chain.chain``) and stores
them; nothing here touches storage.

Errors, so the log can map them without parsing messages:

- :class:`BatchFormatError` (``.offset``): the bytes are not protobuf (a
  truncated varint or field, a length past the end, a zero field number, a
  string that is not UTF-8).
- :class:`BatchLimitError` (``.limit_name``, ``.limit``, ``.actual``): too
  many events, too many fields in an event, a value too large. Counted
  before anything is allocated for them.
- :class:`BatchRuleError` (``.index``, ``.denied``): an event breaks a rule
  of the log (``denied`` is true for a tenant that is not the request's).
- :class:`NotCanonical`: valid protobuf that this fast path does not take
  (a singular message field sent twice, which protobuf merges; a known field
  with another wire type; groups). The caller parses such a batch with the
  protobuf library instead: the outcome is the same, only slower.

Messages name the event index and the field name, never a value.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from array import array
from hashlib import sha256

from planes.native import chain_py

__all__ = [
    "BatchFormatError",
    "ValuesFormatError",
    "BatchLimitError",
    "BatchRuleError",
    "EncodedBatch",
    "IdIndex",
    "NotCanonical",
    "correlations",
    "decode_values",
    "encode_events",
    "id_hash",
    "pack_values",
]

MAGIC = b"PEL1"
SALT_BYTES = 16
KIND_STRING = 1
KIND_BYTES = 2
COMMITMENT_PREFIX = b"\x02"
MAX_I64 = 2**63 - 1
MAX_FIELD_NUMBER = 2**29 - 1
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class BatchFormatError(ValueError):
    """The batch bytes are not a well-formed protobuf message."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"malformed evidence batch at byte {offset}: {message}")
        self.offset = offset


class BatchLimitError(ValueError):
    """A size limit was exceeded; ``limit`` and ``actual`` carry the numbers."""

    def __init__(self, limit_name: str, limit: int, actual: int, message: str):
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.actual = actual


class BatchRuleError(ValueError):
    """Event ``index`` breaks a rule of the log."""

    def __init__(self, index: int, message: str, *, denied: bool = False):
        super().__init__(message)
        self.index = index
        self.denied = denied


class NotCanonical(Exception):
    """Valid protobuf the fast path leaves to the protobuf library."""


class ValuesFormatError(ValueError):
    """A raw-values blob does not parse."""


class EncodedBatch:
    """The output of :func:`encode_events`: n events with sequences ``first_sequence`` onwards.

    ``leaves`` holds the n leaves back to back, ``offsets`` (array of uint64,
    n + 1) where each starts and ends. ``values`` is the blob of raw values
    (:func:`pack_values`), ``id_hashes`` n little-endian uint64
    (:func:`id_hash` of each event id), ``correlations`` a list of
    ``(correlation_id, first_sequence, last_sequence, runs)`` for each
    correlation id in order of first appearance (:func:`correlations`), and ``min_time`` /
    ``max_time`` bound the events' times (0 for an empty batch).
    ``leaf_hashes`` holds the n RFC 6962 leaf hashes (``None`` when the
    batch was put together elsewhere and they are still to compute), and
    ``heads`` the n chain heads when :func:`encode_events` was given the head
    before the batch (else ``None``).
    """

    __slots__ = ("first_sequence", "leaves", "offsets", "values", "id_hashes", "correlations", "min_time", "max_time",
                 "leaf_hashes", "heads")

    def __init__(self, first_sequence: int, leaves: bytes, offsets: array, values: bytes, id_hashes: bytes,
                 correlations: list, min_time: int, max_time: int, leaf_hashes: bytes | None = None,
                 heads: bytes | None = None):
        self.leaf_hashes = leaf_hashes
        self.heads = heads
        self.first_sequence = first_sequence
        self.leaves = leaves
        self.offsets = offsets
        self.values = values
        self.id_hashes = id_hashes
        self.correlations = correlations
        self.min_time = min_time
        self.max_time = max_time

    def __len__(self) -> int:
        return len(self.offsets) - 1


_FNV_OFFSET = 0xCBF29CE484222325
#: The largest sequence number: the store keeps them in SQLite's signed 64-bit integers.
MAX_SEQUENCE = 2**63 - 1
_FNV_PRIME = 0x100000001B3
_MASK64 = 2**64 - 1


def correlations(runs) -> list[tuple[str, int, int, bytes | None]]:
    """Runs of consecutive events ``(correlation_id, first_sequence, last_sequence)``, grouped by
    correlation id in order of first appearance: ``(correlation_id, first, last, runs)``.

    ``runs`` is None when the correlation's events are one run, else its runs
    as little-endian uint64 pairs (offset from ``first``, length): the
    query index keeps one row per correlation id per segment, because
    concurrent requests' events interleave.
    """
    grouped: dict[str, list] = {}
    for run in runs:
        spans = grouped.get(run[0])
        if spans is None:
            grouped[run[0]] = [run]
        else:
            spans.append(run)
    found = []
    for correlation, spans in grouped.items():
        first = spans[0][1]
        packed = None
        if len(spans) > 1:
            pairs = array("Q")
            for _, start, end in spans:
                pairs.append(start - first)
                pairs.append(end - start + 1)
            packed = _little(pairs)
        found.append((correlation, first, spans[-1][2], packed))
    return found


def id_hash(event_id: bytes) -> int:
    """64-bit FNV-1a of the UTF-8 event id: a fast, non-cryptographic replay-index key
    (a match is always confirmed against the stored leaf)."""
    value = _FNV_OFFSET
    for byte in event_id:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK64
    return value


_VALUE_HEAD = struct.Struct(">QI")


def pack_values(values) -> bytes:
    """The blob of ``(sequence, name, salt, value)`` records: u64 sequence, then name, salt and
    value each as a u32 length and the bytes (big-endian)."""
    parts = []
    for sequence, name, salt, value in values:
        encoded = name.encode()
        parts.append(b"".join((_VALUE_HEAD.pack(sequence, len(encoded)), encoded, _U32.pack(len(salt)), salt,
                               _U32.pack(len(value)), value)))
    return b"".join(parts)


def decode_values(blob) -> list[tuple[int, str, bytes, bytes]]:
    """The records of a :func:`pack_values` blob; :class:`ValuesFormatError` naming the byte."""
    data = bytes(blob)
    at, end, found = 0, len(data), []
    try:
        while at < end:
            start = at
            if end - at < 12:
                raise ValuesFormatError(f"values record at byte {start} is truncated")
            sequence, size = _VALUE_HEAD.unpack_from(data, at)
            at += 12
            parts = []
            for part in range(3):
                if part:
                    if end - at < 4:
                        raise ValuesFormatError(f"values record at byte {start} is truncated")
                    size = _U32.unpack_from(data, at)[0]
                    at += 4
                if size > end - at:
                    raise ValuesFormatError(f"values record at byte {start} claims {size} bytes, "
                                            f"{end - at} remain")
                parts.append(data[at:at + size])
                at += size
            found.append((sequence, parts[0].decode(), parts[1], parts[2]))
    except UnicodeDecodeError:
        raise ValuesFormatError(f"values record at byte {start} has a name that is not UTF-8") from None
    return found


# -- wire reading ---------------------------------------------------------------

def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise BatchFormatError("truncated varint", start)
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise BatchFormatError("varint longer than 64 bits", start)
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BatchFormatError("varint longer than 64 bits", start)


def _fields(data: bytes, pos: int, end: int):
    """(number, wire type, value or (start, stop), position of the tag) for each field in data[pos:end]."""
    while pos < end:
        at = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD_NUMBER:
            raise BatchFormatError(f"field number {number} is outside 1..{MAX_FIELD_NUMBER}", at)
        if wire == VARINT:
            value, pos = _varint(data, pos, end)
            yield number, wire, value, at
        elif wire == LENGTH:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise BatchFormatError(f"field {number} claims {length} bytes, {end - pos} remain", at)
            yield number, wire, (pos, pos + length), at
            pos += length
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if size > end - pos:
                raise BatchFormatError(f"field {number} needs {size} bytes, {end - pos} remain", at)
            yield number, wire, None, at
            pos += size
        elif wire in (START_GROUP, END_GROUP):
            raise NotCanonical(f"group (wire type {wire}) at byte {at}")
        else:
            raise BatchFormatError(f"field {number} has wire type {wire}, which does not exist", at)


def _expect(wire: int, want: int, number: int, at: int) -> None:
    if wire != want:
        raise NotCanonical(f"field {number} at byte {at} has wire type {wire}, expected {want}")


def _text(data: bytes, span: tuple[int, int]) -> bytes:
    raw = data[span[0]:span[1]]
    try:
        raw.decode()
    except UnicodeDecodeError:
        raise BatchFormatError("a string field is not valid UTF-8", span[0]) from None
    return raw


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _chars(raw: bytes) -> int:
    """Code points in valid UTF-8 (every byte that is not a continuation byte)."""
    return sum(1 for b in raw if b & 0xC0 != 0x80)


# -- one event --------------------------------------------------------------------

class _Field:
    __slots__ = ("name", "kind", "value", "classification", "commitment", "salt")

    def __init__(self) -> None:
        self.name = b""
        self.kind = 0  # 0: no value (withheld at the source)
        self.value = b""
        self.classification = 0
        self.commitment = b""
        self.salt = b""


class _Event:
    __slots__ = ("event_id", "correlation", "sequence", "time", "event_type", "revision", "digest", "fields",
                 "corrects")

    def __init__(self) -> None:
        self.event_id = b""
        self.correlation = [b""] * 6  # correlation_id, request_id, trace_id, span_id, tenant, actor
        self.sequence = 0
        self.time = None
        self.event_type = b""
        self.revision = 0
        self.digest = b""
        self.fields: list[_Field] = []
        self.corrects = b""


def _parse_digest(data: bytes, start: int, end: int) -> bytes:
    value = b""
    for number, wire, got, at in _fields(data, start, end):
        if number == 2:
            _expect(wire, LENGTH, number, at)
            value = data[got[0]:got[1]]
        elif number == 1:
            _expect(wire, VARINT, number, at)
    return value


def _parse_field(data: bytes, start: int, end: int, index: int, max_value_bytes: int) -> _Field:
    field = _Field()
    seen_commitment = False
    for number, wire, got, at in _fields(data, start, end):
        if number == 1:
            _expect(wire, LENGTH, number, at)
            field.name = _text(data, got)
        elif number in (2, 3):
            _expect(wire, LENGTH, number, at)
            size = got[1] - got[0]
            if size > max_value_bytes:
                name = field.name.decode() if field.name else "?"
                raise BatchLimitError("field_value_bytes", max_value_bytes, size,
                                      f"event {index}: field {name!r} holds {size} bytes > {max_value_bytes}")
            field.kind = KIND_STRING if number == 2 else KIND_BYTES
            field.value = _text(data, got) if number == 2 else data[got[0]:got[1]]
        elif number == 4:
            _expect(wire, VARINT, number, at)
            field.classification = _signed(got, 32)
        elif number == 5:
            _expect(wire, LENGTH, number, at)
            if seen_commitment:
                raise NotCanonical(f"field 5 sent twice at byte {at}")
            seen_commitment = True
            field.commitment = _parse_digest(data, got[0], got[1])
        elif number == 6:
            _expect(wire, LENGTH, number, at)
            field.salt = data[got[0]:got[1]]
        elif number == 7:
            _expect(wire, VARINT, number, at)
    return field


def _parse_event(data: bytes, start: int, end: int, index: int, limits: tuple[int, int, int]) -> _Event:
    _, max_fields, max_value_bytes = limits
    event = _Event()
    seen: set[int] = set()
    for number, wire, got, at in _fields(data, start, end):
        if number == 3:
            _expect(wire, VARINT, number, at)
            event.sequence = got
            continue
        if number not in (1, 2, 4, 5, 6, 7, 8):
            continue
        _expect(wire, LENGTH, number, at)
        if number in (2, 4, 6):
            if number in seen:
                raise NotCanonical(f"message field {number} sent twice at byte {at}")
            seen.add(number)
        if number == 1:
            event.event_id = _text(data, got)
        elif number == 5:
            event.event_type = _text(data, got)
        elif number == 8:
            event.corrects = _text(data, got)
        elif number == 2:
            correlation = event.correlation
            for inner, inner_wire, span, inner_at in _fields(data, got[0], got[1]):
                if 1 <= inner <= 6:
                    _expect(inner_wire, LENGTH, inner, inner_at)
                    correlation[inner - 1] = _text(data, span)
        elif number == 4:
            seconds = nanos = 0
            for inner, inner_wire, value, inner_at in _fields(data, got[0], got[1]):
                if inner in (1, 2):
                    _expect(inner_wire, VARINT, inner, inner_at)
                    if inner == 1:
                        seconds = _signed(value, 64)
                    else:
                        nanos = _signed(value, 32)
            event.time = seconds * 1_000_000_000 + nanos
        elif number == 6:
            for inner, inner_wire, value, inner_at in _fields(data, got[0], got[1]):
                if inner == 1:
                    _expect(inner_wire, VARINT, inner, inner_at)
                    event.revision = value
                elif inner == 2:
                    _expect(inner_wire, LENGTH, inner, inner_at)
                    event.digest = data[value[0]:value[1]]
        else:  # 7: a field
            if len(event.fields) >= max_fields:
                count = len(event.fields) + sum(1 for n, *_ in _fields(data, at, end) if n == 7)
                raise BatchLimitError("fields_per_event", max_fields, count,
                                      f"event {index}: {count} fields > {max_fields}")
            event.fields.append(_parse_field(data, got[0], got[1], index, max_value_bytes))
    return event


def _str(raw: bytes) -> bytes:
    return _U32.pack(len(raw)) + raw


def _encode(event: _Event, index: int, sequence: int, tenant: bytes, actor: bytes, now_ns: int, max_id_chars: int,
            take_salt, values: list) -> tuple[bytes, tuple]:
    """Check ``event`` against the log's rules (in the log's order), commit its fields, encode its leaf."""
    event_type = event.event_type
    if (len(event_type) > max_id_chars or not event_type.isascii()
            or not EVENT_TYPE.fullmatch(event_type.decode())):
        raise BatchRuleError(index, f"event {index}: event_type must be a dotted lower-case name such as "
                                    f"'tool.invoked', got {event_type.decode()[:40]!r}")
    if not event.event_id:
        raise BatchRuleError(index, f"event {index}: event_id is required (it makes a replayed append harmless)")
    if _chars(event.event_id) > max_id_chars:
        raise BatchRuleError(index, f"event {index}: event_id longer than {max_id_chars} characters")
    if event.sequence:
        raise BatchRuleError(index, f"event {index}: sequence is assigned by the log; leave it 0")
    claimed = event.correlation[4]
    if claimed and claimed != tenant:
        raise BatchRuleError(index, f"event {index}: correlation tenant {claimed.decode()!r} is not "
                                    f"the request's tenant {tenant.decode()!r}", denied=True)
    time_ns = now_ns if event.time is None else event.time
    if not -MAX_I64 - 1 <= time_ns <= MAX_I64:
        raise BatchRuleError(index, f"event {index}: time is out of range")
    parts = []
    names: set[bytes] = set()
    for field in event.fields:
        name = field.name
        if not name or _chars(name) > max_id_chars:
            raise BatchRuleError(index, f"event {index}: field names must be 1 to {max_id_chars} characters")
        if name in names:
            raise BatchRuleError(index, f"event {index}: field {name.decode()!r} appears twice")
        names.add(name)
        if not 0 <= field.classification <= 255:
            raise BatchRuleError(index, f"event {index}: field {name.decode()!r}: classification "
                                        f"{field.classification} is out of range")
        if field.kind == 0:
            if len(field.commitment) != 32:
                raise BatchRuleError(index, f"event {index}: field {name.decode()!r} has neither a value nor a "
                                            "32-byte commitment")
            parts.append(_str(name) + bytes((field.classification, KIND_BYTES)) + field.commitment)
            continue
        salt = field.salt or take_salt()
        digest = sha256(COMMITMENT_PREFIX + salt + _str(name) + bytes((field.kind,)) + field.value).digest()
        if field.commitment and field.commitment != digest:
            raise BatchRuleError(index, f"event {index}: field {name.decode()!r}: the commitment sent does not "
                                        "match its value and salt")
        parts.append(_str(name) + bytes((field.classification, field.kind)) + digest)
        values.append((sequence, name.decode(), salt, field.value))
    correlation = event.correlation
    leaf = b"".join((
        MAGIC, _U64.pack(sequence), _str(event.event_id), _str(tenant), _str(correlation[0]),
        _str(correlation[1]), _str(correlation[2]), _str(correlation[3]), _str(correlation[5] or actor),
        _I64.pack(time_ns), _str(event_type), _U64.pack(event.revision), _str(event.digest), _str(event.corrects),
        _U32.pack(len(parts)), *parts,
    ))
    return leaf, (event.event_id, correlation[0], time_ns)


class _Salts:
    """Salts drawn from ``source`` (``os.urandom``-like), 256 at a time."""

    __slots__ = ("_source", "_data", "_at")

    def __init__(self, source) -> None:
        self._source = source or os.urandom
        self._data = b""
        self._at = 0

    def take(self) -> bytes:
        if self._at >= len(self._data):
            self._data = bytes(self._source(SALT_BYTES * 256))
            if len(self._data) != SALT_BYTES * 256:
                raise ValueError("the salt source returned the wrong number of bytes")
            self._at = 0
        at = self._at
        self._at = at + SALT_BYTES
        return self._data[at:self._at]


def _limit_arg(value, name: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    return number


def _threads_arg(value) -> int:
    """``threads=``: None for the default (two for a batch of 256 events or more), else at least 1."""
    if value is None:
        return 2
    number = int(value)
    if number < 1:
        raise ValueError(f"threads must be at least 1, got {number}")
    return number


def encode_events(data, tenant: str, actor: str, first_sequence: int, now_ns: int, *, max_events: int,
                  max_fields: int, max_value_bytes: int, max_id_chars: int, salts=None,
                  threads=None, previous_head=None) -> EncodedBatch:
    """Validate, commit and encode the events of a serialized append request (see the module docstring).

    Event i gets sequence ``first_sequence + i``; an event without a time gets
    ``now_ns``; one without an actor gets ``actor``. ``salts`` (for tests) is
    an ``os.urandom``-like callable; salts sent with a field are used as is.
    ``threads`` caps the threads the compiled module encodes with (accepted
    and checked here, for parity). Given ``previous_head`` (the chain head
    before the batch), the batch's chain heads come back too, as
    :func:`planes.native.chain_py.chain` computes them; the compiled module
    runs the chain on one thread while the other encodes.
    """
    try:
        data = bytes(memoryview(data).cast("B"))
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}") from None
    if first_sequence < 1:
        raise ValueError(f"first_sequence must be at least 1, got {first_sequence}")
    max_events = _limit_arg(max_events, "max_events")
    limits = (max_events, _limit_arg(max_fields, "max_fields"), _limit_arg(max_value_bytes, "max_value_bytes"))
    max_id_chars = _limit_arg(max_id_chars, "max_id_chars")
    _threads_arg(threads)
    if previous_head is not None:
        previous_head = _head_arg(previous_head)
    tenant_raw, actor_raw = tenant.encode(), actor.encode()
    spans = []
    for number, wire, got, at in _fields(data, 0, len(data)):
        if number == 2:
            _expect(wire, LENGTH, number, at)
            spans.append(got)
        elif number == 1:
            _expect(wire, LENGTH, number, at)
    if len(spans) > max_events:
        raise BatchLimitError("events_per_batch", max_events, len(spans),
                              f"{len(spans)} events > events_per_batch {max_events}")
    if spans and first_sequence + len(spans) - 1 > MAX_SEQUENCE:
        raise ValueError(f"sequences {first_sequence} to {first_sequence + len(spans) - 1} run past "
                         f"{MAX_SEQUENCE}, the largest a log holds")
    pool = _Salts(salts)
    leaves = []
    offsets = array("Q", [0])
    values: list = []
    hashes = array("Q")
    leaf_hashes = []
    runs: list = []
    times = []
    total = 0
    for index, (start, end) in enumerate(spans):
        event = _parse_event(data, start, end, index, limits)
        sequence = first_sequence + index
        leaf, (event_id, correlation_id, time_ns) = _encode(event, index, sequence, tenant_raw, actor_raw, now_ns,
                                                            max_id_chars, pool.take, values)
        leaves.append(leaf)
        leaf_hashes.append(sha256(b"\x00" + leaf).digest())
        total += len(leaf)
        offsets.append(total)
        hashes.append(id_hash(event_id))
        times.append(time_ns)
        if runs and runs[-1][0] == correlation_id:
            runs[-1][2] = sequence
        else:
            runs.append([correlation_id, sequence, sequence])
    joined = b"".join(leaf_hashes)
    return EncodedBatch(first_sequence, b"".join(leaves), offsets, pack_values(values), _little(hashes),
                        correlations([(c.decode(), a, b) for c, a, b in runs]), min(times, default=0),
                        max(times, default=0),
                        joined, None if previous_head is None else chain_py.chain(previous_head, joined))


def _head_arg(value) -> bytes:
    try:
        head = bytes(memoryview(value).cast("B"))
    except TypeError:
        raise TypeError(f"previous_head must be a bytes-like object, not {type(value).__name__}") from None
    if len(head) != 32:
        raise ValueError(f"previous_head must be a 32-byte SHA-256 hash, got {len(head)} bytes")
    return head


def _little(values: array) -> bytes:
    if sys.byteorder != "little":
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


class IdIndex:
    """The replay index: 64-bit event-id hash -> the first sequence stored with it.

    The compiled twin keeps it in an open-addressing table (16 bytes a slot,
    at most half full); here a dict. A hit is a candidate, never a verdict:
    the store confirms it against the stored leaf. ``scope`` (a 64-bit value,
    the store's hash of the tenant) is XORed into every key of a call, so
    that one tenant's ids never meet another's: event ids are per tenant.
    """

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._map)

    def add(self, id_hashes, first_sequence: int, scope: int = 0) -> None:
        """Record n little-endian uint64 hashes for sequences ``first_sequence`` onwards
        (a hash already present keeps its sequence)."""
        keys = [key ^ scope for key in _keys(id_hashes)]
        if first_sequence < 1:
            raise ValueError(f"first_sequence must be at least 1, got {first_sequence}")
        found = self._map
        for sequence, key in enumerate(keys, first_sequence):
            found.setdefault(key, sequence)

    def get(self, key: int) -> int | None:
        return self._map.get(key)

    def unknown(self, id_hashes, scope: int = 0) -> bool:
        """True when no hash of the batch is in the index and none repeats within it."""
        keys = [key ^ scope for key in _keys(id_hashes)]
        return self._map.keys().isdisjoint(keys) and len(set(keys)) == len(keys)


def _keys(id_hashes) -> list[int]:
    try:
        raw = memoryview(id_hashes).cast("B")
    except TypeError:
        raise TypeError(f"id_hashes must be a bytes-like object, not {type(id_hashes).__name__}") from None
    if raw.nbytes % 8:
        raise ValueError(f"id_hashes must be a multiple of 8 bytes, got {raw.nbytes}")
    keys = array("Q")
    keys.frombytes(raw)
    if sys.byteorder != "little":
        keys.byteswap()
    return keys.tolist()
