"""Durable storage of the evidence log: an append-only segment file indexed by SQLite (WAL).

Format 2. Every appended batch is one *segment*: the batch's leaves back to
back, their offsets, leaf hashes, chain heads and event-id hashes, appended
to ``<store>.segments`` with one write and made durable with ``fdatasync``
(on a helper thread, while the index rows are inserted); then one SQLite
transaction (``synchronous=FULL``) that records where it is commits, and
the batch is acknowledged after that commit. So an acknowledged batch
survives a process kill or a power cut, and a crash between the two leaves
only unreferenced bytes at the end of the file, which the next writer cuts
off. Segments of ``DIRECT_MIN`` bytes or more are written around the page
cache (``O_DIRECT``): they start on a page boundary and are zero-padded to
whole pages, so the file may hold a few unreferenced bytes between
segments; readers go by each segment's recorded offset. One sequential write per batch instead of a row, an index entry and a
unique-key probe per event (format 1 did that: about 24 us an event; SQLite
blobs in WAL mode cost 2 us an event, the file 0.6 us). In SQLite, beside
each segment's row:

- The batch's raw field values and salts are the segment's last part (one
  blob, :func:`planes.native.eventbatch_py.pack_values`). Redaction and
  retention record the removal in ``removed_values`` first, then overwrite
  the salt and value bytes in the file with zeros (a removal cut short by a
  crash is finished by the next writer); the leaves, and so every hash and
  proof, never change.
- ``correlation_runs``: the query index, one row per correlation id per
  segment (tenant, correlation id, its first and last sequence there, and,
  when its events are not all consecutive, ``runs``: the runs as pairs of
  offset from the first sequence and length, little-endian uint64). Events of
  concurrent requests interleave in a batch, so a row per run of consecutive
  events would make most events a row of their own. A segment is one
  tenant's batch and carries its time range.
- Replays are found through an in-memory index of event-id hashes (64-bit
  FNV-1a) to sequences (``eventbatch.IdIndex``: 16-32 bytes an event in the
  compiled module), built from the segments at open and confirmed against
  the stored leaf. Event ids are per tenant: the index keys each hash with
  its tenant's (:func:`id_scope`), so one tenant's ids never meet another's;
  the rare distinct ids whose hashes still collide (and, in logs written
  before the keys had their tenant, ids another tenant stored first) are
  kept in ``event_id_collisions``.

A log in format 1 (one ``events`` row per event) is migrated to segments in
one transaction when opened (the file is written first, as for an append).
Leaves are the source of truth: fsck recomputes everything else from them.
"""

from __future__ import annotations

import bisect
import errno
import functools
import mmap
import os
import sqlite3
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path

from planes.kernel.errors import FailedPrecondition, LimitExceeded, PlanesError
from planes.kernel.files import DIRECT_ALIGN, align_up, open_direct
from planes.kernel.runtime import ProcessLocalWorker
from planes.native import eventbatch_py, load

from . import leaf as leaves
from . import recovery

eventbatch = load("eventbatch")

FORMAT = b"2"

CORRELATION_INSERT = ("INSERT INTO correlation_runs (tenant, correlation_id, first_sequence, last_sequence, runs) "
                      "VALUES (?, ?, ?, ?, ?)")

SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    first_sequence INTEGER PRIMARY KEY,
    count          INTEGER NOT NULL,
    tenant         TEXT NOT NULL,
    min_time       INTEGER NOT NULL,
    max_time       INTEGER NOT NULL,
    file_offset    INTEGER NOT NULL,
    leaves_length  INTEGER NOT NULL,
    values_length  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_tenant ON segments (tenant, first_sequence);
CREATE TABLE IF NOT EXISTS removed_values (
    sequence INTEGER NOT NULL,
    name     TEXT NOT NULL,
    PRIMARY KEY (sequence, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS correlation_runs (
    tenant         TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    first_sequence INTEGER NOT NULL,
    last_sequence  INTEGER NOT NULL,
    runs           BLOB,
    PRIMARY KEY (tenant, correlation_id, first_sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_id_collisions (
    event_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (event_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size  INTEGER PRIMARY KEY,
    body       BLOB NOT NULL,
    signature  BLOB NOT NULL,
    key_id     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

#: Segments at least this large are written around the page cache (``O_DIRECT``): copied into a page-aligned
#: stage, zero-padded to whole pages and written at a page-aligned offset. Copying a 4.7 MB segment into the page
#: cache took ~3 ms of CPU a batch (a tenth of an append's, bench/RESULTS.md); smaller segments (unary appends)
#: would waste most of a page each, so they go through the page cache as before.
DIRECT_MIN = 256 << 10
#: Larger segments go through the page cache too, rather than hold a stage that size.
DIRECT_MAX = 32 << 20

#: SQLite's largest integer: no sequence, tree size or stored time is past it.
MAX_INTEGER = 2**63 - 1

SEGMENT_COLUMNS = "first_sequence, count, tenant, min_time, max_time, file_offset, leaves_length, values_length"
CACHED_SEGMENTS = 8


def part_sizes(count: int, leaves_length: int, values_length: int) -> tuple[int, ...]:
    """A segment in the file: leaves, n + 1 offsets, n leaf hashes, n chain heads, n id hashes, raw values."""
    return leaves_length, (count + 1) * 8, count * 32, count * 32, count * 8, values_length


def record_length(count: int, leaves_length: int, values_length: int) -> int:
    return sum(part_sizes(count, leaves_length, values_length))


def value_spans(blob: bytes):
    """(sequence, name, salt range, value range) of each record of a values blob: the bytes a
    removal zeroes (the lengths stay, so the blob still parses)."""
    at, end = 0, len(blob)
    while at + 12 <= end:
        sequence = int.from_bytes(blob[at:at + 8], "big")
        size = int.from_bytes(blob[at + 8:at + 12], "big")
        name = blob[at + 12:at + 12 + size].decode(errors="replace")
        at += 12 + size
        salt_size = int.from_bytes(blob[at:at + 4], "big")
        salt = (at + 4, at + 4 + salt_size)
        value_size = int.from_bytes(blob[salt[1]:salt[1] + 4], "big")
        value = (salt[1] + 4, salt[1] + 4 + value_size)
        if value[1] > end:
            return
        yield sequence, name, salt, value
        at = value[1]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    sequence: int
    event_id: str
    tenant: str
    correlation_id: str
    event_type: str
    time_ns: int
    leaf: bytes
    leaf_hash: bytes
    chain_head: bytes


@dataclass(frozen=True, slots=True)
class StoredValue:
    sequence: int
    name: str
    salt: bytes
    value: bytes


def u64_array(blob: bytes) -> array:
    """Little-endian uint64 values (offsets, id hashes) as an array('Q')."""
    values = array("Q")
    values.frombytes(blob)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def u64_bytes(values: array) -> bytes:
    if sys.byteorder != "little":
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def correlation_sequences(first: int, last: int, runs: bytes | None) -> Iterator[int]:
    """The sequences a ``correlation_runs`` row covers (every one from first to last when ``runs`` is None)."""
    if runs is None:
        yield from range(first, last + 1)
        return
    pairs = u64_array(runs)
    for at in range(0, len(pairs) - 1, 2):
        yield from range(first + pairs[at], first + pairs[at] + pairs[at + 1])


@functools.lru_cache(maxsize=4096)
def id_scope(tenant: str) -> int:
    """What the id index XORs into a tenant's event-id hashes (64-bit FNV-1a of the tenant)."""
    return eventbatch_py.id_hash(b"tenant\x00" + tenant.encode())


def leaf_event_id(leaf: bytes) -> str:
    """The event id of an encoded leaf, without decoding the rest (magic, u64 sequence, then the id)."""
    size = int.from_bytes(leaf[12:16], "big")
    return leaf[16:16 + size].decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Segment:
    """One stored batch: consecutive events of one tenant."""

    first_sequence: int
    count: int
    tenant: str
    min_time: int
    max_time: int
    leaves: bytes
    offsets: bytes
    leaf_hashes: bytes
    chain_heads: bytes
    id_hashes: bytes
    values: bytes

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + self.count - 1

    def leaf(self, sequence: int, offsets: array | None = None) -> bytes:
        at = sequence - self.first_sequence
        offsets = offsets if offsets is not None else u64_array(self.offsets)
        return self.leaves[offsets[at]:offsets[at + 1]]

    def event(self, sequence: int, offsets: array | None = None) -> StoredEvent:
        at = sequence - self.first_sequence
        raw = self.leaf(sequence, offsets)
        decoded = leaves.decode(raw)
        return StoredEvent(sequence, decoded.event_id, decoded.tenant, decoded.correlation_id, decoded.event_type,
                           decoded.time_ns, raw, self.leaf_hashes[at * 32:at * 32 + 32],
                           self.chain_heads[at * 32:at * 32 + 32])


class SqliteEvidenceStore:
    """The embedded store: ``<state>/evidence/log.sqlite3`` and ``log.sqlite3.segments`` beside it.

    ``writer=False`` opens for reading and checking (fsck beside a running
    host): the unreferenced tail a crash can leave is not cut off then.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL", writer: bool = True):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.segment_path = path.with_name(path.name + ".segments")
        self._synchronous = synchronous
        self._write: sqlite3.Connection | None = None
        self._fd = -1
        self._direct_fd: int | None = None
        self._stage: mmap.mmap | None = None
        self._local = threading.local()
        # Every thread's read connection, closed with the store: the last one closed folds the WAL back into
        # the index, so a stopped host leaves log.sqlite3 whole (no -wal file to lose beside it).
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._syncer = ProcessLocalWorker("evidence-segments")  # writes and syncs segments
        try:
            self._open(writer)
        except BaseException as exc:
            self._release()
            if isinstance(exc, sqlite3.Error):
                raise recovery.index_error(path, exc) from exc
            if isinstance(exc, OSError) and exc.filename is None:
                raise FailedPrecondition(f"evidence segment file {self.segment_path}: {exc}") from exc
            raise

    def _open(self, writer: bool) -> None:
        """Open the index and the segment file; a writer first checks they agree (:mod:`.recovery`)."""
        path = self.path
        if writer:
            recovery.refuse_a_missing_index(path, self.segment_path)  # before SQLite makes an empty one
        index_bytes = recovery.file_size(path)
        self._write = self._connect(self._synchronous)
        if writer:
            recovery.refuse_an_empty_index(self._write, path, self.segment_path, index_bytes or 0)
        self._write.executescript(SCHEMA)
        self._migrate_correlation_runs()  # a schema-only change, like the tables above: made by readers too
        if not writer and self._write.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone():
            raise PlanesError(f"{path} holds an evidence log in format 1 (a row per event): open it for writing "
                              "once (start the kernel) to migrate it to segments, then check it")
        row = self._write.execute("SELECT file_offset, count, leaves_length, values_length FROM segments "
                                  "ORDER BY first_sequence DESC LIMIT 1").fetchone()
        self._end = row[0] + record_length(*row[1:]) if row else 0
        if writer:
            recovery.refuse_a_short_segment_file(path, self.segment_path, self._end)
        if writer or self.segment_path.exists():
            self._fd = os.open(self.segment_path, (os.O_RDWR | os.O_CREAT) if writer else os.O_RDONLY, 0o600)
        else:  # a log nothing was ever appended to, checked read-only
            self._fd = os.open(os.devnull, os.O_RDONLY)
        self._direct_fd = open_direct(self.segment_path) if writer else None
        if writer:
            self._migrate_collisions()
            self._migrate_format_1()
            # Written, never committed, never acknowledged: a crash between the two steps (set aside, then cut).
            last = self._write.execute("SELECT coalesce(max(first_sequence + count), 1) FROM segments").fetchone()
            recovery.set_aside_tail(self._fd, path, self.segment_path, self._end, last[0])
            pending = self._write.execute("SELECT value FROM meta WHERE key = 'erasing'").fetchone()
            if pending is not None:
                self._erase(u64_array(pending[0]).tolist())
        self._ids = eventbatch.IdIndex()
        for first, count, offset, leaves_length, tenant in self._write.execute(
                "SELECT first_sequence, count, file_offset, leaves_length, tenant FROM segments "
                "ORDER BY first_sequence"):
            row = f"the segments row with first_sequence {first!r} (count {count!r}, file_offset {offset!r})"
            if not all(isinstance(n, int) for n in (first, count, offset, leaves_length)) or not isinstance(
                    tenant, str) or first < 1 or count < 1 or offset < 0 or leaves_length < 0:
                raise FailedPrecondition(f"evidence index {path} is damaged: {row} is impossible (sequences start "
                                         "at 1, counts at 1, offsets and lengths at 0): restore it from backup")
            start = offset + leaves_length + (count + 1) * 8 + count * 64
            try:
                self._ids.add(os.pread(self._fd, count * 8, start), first, id_scope(tenant))
            except (ValueError, OverflowError) as exc:
                raise FailedPrecondition(f"evidence index {path} is damaged: the event-id hashes of {row} cannot "
                                         f"be read from {self.segment_path} ({exc}): restore it from backup, or "
                                         "run `planes evidence fsck` to locate the damage") from None

    def _release(self) -> None:
        """Close whatever an open that failed had opened."""
        if self._write is not None:
            self._write.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stop_direct()
        self._syncer.shutdown()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={synchronous}")
        return connection

    @property
    def _read(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect(self._synchronous)
            connection.execute("PRAGMA query_only=ON")
            self._local.segments = OrderedDict()
            with self._readers_lock:
                self._readers.append(connection)
        return connection

    def close(self) -> None:
        """Release the files and the sync thread; closing again does nothing."""
        if self._fd < 0:
            return
        self._syncer.shutdown()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for connection in readers:
            connection.close()
        self._local = threading.local()
        self._write.close()
        os.close(self._fd)
        self._fd = -1
        self._stop_direct()
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    def _segment_at(self, length: int) -> int:
        """Where a segment of ``length`` bytes goes: the end of the file, rounded up to a page for a direct write."""
        if self._direct_fd is not None and DIRECT_MIN <= length <= DIRECT_MAX:
            return align_up(self._end)
        return self._end

    def _write_segment(self, parts: list[bytes], at: int) -> int:
        """Write a segment's bytes at ``at`` and make them durable; ``at``. Direct when :meth:`_segment_at`
        aligned it for that, through the page cache otherwise (and from then on if the filesystem refuses)."""
        expected = sum(len(part) for part in parts)
        if self._direct_fd is not None and at % DIRECT_ALIGN == 0 and DIRECT_MIN <= expected <= DIRECT_MAX:
            padded = align_up(expected)
            if self._stage is None or len(self._stage) < padded:
                if self._stage is not None:
                    self._stage.close()
                self._stage = mmap.mmap(-1, padded)
            stage = self._stage
            position = 0
            for part in parts:
                stage[position:position + len(part)] = part
                position += len(part)
            stage[position:padded] = bytes(padded - position)
            with memoryview(stage) as view:
                try:
                    written = os.pwrite(self._direct_fd, view[:padded], at)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._stop_direct()  # taken at open, refused now: the page cache from here on
                    written = None
            if written is not None:
                if written != padded:
                    raise OSError(f"short write to {self.segment_path.name}: {written} of {padded} bytes")
                os.fdatasync(self._fd)
                return at
        written = os.pwritev(self._fd, parts, at)
        if written != expected:
            raise OSError(f"short write to {self.segment_path.name}: {written} of {expected} bytes")
        os.fdatasync(self._fd)
        return at

    def _stop_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    # -- writes (one thread) ----------------------------------------------

    def ids_unknown(self, tenant: str, id_hashes: bytes) -> bool:
        """True when no event id of a batch (by hash) is stored by ``tenant`` or repeated in the batch:
        the fast path."""
        return self._ids.unknown(id_hashes, id_scope(tenant))

    def append(self, tenant: str, batch, leaf_hashes: bytes, chain_heads: bytes,
               meta: Callable[[], dict[str, bytes]], *, event_ids: list[str] | None = None) -> None:
        """Store an encoded batch (:class:`~planes.native.eventbatch_py.EncodedBatch`) as one segment.

        Durable when this returns. The segment is written and synced on a
        helper thread while this one inserts its index rows and calls
        ``meta`` for the meta rows to commit with it (the log computes its
        Merkle frontier there); the transaction commits once the segment is
        durable, so an index row never points at bytes a crash can lose.

        ``event_ids`` is given when some id hashes may already be taken by
        other ids (the message-by-message path); those ids are recorded as
        collisions so that lookups by id stay exact.
        """
        first, count, scope = batch.first_sequence, len(batch), id_scope(tenant)
        keys = u64_array(batch.id_hashes) if event_ids is not None else ()
        collisions = []
        if event_ids is not None:
            batch_keys: set[int] = set()
            for sequence, (key, event_id) in enumerate(zip(keys, event_ids), first):
                if key in batch_keys or self._ids.get(key ^ scope) is not None:
                    collisions.append((event_id, sequence))
                batch_keys.add(key)
        length = record_length(count, len(batch.leaves), len(batch.values))
        if length > recovery.MAX_SEGMENT_BYTES:  # what bounds the tail a crash can leave (see .recovery)
            raise LimitExceeded("segment_bytes", recovery.MAX_SEGMENT_BYTES, length,
                                message=f"a batch of {count} events takes {length} bytes stored, more than "
                                        f"{recovery.MAX_SEGMENT_BYTES}: split it")
        offset = self._segment_at(length)
        synced = self._syncer.submit(self._write_segment, [batch.leaves, u64_bytes(batch.offsets), leaf_hashes,
                                                           chain_heads, batch.id_hashes, batch.values], offset)
        connection = self._write
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(f"INSERT INTO segments ({SEGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (first, count, tenant, batch.min_time, batch.max_time, offset, len(batch.leaves),
                                    len(batch.values)))
                connection.executemany(CORRELATION_INSERT, [(tenant, *row) for row in batch.correlations])
                if collisions:
                    connection.executemany("INSERT INTO event_id_collisions VALUES (?, ?)", collisions)
                connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta().items()))
                synced.result()
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        finally:
            wait([synced])  # a failed append leaves no write in flight behind it
        self._end = offset + record_length(count, len(batch.leaves), len(batch.values))
        self._ids.add(batch.id_hashes, first, scope)

    def _remove_values(self, changes: dict[int, set[str] | None]) -> int:
        """Remove raw values: ``changes`` maps a sequence to the field names to drop (None: all).

        The removal is recorded (with the byte ranges to erase) and committed
        first, then the bytes are zeroed and synced: a crash in between leaves
        a recorded removal that the next writer finishes, never a silent one.
        """
        removed, ranges = [], []
        segments: dict[int, Segment] = {}
        for sequence in changes:
            segment = self._segment_of(sequence)
            if segment is not None:
                segments[segment.first_sequence] = segment
        for segment in segments.values():
            gone = self._removed(segment)
            base = self._values_position(segment)
            for sequence, name, salt, value in value_spans(segment.values):
                names = changes.get(sequence, ())
                if sequence in changes and (names is None or name in names) and (sequence, name) not in gone:
                    removed.append((sequence, name))
                    ranges.extend((base + salt[0], base + salt[1], base + value[0], base + value[1]))
        if not removed:
            return 0
        connection = self._write
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany("INSERT OR IGNORE INTO removed_values VALUES (?, ?)", removed)
            connection.execute("INSERT OR REPLACE INTO meta VALUES ('erasing', ?)", (u64_bytes(array("Q", ranges)),))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        self._erase(ranges)
        return len(removed)

    def _erase(self, ranges: list[int]) -> None:
        """Zero the byte ranges ``[start, stop)`` (flat list) of the segment file, sync, then forget them."""
        for start, stop in zip(ranges[::2], ranges[1::2]):
            os.pwrite(self._fd, bytes(stop - start), start)
        os.fdatasync(self._fd)
        self._write.execute("DELETE FROM meta WHERE key = 'erasing'")
        cache = getattr(self._local, "segments", None)
        if cache is not None:
            cache.clear()

    def _values_position(self, segment: Segment) -> int:
        row = self._read.execute("SELECT file_offset FROM segments WHERE first_sequence = ?",
                                 (segment.first_sequence,)).fetchone()
        sizes = part_sizes(segment.count, len(segment.leaves), len(segment.values))
        return row[0] + sum(sizes[:5])

    def _removed(self, segment: Segment) -> set[tuple[int, str]]:
        return {tuple(row) for row in self._read.execute(
            "SELECT sequence, name FROM removed_values WHERE sequence BETWEEN ? AND ?",
            (segment.first_sequence, segment.last_sequence))}

    def delete_values(self, sequence: int, names: Iterable[str]) -> int:
        return self._remove_values({sequence: set(names)})

    def delete_all_values(self, sequences: list[int]) -> int:
        return self._remove_values(dict.fromkeys(sequences))

    def put_checkpoint(self, tree_size: int, body: bytes, signature: bytes, key_id: str) -> None:
        self._write.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?, ?)",
                            (tree_size, body, signature, key_id))

    def set_meta(self, key: str, value: bytes) -> None:
        self._write.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- reads (any thread) -----------------------------------------------

    def meta(self, key: str) -> bytes | None:
        row = self._read.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def head(self) -> tuple[int, bytes | None]:
        """(last sequence, its chain head) or (0, None) for an empty log."""
        row = self._read.execute(f"SELECT {SEGMENT_COLUMNS} FROM segments ORDER BY first_sequence DESC LIMIT 1"
                                 ).fetchone()
        if row is None:
            return 0, None
        segment = self._load(row)
        return segment.last_sequence, segment.chain_heads[-32:]

    def _load(self, row: tuple) -> Segment:
        """A segment read from the file (a short read leaves its last parts short: fsck says where)."""
        first, count, tenant, min_time, max_time, offset, leaves_length, values_length = row
        data = os.pread(self._fd, record_length(count, leaves_length, values_length), offset)
        parts, at = [], 0
        for size in part_sizes(count, leaves_length, values_length):
            parts.append(data[at:at + size])
            at += size
        return Segment(first, count, tenant, min_time, max_time, *parts)

    def _segment_of(self, sequence: int) -> Segment | None:
        """The segment holding ``sequence`` (segments are immutable, so a few stay cached per thread)."""
        connection = self._read
        cache: OrderedDict = self._local.segments
        for segment in cache.values():
            if segment.first_sequence <= sequence <= segment.last_sequence:
                return segment
        row = connection.execute(f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE first_sequence <= ? "
                                 "ORDER BY first_sequence DESC LIMIT 1", (sequence,)).fetchone()
        if row is None or sequence > row[0] + row[1] - 1:
            return None
        segment = self._load(row)
        cache[segment.first_sequence] = segment
        if len(cache) > CACHED_SEGMENTS:
            cache.popitem(last=False)
        return segment

    def event_at(self, sequence: int) -> StoredEvent | None:
        segment = self._segment_of(sequence)
        return segment.event(sequence) if segment is not None else None

    def known_event_ids(self, tenant: str, event_ids: Iterable[str]) -> dict[str, int]:
        """The sequences of those of ``event_ids`` that ``tenant`` has stored.

        Event ids are per tenant: another tenant's event with the same id is
        not one of them (it neither makes an append a replay nor answers a
        lookup).
        """
        found: dict[str, int] = {}
        missed = []
        scope = id_scope(tenant)
        for event_id in event_ids:
            sequence = self._ids.get(eventbatch_py.id_hash(event_id.encode()) ^ scope)
            if sequence is not None:
                segment = self._segment_of(sequence)
                if (segment is not None and segment.tenant == tenant
                        and leaf_event_id(segment.leaf(sequence)) == event_id):
                    found[event_id] = sequence
                    continue
                missed.append(event_id)
        for start in range(0, len(missed), 500):
            chunk = missed[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for event_id, sequence in self._read.execute(
                    f"SELECT event_id, sequence FROM event_id_collisions WHERE event_id IN ({marks}) "
                    "ORDER BY sequence", chunk):
                if event_id not in found:
                    segment = self._segment_of(sequence)
                    if segment is not None and segment.tenant == tenant:
                        found[event_id] = sequence
        return found

    def event(self, tenant: str, event_id: str) -> StoredEvent | None:
        """``tenant``'s event with that id, or None."""
        sequence = self.known_event_ids(tenant, [event_id]).get(event_id)
        return self.event_at(sequence) if sequence is not None else None

    def _segments_holding(self, wanted: set[int]) -> list[Segment]:
        """The segments that hold any of ``wanted``, in log order."""
        segments: dict[int, Segment] = {}
        for sequence in wanted:
            segment = self._segment_of(sequence)
            if segment is not None:
                segments[segment.first_sequence] = segment
        return [segments[first] for first in sorted(segments)]

    def values(self, sequences: list[int]) -> dict[int, dict[str, StoredValue]]:
        wanted = set(sequences)
        found: dict[int, dict[str, StoredValue]] = {}
        for segment in self._segments_holding(wanted):
            for sequence, name, salt, value in self.segment_values(segment):
                if sequence in wanted:
                    found.setdefault(sequence, {})[name] = StoredValue(sequence, name, salt, value)
        return found

    def value_bytes(self, sequences: list[int]) -> int:
        """The bytes of raw values and salts that :meth:`values` would return for ``sequences``, counted from
        the records' lengths without copying a value (what an export's byte limit is checked against)."""
        wanted = set(sequences)
        total = 0
        for segment in self._segments_holding(wanted):
            gone = self._removed(segment) if segment.values else set()
            for sequence, name, salt, value in value_spans(segment.values):
                if sequence in wanted and (sequence, name) not in gone:
                    total += salt[1] - salt[0] + value[1] - value[0]
        return total

    def segment_values(self, segment: Segment) -> list[tuple[int, str, bytes, bytes]]:
        """The raw values a segment still holds (removed ones left out)."""
        if not segment.values:
            return []
        gone = self._removed(segment)
        records = eventbatch_py.decode_values(segment.values)
        return [record for record in records if (record[0], record[1]) not in gone] if gone else records

    def _candidates(self, tenant: str, correlation_id: str, start_ns: int | None, end_ns: int | None,
                    after_sequence: int, through_sequence: int | None = None) -> Iterator[int]:
        """Sequences in order that may match (the caller filters each event exactly), none past
        ``through_sequence`` (a snapshot's tree size: what is appended meanwhile is not even read)."""
        bound = min(through_sequence, MAX_INTEGER) if through_sequence is not None else MAX_INTEGER
        if after_sequence >= bound:
            return
        # Stored times are int64: a bound past that range is none (SQLite cannot take it).
        start_ns = start_ns if start_ns is not None and start_ns > -MAX_INTEGER - 1 else None
        end_ns = end_ns if end_ns is not None and end_ns <= MAX_INTEGER else None
        if correlation_id:
            rows = self._read.execute(
                "SELECT first_sequence, last_sequence, runs FROM correlation_runs WHERE tenant = ? "
                "AND correlation_id = ? AND last_sequence > ? AND first_sequence <= ? ORDER BY first_sequence",
                (tenant, correlation_id, after_sequence, bound)).fetchall()
            for first, last, runs in rows:
                yield from (sequence for sequence in correlation_sequences(first, min(last, bound), runs)
                            if after_sequence < sequence <= bound)
            return
        clauses = ["tenant = ?", "first_sequence + count - 1 > ?", "first_sequence <= ?"]
        params = [tenant, after_sequence, bound]
        if start_ns is not None:
            clauses.append("max_time >= ?")
            params.append(start_ns)
        if end_ns is not None:
            clauses.append("min_time < ?")
            params.append(end_ns)
        segments = self._read.execute(
            f"SELECT first_sequence, count FROM segments WHERE {' AND '.join(clauses)} ORDER BY first_sequence",
            params).fetchall()
        for first, count in segments:
            yield from range(max(first, after_sequence + 1), min(first + count, bound + 1))

    def query(self, tenant: str, *, correlation_id: str = "", event_types: tuple[str, ...] = (),
              start_ns: int | None = None, end_ns: int | None = None, after_sequence: int = 0,
              limit: int = 1000, through_sequence: int | None = None) -> list[StoredEvent]:
        found: list[StoredEvent] = []
        if limit <= 0:
            return found
        types = set(event_types)
        for sequence in self._candidates(tenant, correlation_id, start_ns, end_ns, after_sequence,
                                         through_sequence):
            event = self.event_at(sequence)
            if event is None or event.tenant != tenant:
                continue
            if correlation_id and event.correlation_id != correlation_id:
                continue
            if (types and event.event_type not in types or start_ns is not None and event.time_ns < start_ns
                    or end_ns is not None and event.time_ns >= end_ns):
                continue
            found.append(event)
            if len(found) >= limit:
                break
        return found

    def retention_candidates(self, before_ns: int, *, after: int = 0, settled_before: int = -MAX_INTEGER - 1,
                             settled_through: int = 0, limit: int = 8) -> list[int]:
        """First sequences, in order and at most ``limit``, of the segments past ``after`` that may hold values
        older than ``before_ns``, leaving out those an earlier scan settled: no values older than
        ``settled_before`` were left in segments up to ``settled_through``, so one of those matters again only
        if it holds an event at or after that cutoff."""
        return [row[0] for row in self._read.execute(
            "SELECT first_sequence FROM segments WHERE first_sequence > ? AND min_time < ? AND values_length > 0 "
            "AND (max_time >= ? OR first_sequence > ?) ORDER BY first_sequence LIMIT ?",
            (after, min(before_ns, MAX_INTEGER), max(settled_before, -MAX_INTEGER - 1), settled_through, limit))]

    def expired_values(self, event_type: str, before_ns: int, firsts: Iterable[int]) -> dict[str, list[int]]:
        """Sequences, by tenant, of events of ``event_type`` older than ``before_ns`` that still hold values,
        in the segments starting at ``firsts`` (:meth:`retention_candidates`).

        A segment's leaves are searched for the encoded type (its length and bytes, as a leaf holds it) and
        only the leaves it occurs in are decoded: a segment without that type costs a read, no decoding."""
        encoded = event_type.encode()
        needle = len(encoded).to_bytes(4, "big") + encoded
        found: dict[str, list[int]] = {}
        for first in firsts:
            segment = self._segment_of(first)
            if segment is None:
                continue
            hits = segment.leaves.find(needle)
            if hits < 0:
                continue
            offsets = u64_array(segment.offsets)
            indexes: set[int] = set()
            while hits >= 0:
                indexes.add(bisect.bisect_right(offsets, hits) - 1)
                hits = segment.leaves.find(needle, hits + 1)
            held = {record[0] for record in self.segment_values(segment)}
            for index in sorted(indexes):
                sequence = segment.first_sequence + index
                if sequence not in held:
                    continue
                event = segment.event(sequence, offsets)
                if event.event_type == event_type and event.time_ns < before_ns:
                    found.setdefault(event.tenant, []).append(sequence)
        return found

    def last_segment(self) -> int:
        """The first sequence of the last segment (0: none)."""
        return self._read.execute("SELECT coalesce(max(first_sequence), 0) FROM segments").fetchone()[0]

    def leaf_hashes(self, size: int) -> bytes:
        """The first ``size`` leaf hashes, concatenated."""
        rows = self._read.execute("SELECT count, file_offset, leaves_length FROM segments WHERE first_sequence <= ? "
                                  "ORDER BY first_sequence", (size,)).fetchall()
        return b"".join(os.pread(self._fd, count * 32, offset + leaves_length + (count + 1) * 8)
                        for count, offset, leaves_length in rows)[:size * 32]

    def segments(self) -> Iterator[Segment]:
        """Every segment in order, read afresh (for fsck)."""
        after = 0
        while True:
            row = self._read.execute(f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE first_sequence > ? "
                                     "ORDER BY first_sequence LIMIT 1", (after,)).fetchone()
            if row is None:
                return
            segment = self._load(row)
            yield segment
            after = segment.first_sequence

    def segment_layout(self) -> list[tuple[int, int, int]]:
        """(first sequence, file offset, recorded length) of every segment, in log order (fsck)."""
        return [(first, offset, record_length(count, leaves_length, values_length))
                for first, offset, count, leaves_length, values_length in self._read.execute(
                    "SELECT first_sequence, file_offset, count, leaves_length, values_length FROM segments "
                    "ORDER BY first_sequence")]

    def file_bytes(self, offset: int, length: int) -> bytes:
        """Raw bytes of the segment file (fsck)."""
        return os.pread(self._fd, length, offset) if length > 0 else b""

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def correlation_runs(self, first_sequence: int,
                         last_sequence: int) -> list[tuple[str, str, int, int, bytes | None]]:
        """The ``correlation_runs`` rows that start from ``first_sequence`` to ``last_sequence`` (fsck)."""
        return [tuple(row) for row in self._read.execute(
            "SELECT tenant, correlation_id, first_sequence, last_sequence, runs FROM correlation_runs "
            "WHERE first_sequence BETWEEN ? AND ? ORDER BY first_sequence", (first_sequence, last_sequence))]

    def removed_values(self, segment: Segment) -> set[tuple[int, str]]:
        """(sequence, field name) of the values removed from a segment (fsck)."""
        return self._removed(segment)

    def stray_removals(self) -> list[int]:
        """Sequences with a recorded removal that no segment holds (fsck)."""
        return [row[0] for row in self._read.execute(
            "SELECT DISTINCT sequence FROM removed_values WHERE sequence > "
            "(SELECT coalesce(max(first_sequence + count - 1), 0) FROM segments) OR sequence < 1")]

    def checkpoint(self, tree_size: int = 0) -> tuple[int, bytes, bytes, str] | None:
        if tree_size > MAX_INTEGER:  # no tree is that large (and SQLite cannot take the number)
            return None
        if tree_size:
            row = self._read.execute("SELECT * FROM checkpoints WHERE tree_size = ?", (tree_size,)).fetchone()
        else:
            row = self._read.execute("SELECT * FROM checkpoints ORDER BY tree_size DESC LIMIT 1").fetchone()
        return tuple(row) if row else None

    def checkpoint_at_or_after(self, tree_size: int) -> tuple[int, bytes, bytes, str] | None:
        if tree_size > MAX_INTEGER:
            return None
        row = self._read.execute("SELECT * FROM checkpoints WHERE tree_size >= ? ORDER BY tree_size LIMIT 1",
                                 (tree_size,)).fetchone()
        return tuple(row) if row else None

    def checkpoint_key_ids(self) -> dict[str, int]:
        """How many checkpoints each key id signed."""
        return dict(self._read.execute("SELECT key_id, count(*) FROM checkpoints GROUP BY key_id ORDER BY 2 DESC"))

    def checkpoints(self) -> list[tuple[int, bytes, bytes, str]]:
        return [tuple(row) for row in self._read.execute("SELECT * FROM checkpoints ORDER BY tree_size")]

    # -- format 1 ---------------------------------------------------------------

    def _migrate_correlation_runs(self) -> None:
        """Add ``runs`` to a ``correlation_runs`` table made before it; its rows (one per run) stay valid."""
        columns = {row[1] for row in self._write.execute("PRAGMA table_info(correlation_runs)")}
        if "runs" not in columns:
            self._write.execute("ALTER TABLE correlation_runs ADD COLUMN runs BLOB")

    def _migrate_collisions(self) -> None:
        """Move the rows of ``id_collisions`` (one sequence an id, from before event ids were per tenant)."""
        connection = self._write
        if not connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'id_collisions'").fetchone():
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("INSERT OR IGNORE INTO event_id_collisions SELECT event_id, sequence FROM id_collisions")
            connection.execute("DROP TABLE id_collisions")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _migrate_format_1(self) -> None:
        """Regroup a format-1 log (an ``events`` row per event) into segments, in one transaction.

        Consecutive events of one tenant become one segment (at most 10,000);
        leaves, hashes and heads are copied unchanged, so checkpoints and
        proofs stay valid. The old tables are dropped in the same transaction.
        """
        connection = self._write
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone():
            return
        os.ftruncate(self._fd, self._end)  # a migration cut short by a crash starts again
        connection.execute("BEGIN IMMEDIATE")
        try:
            values: dict[int, list] = {}
            for sequence, name, salt, value in connection.execute("SELECT * FROM field_values ORDER BY sequence"):
                values.setdefault(sequence, []).append((sequence, name, salt, value))
            group: list[tuple] = []
            taken: set[int] = set()

            def flush() -> None:
                if not group:
                    return
                offsets = array("Q", [0])
                keys = array("Q")
                runs: list[list] = []
                for row in group:
                    offsets.append(offsets[-1] + len(row[6]))
                    key = eventbatch_py.id_hash(row[1].encode())
                    keys.append(key)
                    scoped = key ^ id_scope(row[2])  # as the index keys it: ids are per tenant
                    if scoped in taken:
                        connection.execute("INSERT INTO event_id_collisions VALUES (?, ?)", (row[1], row[0]))
                    taken.add(scoped)
                    if runs and runs[-1][0] == row[3]:
                        runs[-1][2] = row[0]
                    else:
                        runs.append([row[3], row[0], row[0]])
                first, tenant = group[0][0], group[0][2]
                times = [row[5] for row in group]
                leaves_data = b"".join(row[6] for row in group)
                kept = eventbatch_py.pack_values([record for row in group for record in values.get(row[0], [])])
                at = self._write_segment([leaves_data, u64_bytes(offsets), b"".join(row[7] for row in group),
                                          b"".join(row[8] for row in group), u64_bytes(keys), kept], self._end)
                self._end = at + record_length(len(group), len(leaves_data), len(kept))
                connection.execute(f"INSERT INTO segments ({SEGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (first, len(group), tenant, min(times), max(times), at, len(leaves_data),
                                    len(kept)))
                connection.executemany(CORRELATION_INSERT,
                                       [(tenant, *row) for row in eventbatch_py.correlations(runs)])
                group.clear()

            for row in connection.execute("SELECT * FROM events ORDER BY sequence").fetchall():
                if group and (row[2] != group[0][2] or len(group) >= 10_000 or row[0] != group[-1][0] + 1):
                    flush()
                group.append(row)
            flush()
            connection.execute("DROP TABLE events")
            connection.execute("DROP TABLE IF EXISTS field_values")
            connection.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (FORMAT,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
