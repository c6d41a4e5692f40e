"""Durable storage of the evidence log: SQLite in WAL mode under the state directory.

One connection writes, from one thread; every appended batch is one
transaction (``synchronous=FULL``), so an acknowledged batch survives a
process kill or a power cut. Leaves are the source of truth; raw field values
and their salts live in their own table so they can be deleted (redaction,
retention) without touching a leaf.

A PostgreSQL backend implements the same :class:`EvidenceStore` methods.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    sequence       INTEGER PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    tenant         TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    time_ns        INTEGER NOT NULL,
    leaf           BLOB NOT NULL,
    leaf_hash      BLOB NOT NULL,
    chain_head     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_correlation ON events (tenant, correlation_id, sequence);
CREATE INDEX IF NOT EXISTS events_by_time ON events (tenant, time_ns);
CREATE TABLE IF NOT EXISTS field_values (
    sequence INTEGER NOT NULL,
    name     TEXT NOT NULL,
    salt     BLOB NOT NULL,
    value    BLOB NOT NULL,
    PRIMARY KEY (sequence, name)
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


class EvidenceStore(Protocol):
    """What the log needs from storage."""

    def head(self) -> tuple[int, bytes | None]: ...
    def append(self, events: list[tuple], values: list[tuple], meta: dict[str, bytes]) -> None: ...
    def known_event_ids(self, event_ids: Iterable[str]) -> dict[str, int]: ...


class SqliteEvidenceStore:
    """The embedded store: ``<state>/evidence/log.sqlite3``."""

    def __init__(self, path: Path, *, synchronous: str = "FULL"):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._write = self._connect(synchronous)
        self._write.executescript(SCHEMA)
        self._local = threading.local()
        self._synchronous = synchronous

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
        return connection

    def close(self) -> None:
        self._write.close()

    # -- writes (one thread) ----------------------------------------------

    def append(self, events: list[tuple], values: list[tuple], meta: dict[str, bytes]) -> None:
        """Store a batch in one transaction. ``events`` are rows in the order of :class:`StoredEvent`'s
        fields, ``values`` in the order of :class:`StoredValue`'s."""
        connection = self._write
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
            connection.executemany("INSERT INTO field_values VALUES (?, ?, ?, ?)", values)
            connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def delete_values(self, sequence: int, names: Iterable[str]) -> int:
        connection = self._write
        connection.execute("BEGIN IMMEDIATE")
        try:
            cursor = connection.executemany("DELETE FROM field_values WHERE sequence = ? AND name = ?",
                                            [(sequence, name) for name in names])
            connection.execute("COMMIT")
            return cursor.rowcount
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def expired_values(self, event_type: str, before_ns: int) -> dict[str, list[int]]:
        """Sequences, by tenant, of events of ``event_type`` older than ``before_ns`` that still hold values."""
        rows = self._read.execute(
            "SELECT DISTINCT e.tenant, e.sequence FROM events e JOIN field_values v ON v.sequence = e.sequence "
            "WHERE e.event_type = ? AND e.time_ns < ? ORDER BY e.sequence", (event_type, before_ns))
        found: dict[str, list[int]] = {}
        for tenant, sequence in rows:
            found.setdefault(tenant, []).append(sequence)
        return found

    def delete_all_values(self, sequences: list[int]) -> int:
        connection = self._write
        connection.execute("BEGIN IMMEDIATE")
        try:
            cursor = connection.executemany("DELETE FROM field_values WHERE sequence = ?",
                                            [(sequence,) for sequence in sequences])
            connection.execute("COMMIT")
            return cursor.rowcount
        except BaseException:
            connection.execute("ROLLBACK")
            raise

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
        row = self._read.execute("SELECT sequence, chain_head FROM events ORDER BY sequence DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, None)

    def known_event_ids(self, event_ids: Iterable[str]) -> dict[str, int]:
        ids = list(event_ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for event_id, sequence in self._read.execute(
                    f"SELECT event_id, sequence FROM events WHERE event_id IN ({marks})", chunk):
                found[event_id] = sequence
        return found

    def event(self, event_id: str) -> StoredEvent | None:
        row = self._read.execute("SELECT * FROM events WHERE event_id = ?", (event_id,)).fetchone()
        return StoredEvent(*row) if row else None

    def event_at(self, sequence: int) -> StoredEvent | None:
        row = self._read.execute("SELECT * FROM events WHERE sequence = ?", (sequence,)).fetchone()
        return StoredEvent(*row) if row else None

    def values(self, sequences: list[int]) -> dict[int, dict[str, StoredValue]]:
        found: dict[int, dict[str, StoredValue]] = {}
        for start in range(0, len(sequences), 500):
            chunk = sequences[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._read.execute(f"SELECT * FROM field_values WHERE sequence IN ({marks})", chunk):
                value = StoredValue(*row)
                found.setdefault(value.sequence, {})[value.name] = value
        return found

    def query(self, tenant: str, *, correlation_id: str = "", event_types: tuple[str, ...] = (),
              start_ns: int | None = None, end_ns: int | None = None, after_sequence: int = 0,
              limit: int = 1000) -> list[StoredEvent]:
        clauses, params = ["tenant = ?", "sequence > ?"], [tenant, after_sequence]
        if correlation_id:
            clauses.append("correlation_id = ?")
            params.append(correlation_id)
        if event_types:
            clauses.append(f"event_type IN ({','.join('?' * len(event_types))})")
            params.extend(event_types)
        if start_ns is not None:
            clauses.append("time_ns >= ?")
            params.append(start_ns)
        if end_ns is not None:
            clauses.append("time_ns < ?")
            params.append(end_ns)
        sql = f"SELECT * FROM events WHERE {' AND '.join(clauses)} ORDER BY sequence LIMIT ?"
        return [StoredEvent(*row) for row in self._read.execute(sql, (*params, limit))]

    def leaf_hashes(self, size: int) -> bytes:
        """The first ``size`` leaf hashes, concatenated."""
        rows = self._read.execute("SELECT leaf_hash FROM events WHERE sequence <= ? ORDER BY sequence", (size,))
        return b"".join(row[0] for row in rows)

    def scan(self, batch: int = 10_000) -> Iterator[list[StoredEvent]]:
        """Every event in order, in batches (for fsck)."""
        after = 0
        while True:
            rows = self._read.execute("SELECT * FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?",
                                      (after, batch)).fetchall()
            if not rows:
                return
            events = [StoredEvent(*row) for row in rows]
            yield events
            after = events[-1].sequence

    def checkpoint(self, tree_size: int = 0) -> tuple[int, bytes, bytes, str] | None:
        if tree_size:
            row = self._read.execute("SELECT * FROM checkpoints WHERE tree_size = ?", (tree_size,)).fetchone()
        else:
            row = self._read.execute("SELECT * FROM checkpoints ORDER BY tree_size DESC LIMIT 1").fetchone()
        return tuple(row) if row else None

    def checkpoint_at_or_after(self, tree_size: int) -> tuple[int, bytes, bytes, str] | None:
        row = self._read.execute("SELECT * FROM checkpoints WHERE tree_size >= ? ORDER BY tree_size LIMIT 1",
                                 (tree_size,)).fetchone()
        return tuple(row) if row else None

    def checkpoints(self) -> list[tuple[int, bytes, bytes, str]]:
        return [tuple(row) for row in self._read.execute("SELECT * FROM checkpoints ORDER BY tree_size")]
