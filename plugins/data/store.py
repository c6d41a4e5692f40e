"""Where payloads live: one file per payload and an SQLite catalogue, under the state directory.

Layout (``<state>/data``, mode 0700)::

    payloads.sqlite3     catalogue: state, tenant, size, expiry, wrapped key, info;
                         and the master key's check value (see crypto)
    incoming/<id>        a payload being received; removed if the put fails
    objects/<id>         a stored payload (plain, or sealed segments; see crypto)
    orphans/<id>         object files found at start-up with no catalogue row

A durable put writes ``incoming/<id>`` with direct I/O where the filesystem
takes it (``O_DIRECT``: aligned writes from a staging buffer, the unaligned
tail through the page cache), fsyncs it, renames it into ``objects/`` and
fsyncs the directory before the catalogue row commits (SQLite WAL,
``synchronous=FULL``), so an acknowledged payload survives a crash and a
crash before the acknowledgement leaves only an ``incoming`` file, removed at
the next start, or an object file without a catalogue row (the crash fell
between the rename and the commit): never acknowledged, so never served, it
is moved to ``orphans/`` at the next start with a warning, never deleted
unseen. A failed catalogue insert removes its object file at once. Plain
payloads are read by memory-mapping their file.

Start-up refuses, with one line naming the file, a store it would damage by
going on: a catalogue missing or empty while object files exist (going on
would orphan every payload; restore the catalogue), a master key missing
while encrypted payloads depend on it, or one that is not the key that
wrapped them (restore it from backup), and a catalogue or directory that
cannot be opened or written.

The catalogue keeps each payload's ``PayloadInfo`` as protobuf bytes beside
the columns it is queried by; quarantined payloads also keep their
``QuarantinedPayload`` record. This class is the storage interface: another
backend (an object store with PostgreSQL) implements the same methods.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import mmap
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from planes.data.v1 import data_service_pb2 as pb
from planes.kernel.errors import SettingsError
from planes.kernel.files import DIRECT_ALIGN, fsync_dir, open_direct
from planes.kernel.secrets import ensure_private_dir

from .crypto import SEGMENT, TAG, MasterKey, SegmentCipher, StoredDataCorrupt

__all__ = ["CATALOGUE", "ORPHANS", "ObjectWriter", "PayloadStore", "StoredPayload"]

log = logging.getLogger("planes.plugins.data")

CATALOGUE = "payloads.sqlite3"
ORPHANS = "orphans"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payloads (
    payload_id  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    state       INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    expires_ns  INTEGER NOT NULL,      -- 0: never
    wrapped_key BLOB,                  -- NULL for plain payloads and once deleted
    info        BLOB NOT NULL,         -- PayloadInfo
    quarantine  BLOB                   -- QuarantinedPayload, while quarantined
);
CREATE INDEX IF NOT EXISTS payloads_by_tenant ON payloads (tenant, state);
CREATE INDEX IF NOT EXISTS payloads_by_expiry ON payloads (expires_ns) WHERE expires_ns > 0;
CREATE TABLE IF NOT EXISTS store_meta (
    name        TEXT PRIMARY KEY,
    value       BLOB NOT NULL
);
"""
#: store_meta row: the check value of the master key that wraps the catalogue's data keys.
_KEY_CHECK = "master_key_check"

#: Bytes written between interim syncs of a durable payload.
SYNC_EVERY = 16 << 20
#: Direct writes and interim syncs of every payload being written (they wait on the disk, not the CPU).
_SYNCER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="data-sync")
#: Durable payloads are written around the page cache (O_DIRECT) in aligned
#: writes of this many bytes, copied into page-aligned staging buffers. On
#: this machine 256 MiB took 0.10 s and 0.01 s of CPU that way, against 0.35 s
#: and 0.21-0.25 s of CPU through the page cache with fdatasync (bench/RESULTS.md).
DIRECT_STAGE = 2 << 20
#: Staging buffers per payload: while one fills, the others' writes are in
#: flight. One write at a time (two stages) left the writer waiting on the
#: disk for 150-230 ms of a 256 MiB put: 1 MiB direct writes one after the
#: other ran at 0.5-1.7 GB/s here, three or four at once at 2.1-2.6 GB/s.
DIRECT_STAGES = 4
#: States whose bytes count against the tenant's quota.
_HELD = (pb.PAYLOAD_STATE_AVAILABLE, pb.PAYLOAD_STATE_QUARANTINED)


@dataclass
class StoredPayload:
    payload_id: str
    tenant: str
    state: int
    size: int
    created_ns: int
    expires_ns: int
    wrapped_key: bytes | None
    info: pb.PayloadInfo
    quarantine: pb.QuarantinedPayload | None

    def expired(self, now_ns: int) -> bool:
        return self.expires_ns > 0 and now_ns >= self.expires_ns


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class _DirectWrites:
    """A durable payload's bytes, written around the page cache from a ring of page-aligned stages.

    One stage fills while the writes of the others are in flight on the sync
    threads. The last stage's unaligned tail goes through the page cache
    (fsync covers it). A filesystem that takes the ``O_DIRECT`` open but
    refuses the writes (EINVAL) gets each refused stage and everything after
    through the page cache instead, nothing lost.
    """

    def __init__(self, direct_fd: int, fd: int):
        self.direct_fd, self.fd = direct_fd, fd
        self.stages = [mmap.mmap(-1, DIRECT_STAGE) for _ in range(DIRECT_STAGES)]
        # numpy views of the stages: their copies release the GIL, so the event
        # loop keeps running while a chunk is staged.
        self._arrays = [np.frombuffer(stage, np.uint8) for stage in self.stages]
        self.current = self.staged = self.offset = 0
        self.inflight: deque[tuple[concurrent.futures.Future, memoryview, int]] = deque()

    @property
    def active(self) -> bool:
        return self.direct_fd >= 0

    def write(self, view: memoryview) -> None:
        source = np.frombuffer(view, np.uint8) if view.nbytes else None
        done = 0
        while done < view.nbytes and self.active:
            taken = min(view.nbytes - done, DIRECT_STAGE - self.staged)
            self._arrays[self.current][self.staged:self.staged + taken] = source[done:done + taken]
            self.staged += taken
            done += taken
            if self.staged == DIRECT_STAGE:
                full = memoryview(self.stages[self.current])
                if self.active:
                    self.inflight.append((_SYNCER.submit(_pwrite_all, self.direct_fd, full, self.offset), full,
                                          self.offset))
                else:  # refused just now: this stage too goes through the page cache
                    _pwrite_all(self.fd, full, self.offset)
                    full.release()
                self.offset += DIRECT_STAGE
                self.current, self.staged = (self.current + 1) % DIRECT_STAGES, 0
                if len(self.inflight) == DIRECT_STAGES:
                    self._settle()  # the next stage to fill is still being written
        if done < view.nbytes:
            _pwrite_all(self.fd, view[done:], self.offset)
            self.offset += view.nbytes - done

    def settle_all(self) -> None:
        while self.inflight:
            self._settle()

    def finish(self) -> None:
        self.settle_all()
        stage = memoryview(self.stages[self.current])[:self.staged]
        aligned = self.staged - self.staged % DIRECT_ALIGN if self.active else 0
        self._direct_or_buffered(stage[:aligned], self.offset)
        _pwrite_all(self.fd, stage[aligned:], self.offset + aligned)
        self.offset += self.staged
        self.staged = 0
        stage.release()

    def _settle(self) -> None:
        """Wait for the oldest stage being written; on a refusal write it through the page cache."""
        future, stage, offset = self.inflight.popleft()
        try:
            future.result()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refused()
            _pwrite_all(self.fd, stage, offset)
        finally:
            stage.release()

    def _direct_or_buffered(self, view: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.direct_fd if self.active else self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refused()
            _pwrite_all(self.fd, view, offset)

    def _refused(self) -> None:
        """Direct writes refused: close the direct descriptor once no write still uses it."""
        if not self.active:
            return
        concurrent.futures.wait([future for future, _, _ in self.inflight])
        os.close(self.direct_fd)
        self.direct_fd = -1

    def close(self) -> None:
        concurrent.futures.wait([future for future, _, _ in self.inflight])
        for _, stage, _ in self.inflight:
            stage.release()
        self.inflight.clear()
        if self.active:
            os.close(self.direct_fd)
            self.direct_fd = -1
        self._arrays.clear()
        for stage in self.stages:
            stage.close()


class ObjectWriter:
    """Writes one payload's bytes to ``incoming/`` as they arrive, hashing them as they pass.

    Not thread-safe: one stream feeds it, from one thread at a time, or from
    two when one calls :meth:`update_digest` and the other :meth:`append`.
    """

    def __init__(self, path: Path, payload_id: str, cipher: SegmentCipher | None, durable: bool, content_hash,
                 expected_size: int = 0):
        self.path = path
        self.payload_id = payload_id
        self.size = 0
        self._cipher = cipher
        self._durable = durable
        self._hash = content_hash
        self._pending = bytearray()
        self._segment = 0
        self._written = self._unsynced = 0
        self._sync: concurrent.futures.Future | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # Durable payloads skip the page cache: the copy into it and the
        # writeback that fdatasync waits for cost more CPU than the disk
        # time they hide. The page-aligned stage is what direct writes need.
        direct_fd = open_direct(path) if durable else None
        self._direct = _DirectWrites(direct_fd, self._fd) if direct_fd is not None else None
        self._allocated = 0
        if expected_size:
            if cipher is not None:
                expected_size += TAG * max(1, -(-expected_size // SEGMENT))
            try:
                # Blocks up front: a full disk fails the put before any byte is
                # taken, and a file of fixed size makes the interim syncs cheap.
                os.posix_fallocate(self._fd, 0, expected_size)
                self._allocated = expected_size
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._close()
                    path.unlink(missing_ok=True)
                    raise

    @property
    def direct(self) -> bool:
        """True while bytes go to disk by direct I/O (known once the writes in flight have answered)."""
        if self._direct is None:
            return False
        self._direct.settle_all()
        return self._direct.active

    def write(self, data, chunk_digest: bytes = b"") -> bool:
        """Append ``data``; False when ``chunk_digest`` is set and does not match it (stored anyway)."""
        matches = self.update_digest(data, chunk_digest)
        self.append(data)
        return matches

    # write() in two halves, for a caller that runs them on two threads: each
    # half must see every chunk, in order, from one thread at a time.

    def update_digest(self, data, chunk_digest: bytes = b"") -> bool:
        """Hash ``data`` into the content digest; False when ``chunk_digest`` is set and does not match it."""
        view = memoryview(data).cast("B")
        matches = True
        if chunk_digest:
            matches = hashlib.sha256(view).digest() == chunk_digest
        self._hash.update(view)
        return matches

    def append(self, data) -> None:
        """Write ``data`` after the bytes already written (sealed first when encrypted)."""
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if self._cipher is None:
            self._write_all(view)
        else:
            self._pending += view
            while len(self._pending) >= SEGMENT + 1:
                # Keep at least one byte back: the final record is sealed in finish().
                self._write_all(self._cipher.seal(self._segment, self._pending[:SEGMENT], final=False))
                del self._pending[:SEGMENT]
                self._segment += 1

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._direct is not None:
            self._direct.write(view)
            self._written += view.nbytes
            return
        _pwrite_all(self._fd, view, self._written)
        self._written += view.nbytes
        self._unsynced += view.nbytes
        if self._durable and self._unsynced >= SYNC_EVERY and (self._sync is None or self._sync.done()):
            # Flush as we go, on a thread of its own, so the sync before the
            # acknowledgement finds little left to write and writing goes on
            # meanwhile. One interim sync at a time: they never queue up.
            if self._sync is not None:
                self._sync.result()
            self._sync = _SYNCER.submit(os.fdatasync, self._fd)
            self._unsynced = 0

    def finish(self) -> bytes:
        """Seal the last record, make the file durable and return the content digest."""
        if self._cipher is not None:
            self._write_all(self._cipher.seal(self._segment, self._pending, final=True))
            self._pending.clear()
        if self._direct is not None:
            self._direct.finish()
        if self._sync is not None:
            self._sync.result()
            self._sync = None
        if self._allocated != self._written:
            os.ftruncate(self._fd, self._written)
        if self._durable:
            os.fsync(self._fd)
        self._close()
        return self._hash.digest()

    def discard(self) -> None:
        if self._sync is not None:
            concurrent.futures.wait([self._sync])
            self._sync = None
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PayloadStore:
    def __init__(self, root: Path, master_key: Path, *, durable: bool = True):
        """Open (or create) the store under ``root`` with the master key file ``master_key``.

        Raises :class:`~planes.kernel.errors.SettingsError`, naming the file,
        when the store cannot be opened as it is (see the module docstring).
        """
        catalogue = root / CATALOGUE
        try:
            self.root = ensure_private_dir(root)
            self.incoming = ensure_private_dir(root / "incoming")
            self.objects = ensure_private_dir(root / "objects")
        except OSError as exc:
            raise _refusal(exc, root) from None
        self.durable = durable
        self._lock = threading.Lock()
        _refuse_lost_catalogue(catalogue, self.objects)
        try:
            self._db = sqlite3.connect(catalogue, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SettingsError(f"data catalogue {catalogue} cannot be opened: {exc} (damaged: restore it from "
                                "backup; read-only: give the server write access to it and its directory)") from None
        try:
            self.master = self._open_master_key(master_key)
            #: Partial puts a crash left behind; never acknowledged, so removed.
            self.removed_partial = 0
            for leftover in self.incoming.iterdir():
                leftover.unlink()
                self.removed_partial += 1
            #: Object files without a catalogue row, moved to ``orphans/`` (see the module docstring).
            self.orphaned = self._set_orphans_aside()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, OSError):
                raise _refusal(exc, root) from None
            if isinstance(exc, sqlite3.Error):
                raise SettingsError(f"data catalogue {catalogue} cannot be read or written: {exc}") from None
            raise

    def _open_master_key(self, path: Path) -> MasterKey:
        """Load the master key, refusing one that cannot open the data keys the catalogue holds."""
        (encrypted,) = self._db.execute("SELECT COUNT(*) FROM payloads WHERE wrapped_key IS NOT NULL").fetchone()
        master = MasterKey.load_or_create(path, dependents=encrypted)
        row = self._db.execute("SELECT value FROM store_meta WHERE name = ?", (_KEY_CHECK,)).fetchone()
        if row is not None and row[0] == master.check_value:
            return master
        if encrypted:
            if row is not None:
                raise SettingsError(f"data master key {path} is not the key that wrapped the {encrypted} encrypted "
                                    "payload(s) in the catalogue (its check value differs): restore the right "
                                    "key from backup")
            # A catalogue from before check values: the key must open a data key it holds.
            payload_id, wrapped = self._db.execute(
                "SELECT payload_id, wrapped_key FROM payloads WHERE wrapped_key IS NOT NULL LIMIT 1").fetchone()
            try:
                master.unwrap(wrapped, payload_id)
            except StoredDataCorrupt:
                raise SettingsError(f"data master key {path} does not open the data keys of the {encrypted} "
                                    "encrypted payload(s) in the catalogue: restore the right key from "
                                    "backup") from None
        elif row is not None:
            log.warning("data master key %s is not the one recorded in the catalogue; no encrypted payload "
                        "depends on the old one, so this one is recorded instead", path)
        self._db.execute("INSERT OR REPLACE INTO store_meta VALUES (?, ?)", (_KEY_CHECK, master.check_value))
        return master

    def _set_orphans_aside(self) -> int:
        """Move object files that have no catalogue row to ``orphans/``; how many were moved."""
        moved = 0
        orphans = self.root / ORPHANS
        for entry in self.objects.iterdir():
            if self._db.execute("SELECT 1 FROM payloads WHERE payload_id = ?", (entry.name,)).fetchone():
                continue
            ensure_private_dir(orphans)
            os.replace(entry, orphans / entry.name)
            moved += 1
        if moved and self.durable:
            fsync_dir(self.objects)
            fsync_dir(orphans)
        return moved

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing -----------------------------------------------------------------

    def begin(self, payload_id: str, *, encrypted: bool, content_hash,
              expected_size: int = 0) -> tuple[ObjectWriter, bytes | None]:
        """A writer for a new payload hashing into ``content_hash``, and its wrapped data key when encrypted."""
        cipher = wrapped = None
        if encrypted:
            data_key = os.urandom(32)
            cipher = SegmentCipher(data_key, payload_id)
            wrapped = self.master.wrap(data_key, payload_id)
        writer = ObjectWriter(self.incoming / payload_id, payload_id, cipher, self.durable, content_hash,
                              expected_size)
        return writer, wrapped

    def commit(self, writer: ObjectWriter, info: pb.PayloadInfo, wrapped_key: bytes | None,
               quarantine: pb.QuarantinedPayload | None = None) -> StoredPayload:
        """Move a finished writer's file into place and catalogue it (available or quarantined)."""
        final = self.objects / writer.payload_id
        os.replace(writer.path, final)
        if self.durable:
            fsync_dir(self.objects)
        record = StoredPayload(
            payload_id=writer.payload_id, tenant=info.ref.tenant, state=info.state, size=info.ref.size,
            created_ns=info.created_at.ToNanoseconds(),
            expires_ns=info.expires_at.ToNanoseconds() if info.HasField("expires_at") else 0,
            wrapped_key=wrapped_key, info=info, quarantine=quarantine)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO payloads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.payload_id, record.tenant, record.state, record.size, record.created_ns,
                     record.expires_ns, wrapped_key, info.SerializeToString(),
                     quarantine.SerializeToString() if quarantine is not None else None))
        except BaseException:
            # Not catalogued, so never acknowledged nor served: the file must not stay behind.
            final.unlink(missing_ok=True)
            raise
        return record

    def update(self, record: StoredPayload) -> None:
        """Write back a record's state, info and quarantine entry."""
        with self._lock:
            self._db.execute(
                "UPDATE payloads SET state = ?, size = ?, wrapped_key = ?, info = ?, quarantine = ? "
                "WHERE payload_id = ?",
                (record.state, record.size, record.wrapped_key, record.info.SerializeToString(),
                 record.quarantine.SerializeToString() if record.quarantine is not None else None,
                 record.payload_id))

    def remove_bytes(self, record: StoredPayload) -> None:
        """Delete a payload's file and its data key; its catalogue row stays, for Stat."""
        (self.objects / record.payload_id).unlink(missing_ok=True)
        record.wrapped_key = None

    # -- reading -----------------------------------------------------------------

    def get(self, payload_id: str) -> StoredPayload | None:
        with self._lock:
            row = self._db.execute(
                "SELECT payload_id, tenant, state, size, created_ns, expires_ns, wrapped_key, info, quarantine "
                "FROM payloads WHERE payload_id = ?", (payload_id,)).fetchone()
        return None if row is None else _record(row)

    def held_bytes(self, tenant: str, now_ns: int) -> int:
        """Bytes the tenant keeps stored (available or quarantined, not expired)."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM payloads WHERE tenant = ? AND state IN (?, ?) "
                "AND (expires_ns = 0 OR expires_ns > ?)", (tenant, *_HELD, now_ns)).fetchone()
        return int(total)

    def next_expiry(self, tenant: str, now_ns: int) -> int | None:
        with self._lock:
            (first,) = self._db.execute(
                "SELECT MIN(expires_ns) FROM payloads WHERE tenant = ? AND state IN (?, ?) AND expires_ns > ?",
                (tenant, *_HELD, now_ns)).fetchone()
        return first

    def due_for_expiry(self, now_ns: int, limit: int = 1000) -> list[StoredPayload]:
        with self._lock:
            rows = self._db.execute(
                "SELECT payload_id, tenant, state, size, created_ns, expires_ns, wrapped_key, info, quarantine "
                "FROM payloads WHERE expires_ns > 0 AND expires_ns <= ? AND state IN (?, ?) LIMIT ?",
                (now_ns, *_HELD, limit)).fetchall()
        return [_record(row) for row in rows]

    def quarantined(self, tenant: str | None, after: str, limit: int) -> list[StoredPayload]:
        query = ("SELECT payload_id, tenant, state, size, created_ns, expires_ns, wrapped_key, info, quarantine "
                 "FROM payloads WHERE state = ? AND payload_id > ?")
        args: list = [pb.PAYLOAD_STATE_QUARANTINED, after]
        if tenant is not None:
            query += " AND tenant = ?"
            args.append(tenant)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY payload_id LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def mapped(self, record: StoredPayload) -> pa.Buffer:
        """A plain payload's bytes, memory-mapped: slice it for zero-copy ``pyarrow.Buffer`` pieces.

        The mapping lives as long as any slice of it; a payload deleted
        meanwhile stays readable through it until then, as a file would.
        """
        if record.size == 0:
            return pa.py_buffer(b"")
        with pa.memory_map(str(self.objects / record.payload_id), "r") as mapped:
            if mapped.size() != record.size:
                raise StoredDataCorrupt(f"payload {record.payload_id}: stored file holds {mapped.size()} "
                                        f"bytes, catalogue says {record.size}")
            return mapped.read_buffer(record.size)

    def segments(self, record: StoredPayload) -> Iterator[bytes]:
        """An encrypted payload's plaintext, one opened segment at a time."""
        cipher = SegmentCipher(self.master.unwrap(record.wrapped_key, record.payload_id), record.payload_id)
        records = -(-record.size // SEGMENT) if record.size else 0
        last = max(records - 1, 0)
        with open(self.objects / record.payload_id, "rb") as file:
            for index in range(last + 1):
                sealed = file.read(SEGMENT + TAG)
                yield cipher.open(index, sealed, index == last, record.payload_id)
            if file.read(1):
                raise StoredDataCorrupt(f"payload {record.payload_id}: stored file is longer than its records")


def _refuse_lost_catalogue(catalogue: Path, objects: Path) -> None:
    """Refuse to start on a missing or empty catalogue while object files exist.

    SQLite would take such a file for a new, empty catalogue: every stored
    payload would be NOT_FOUND and its file orphaned. (Checked before SQLite
    opens the file, which would also drop a write-ahead log beside an empty one.)
    """
    try:
        size = catalogue.stat().st_size
    except FileNotFoundError:
        size = None
    if size:
        return
    stored = sum(1 for _ in objects.iterdir())
    if stored:
        state = "missing" if size is None else "empty"
        raise SettingsError(f"data catalogue {catalogue} is {state} but {stored} object file(s) exist in "
                            f"{objects}: restore the catalogue from backup")


def _refusal(exc: OSError, root: Path) -> SettingsError:
    """A start-up refusal for a file or directory the store cannot use, naming it."""
    return SettingsError(f"data store: {exc.filename or root}: {exc.strerror or exc} (the server must be able "
                         f"to read and write {root})")


def _record(row) -> StoredPayload:
    payload_id, tenant, state, size, created_ns, expires_ns, wrapped_key, info, quarantine = row
    entry = None
    if quarantine is not None:
        entry = pb.QuarantinedPayload.FromString(quarantine)
        # Entries catalogued by earlier versions kept the producer's task
        # credential; it is never handed out, whatever the row still holds.
        entry.declared.ClearField("task_credential")
    return StoredPayload(
        payload_id=payload_id, tenant=tenant, state=state, size=size, created_ns=created_ns,
        expires_ns=expires_ns, wrapped_key=wrapped_key, info=pb.PayloadInfo.FromString(info), quarantine=entry)
