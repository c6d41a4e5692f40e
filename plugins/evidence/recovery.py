"""What the writer checks when it opens the log, before it writes a byte.

The segment file holds the evidence; the SQLite index says how much of it
is committed. A crash between a segment's write and its index commit leaves
bytes past the committed end that nobody was told are stored: at most the
one segment in flight (:meth:`~.store.SqliteEvidenceStore.append` writes a
segment and waits for its commit before the next starts; the pipeline only
*encodes* ahead), so at most :data:`MAX_UNCOMMITTED` bytes. Anything else
means a file was lost, truncated or restored out of step with the other,
and the writer refuses to start rather than guess:

- a non-empty segment file beside a missing or empty index (which would
  make every byte of it look uncommitted);
- a segment file shorter than the committed end (appending on it would
  acknowledge events on top of a broken log);
- more bytes past the committed end than one segment can hold, or a whole
  segment there followed by the events after it (an index restored from an
  older backup: cutting that tail would drop acknowledged events).

A tail within the bound is moved aside, not deleted: copied to
``<segments>.uncommitted-<committed end>`` (0600, synced) before the file is
cut back. Nothing in it was acknowledged, so the log does not need it, but
an operator may want to see what a crash interrupted. A tail of zeros (the
padding after a page-aligned direct write) is simply cut.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
from pathlib import Path

from planes.kernel.errors import FailedPrecondition
from planes.kernel.files import DIRECT_ALIGN, align_up

from . import leaf as leaves

log = logging.getLogger(__name__)

#: The largest segment :meth:`~.store.SqliteEvidenceStore.append` writes (a batch's leaves, hashes and raw values);
#: a larger batch is refused before anything is written. 16 times the server's default message size.
MAX_SEGMENT_BYTES = 1 << 30
#: What a crash can leave past the committed end: the padding up to a page boundary before a direct write, and
#: one segment zero-padded to whole pages.
MAX_UNCOMMITTED = DIRECT_ALIGN + align_up(MAX_SEGMENT_BYTES)

_COPY_CHUNK = 1 << 20


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def refuse_a_missing_index(index: Path, segments: Path) -> None:
    """Refuse to open when the index is gone but the segment file holds evidence (checked before SQLite
    creates a new, empty index)."""
    held = file_size(segments)
    if held and file_size(index) is None:
        raise _lost_index(index, segments, held, "is missing")


def refuse_an_empty_index(connection: sqlite3.Connection, index: Path, segments: Path, index_bytes: int) -> None:
    """Refuse to open when the segment file holds evidence but the index knows no log at all.

    An index that was made for a log (its ``log_id``) but has no segment
    yet is not empty: a crash during the first append leaves it so, with a
    tail that :func:`set_aside_tail` handles. A format-1 index (``events``)
    holds the log itself; the segment file is rebuilt from it.
    """
    held = file_size(segments)
    if not held:
        return
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "events" in tables:
        return
    known = [table for table, sql in (("segments", "SELECT 1 FROM segments LIMIT 1"),
                                      ("checkpoints", "SELECT 1 FROM checkpoints LIMIT 1"),
                                      ("meta", "SELECT 1 FROM meta WHERE key = 'log_id'"))
             if table in tables and connection.execute(sql).fetchone()]
    if not known:
        raise _lost_index(index, segments, held, f"is empty ({index_bytes} bytes, no log in it)")


def _lost_index(index: Path, segments: Path, held: int, state: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"evidence segment file {segments} holds {held} bytes but its index {index} {state}: restore "
        f"{index.name} from backup, or move {segments.name} away to begin a new log; nothing was changed")


def refuse_a_short_segment_file(index: Path, segments: Path, committed_end: int) -> None:
    """Refuse to open when the index has committed bytes the segment file does not hold."""
    if not committed_end:
        return
    size = file_size(segments)
    if size is None or size < committed_end:
        state = "is missing" if size is None else f"is {size} bytes"
        raise FailedPrecondition(
            f"evidence segment file {segments} {state}, shorter than the {committed_end} bytes its index {index} "
            f"has committed (truncated, deleted or replaced): restore it from backup; nothing was changed")


def set_aside_tail(fd: int, index: Path, segments: Path, committed_end: int, next_sequence: int) -> Path | None:
    """Cut the segment file back to ``committed_end``, first copying a non-zero tail to a side file (returned).

    Refuses (nothing changed) a tail that a crash cannot leave: longer than
    one segment can be, or holding a whole segment of the events from
    ``next_sequence`` on and then the events after them (an index restored
    from an older backup looks like that; cutting the tail would drop
    acknowledged events).
    """
    size = os.fstat(fd).st_size
    tail = size - committed_end
    if tail <= 0:
        return None
    stale = (f"the index is older than the segment file; restore {index.name} from a backup that matches it, or "
             "move both away to begin a new log; nothing was changed")
    if tail > MAX_UNCOMMITTED:
        raise FailedPrecondition(
            f"evidence segment file {segments} is {size} bytes, {tail} past the {committed_end} its index {index} "
            f"has committed, more than the {MAX_UNCOMMITTED} a crash can leave (one segment in flight): {stale}")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
        second = _second_segment(data, committed_end, next_sequence)
    if second is not None:
        raise FailedPrecondition(
            f"evidence segment file {segments} holds events {next_sequence} to {second} and more past the "
            f"{committed_end} bytes its index {index} has committed, more than the one segment a crash can leave: "
            f"{stale}")
    kept = None
    if not _zeros(fd, committed_end, size):
        kept = _copy_out(fd, segments, committed_end, size)
        log.warning("evidence segment file %s: %d bytes past the committed end %d were written but never "
                    "committed (a crash during an append; never acknowledged): moved to %s",
                    segments, tail, committed_end, kept)
    os.ftruncate(fd, committed_end)
    os.fsync(fd)
    return kept


def _second_segment(data, start: int, sequence: int) -> int | None:
    """When ``data`` holds, from ``start`` (or the next page), a whole segment of the events from ``sequence`` on
    and then a leaf of the event after them: that event's sequence. None otherwise (a crash tail)."""
    found = _segment_at(data, start, sequence) or _segment_at(data, align_up(start), sequence)
    if found is None:
        return None
    end, count = found
    following = sequence + count
    for at in (end, align_up(end)):
        if _leaf_sequence(data, at) == following:
            return following
    return None


def _leaf_sequence(data, at: int) -> int | None:
    if at + 12 > len(data) or data[at:at + 4] != leaves.MAGIC:
        return None
    return int.from_bytes(data[at + 4:at + 12], "big")


def _segment_at(data, at: int, sequence: int) -> tuple[int, int] | None:
    """(end, event count) of the whole segment at ``at`` whose leaves run from ``sequence`` (see
    :func:`~.store.part_sizes`), or None when there is none."""
    size, start, count = len(data), at, 0
    while _leaf_sequence(data, at) == sequence + count:
        at = _leaf_end(data, at)
        if at is None:
            return None
        count += 1
    if not count or at + (count + 1) * 8 > size:
        return None
    if int.from_bytes(data[at:at + 8], "little") or int.from_bytes(data[at + count * 8:at + count * 8 + 8],
                                                                  "little") != at - start:
        return None
    at += (count + 1) * 8 + count * 72  # offsets, leaf hashes, chain heads, event-id hashes
    if at > size:
        return None
    while at + 12 <= size and sequence <= int.from_bytes(data[at:at + 8], "big") < sequence + count:
        at += 12 + int.from_bytes(data[at + 8:at + 12], "big")  # a raw value: sequence, name, salt, value
        for _ in range(2):
            if at + 4 > size:
                return None
            at += 4 + int.from_bytes(data[at:at + 4], "big")
        if at > size:
            return None
    return at, count


def _leaf_end(data, at: int) -> int | None:
    """Where the leaf at ``at`` ends (:mod:`.leaf`'s encoding), or None when it runs past the data."""
    size = len(data)

    def skip(at: int) -> int:  # a str or bytes: u32 length, then the bytes
        if at + 4 > size:
            raise IndexError
        return at + 4 + int.from_bytes(data[at:at + 4], "big")

    try:
        at += 12
        for _ in range(7):
            at = skip(at)
        at = skip(at + 8)  # time, event type
        at = skip(skip(at + 8))  # config revision, digest, corrects_event_id
        if at + 4 > size:
            return None
        fields = int.from_bytes(data[at:at + 4], "big")
        at += 4
        for _ in range(fields):
            at = skip(at) + 34  # name, classification, kind, commitment
            if at > size:
                return None
    except IndexError:
        return None
    return at if at <= size else None


def _zeros(fd: int, start: int, stop: int) -> bool:
    for at in range(start, stop, _COPY_CHUNK):
        if any(os.pread(fd, min(_COPY_CHUNK, stop - at), at)):
            return False
    return True


def _copy_out(fd: int, segments: Path, start: int, stop: int) -> Path:
    """Copy bytes ``[start, stop)`` to a new 0600 side file, synced with its directory; its path.

    A side file that already holds exactly these bytes (a start-up that
    stopped before cutting the file) is kept as it is.
    """
    base = segments.with_name(f"{segments.name}.uncommitted-{start}")
    for attempt in range(1000):
        side = base if not attempt else base.with_name(f"{base.name}.{attempt}")
        try:
            out = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if side.stat().st_size == stop - start and _same(fd, side, start, stop):
                return side
            continue
        try:
            for at in range(start, stop, _COPY_CHUNK):
                data = os.pread(fd, min(_COPY_CHUNK, stop - at), at)
                while data:
                    data = data[os.write(out, data):]
            os.fsync(out)
        finally:
            os.close(out)
        directory = os.open(side.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return side
    raise FailedPrecondition(f"cannot set aside the uncommitted tail of {segments}: {base}.* all taken")


def _same(fd: int, side: Path, start: int, stop: int) -> bool:
    with side.open("rb") as file:
        for at in range(start, stop, _COPY_CHUNK):
            if file.read(_COPY_CHUNK) != os.pread(fd, min(_COPY_CHUNK, stop - at), at):
                return False
    return True


def index_error(index: Path, exc: BaseException) -> FailedPrecondition:
    """A failure to open the index, as one line that names the file and what to do."""
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        return FailedPrecondition(f"evidence index {index} is damaged ({text}): restore it from backup")
    if "readonly" in text or isinstance(exc, PermissionError):
        return FailedPrecondition(f"evidence index {index} cannot be written ({text}): this user needs write "
                                  f"access to it and to its directory {index.parent} (SQLite adds -wal and -shm "
                                  "files beside it)")
    return FailedPrecondition(f"evidence index {index}: {type(exc).__name__}: {text}")
