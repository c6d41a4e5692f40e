"""Durable execution state behind one interface: tasks, transitions, effects, workers.

:class:`TaskStore` is what the execution plane needs from a database; the
embedded default is :class:`SqliteTaskStore` (WAL, ``synchronous=FULL``). A
PostgreSQL backend implements the same methods so many kernel hosts share one
database. A store is used by one thread at a time (the plane's committer),
inside explicit transactions with a savepoint per operation, so one bad
request rolls back alone while its batch commits.

Tasks are kept as their protobuf ``Task`` plus the columns queries need
(state, queue order, lease expiry, idempotency key); every transition also
keeps the task as it became, which is what ``WatchTask`` replays.
"""

from __future__ import annotations

import abc
import sqlite3
from pathlib import Path

from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.secrets import ensure_private_dir

LEASED_STATES = (pb.TASK_STATE_LEASED, pb.TASK_STATE_RUNNING)
TERMINAL_STATES = (pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)


class TaskStore(abc.ABC):
    """The execution plane's durable state. Every write is inside :meth:`begin` ... :meth:`commit`."""

    # -- transactions ----------------------------------------------------------
    @abc.abstractmethod
    def begin(self) -> None: ...
    @abc.abstractmethod
    def commit(self) -> None: ...
    @abc.abstractmethod
    def rollback(self) -> None: ...
    @abc.abstractmethod
    def savepoint(self) -> None:
        """Mark the start of one operation inside the transaction."""
    @abc.abstractmethod
    def release(self) -> None:
        """Keep the operation's writes."""
    @abc.abstractmethod
    def undo(self) -> None:
        """Drop the operation's writes, keep the rest of the transaction."""

    # -- tasks -----------------------------------------------------------------
    @abc.abstractmethod
    def task(self, task_id: str) -> pb.Task | None: ...
    @abc.abstractmethod
    def by_idempotency_key(self, tenant: str, key: str) -> tuple[str, bytes] | None:
        """``(task_id, spec_digest)`` of the task submitted with this key, if any."""
    @abc.abstractmethod
    def write_tasks(self, inserts: list[tuple[pb.Task, bytes, int | None]],
                    updates: list[tuple[pb.Task, int | None]], transitions: list[tuple]) -> None:
        """Write a batch's changes: new tasks ``(task, spec_digest, enqueue)``, changed tasks
        ``(task, enqueue)`` and transitions ``(task_id, version, previous_state, reason, body)``.

        A truthy ``enqueue`` puts the task at the queue's tail, in list order.
        Transitions keep the task as it became, for WatchTask to replay.
        """
    @abc.abstractmethod
    def transitions(self, task_id: str, after_version: int) -> list[tuple[pb.Task, int, str]]:
        """``(task, previous_state, reason)`` for every version above ``after_version``, in order."""
    @abc.abstractmethod
    def queued(self, tenant: str | None, limit: int, exclude=frozenset()) -> list[pb.Task]:
        """Up to ``limit`` queued tasks in queue order, skipping ids in ``exclude``;
        ``tenant`` None for every tenant."""
    @abc.abstractmethod
    def expired_leases(self, now: float, limit: int) -> list[pb.Task]: ...
    @abc.abstractmethod
    def count_unfinished(self, tenant: str) -> int: ...

    # -- effects ---------------------------------------------------------------
    @abc.abstractmethod
    def effects(self, task_id: str) -> list[pb.Effect]: ...
    @abc.abstractmethod
    def effect(self, task_id: str, key: str) -> pb.Effect | None: ...
    @abc.abstractmethod
    def put_effect(self, task_id: str, effect: pb.Effect) -> None: ...

    # -- workers ---------------------------------------------------------------
    @abc.abstractmethod
    def put_worker(self, worker_id: str, principal: str, tenant: str, name: str, registered_at: float) -> None: ...
    @abc.abstractmethod
    def worker(self, worker_id: str) -> tuple[str, str, str] | None:
        """``(principal, tenant, name)`` of a registered worker."""

    @abc.abstractmethod
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  spec_digest BLOB NOT NULL,
  state INTEGER NOT NULL,
  queue_seq INTEGER NOT NULL DEFAULT 0,
  lease_expires REAL NOT NULL DEFAULT 0,
  body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (tenant, idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (queue_seq) WHERE state = 4;
CREATE INDEX IF NOT EXISTS tasks_leases ON tasks (lease_expires) WHERE state IN (5, 6);
CREATE INDEX IF NOT EXISTS tasks_tenant_state ON tasks (tenant, state);
CREATE TABLE IF NOT EXISTS transitions (
  task_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  previous_state INTEGER NOT NULL,
  reason TEXT NOT NULL,
  body BLOB NOT NULL,
  PRIMARY KEY (task_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS effects (
  task_id TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  seq INTEGER NOT NULL,
  body BLOB NOT NULL,
  PRIMARY KEY (task_id, idempotency_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers (
  worker_id TEXT PRIMARY KEY,
  principal TEXT NOT NULL,
  tenant TEXT NOT NULL,
  name TEXT NOT NULL,
  registered_at REAL NOT NULL
);
"""


class SqliteTaskStore(TaskStore):
    """The embedded default: one SQLite file in WAL mode, fsynced at every commit."""

    def __init__(self, path: Path, *, synchronous: str = "FULL"):
        ensure_private_dir(path.parent)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)
        row = self._db.execute("SELECT COALESCE(MAX(queue_seq), 0) FROM tasks").fetchone()
        self._queue_seq = int(row[0])
        self._effect_seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM effects").fetchone()[0])

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def savepoint(self) -> None:
        self._db.execute("SAVEPOINT op")

    def release(self) -> None:
        self._db.execute("RELEASE op")

    def undo(self) -> None:
        self._db.execute("ROLLBACK TO op")
        self._db.execute("RELEASE op")

    def task(self, task_id: str) -> pb.Task | None:
        row = self._db.execute("SELECT body FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return pb.Task.FromString(row[0]) if row else None

    def by_idempotency_key(self, tenant: str, key: str) -> tuple[str, bytes] | None:
        row = self._db.execute("SELECT task_id, spec_digest FROM tasks WHERE tenant = ? AND idempotency_key = ?",
                               (tenant, key)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def _lease_expiry(self, task: pb.Task) -> float:
        if task.state in LEASED_STATES:
            return task.lease_expires_at.seconds + task.lease_expires_at.nanos / 1e9
        return 0.0

    def write_tasks(self, inserts, updates, transitions) -> None:
        rows = []
        for task, digest, enqueue in inserts:
            seq = 0
            if enqueue:
                self._queue_seq += 1
                seq = self._queue_seq
            rows.append((task.task_id, task.tenant, task.spec.idempotency_key, digest, task.state, seq,
                         self._lease_expiry(task), task.SerializeToString()))
        if rows:
            self._db.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        plain, queued = [], []
        for task, enqueue in updates:
            if enqueue:
                self._queue_seq += 1
                queued.append((task.state, self._queue_seq, self._lease_expiry(task), task.SerializeToString(),
                               task.task_id))
            else:
                plain.append((task.state, self._lease_expiry(task), task.SerializeToString(), task.task_id))
        if plain:
            self._db.executemany("UPDATE tasks SET state = ?, lease_expires = ?, body = ? WHERE task_id = ?", plain)
        if queued:
            self._db.executemany("UPDATE tasks SET state = ?, queue_seq = ?, lease_expires = ?, body = ? "
                                 "WHERE task_id = ?", queued)
        if transitions:
            self._db.executemany("INSERT INTO transitions VALUES (?, ?, ?, ?, ?)", transitions)

    def transitions(self, task_id: str, after_version: int) -> list[tuple[pb.Task, int, str]]:
        rows = self._db.execute("SELECT body, previous_state, reason FROM transitions WHERE task_id = ? "
                                "AND version > ? ORDER BY version", (task_id, after_version)).fetchall()
        return [(pb.Task.FromString(body), previous, reason) for body, previous, reason in rows]

    def queued(self, tenant: str | None, limit: int, exclude=frozenset()) -> list[pb.Task]:
        if tenant is None:
            rows = self._db.execute("SELECT task_id, body FROM tasks WHERE state = 4 ORDER BY queue_seq LIMIT ?",
                                    (limit + len(exclude),))
        else:
            rows = self._db.execute("SELECT task_id, body FROM tasks WHERE state = 4 AND tenant = ? "
                                    "ORDER BY queue_seq LIMIT ?", (tenant, limit + len(exclude)))
        found = []
        for task_id, body in rows:  # parse only the rows kept
            if task_id in exclude:
                continue
            found.append(pb.Task.FromString(body))
            if len(found) == limit:
                break
        return found

    def expired_leases(self, now: float, limit: int) -> list[pb.Task]:
        rows = self._db.execute("SELECT body FROM tasks WHERE state IN (5, 6) AND lease_expires < ? "
                                "ORDER BY lease_expires LIMIT ?", (now, limit)).fetchall()
        return [pb.Task.FromString(row[0]) for row in rows]

    def count_unfinished(self, tenant: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tasks WHERE tenant = ? AND state NOT IN (7, 8, 9)",
                                (tenant,)).fetchone()[0]

    def effects(self, task_id: str) -> list[pb.Effect]:
        rows = self._db.execute("SELECT body FROM effects WHERE task_id = ? ORDER BY seq", (task_id,)).fetchall()
        return [pb.Effect.FromString(row[0]) for row in rows]

    def effect(self, task_id: str, key: str) -> pb.Effect | None:
        row = self._db.execute("SELECT body FROM effects WHERE task_id = ? AND idempotency_key = ?",
                               (task_id, key)).fetchone()
        return pb.Effect.FromString(row[0]) if row else None

    def put_effect(self, task_id: str, effect: pb.Effect) -> None:
        self._effect_seq += 1
        self._db.execute("INSERT INTO effects VALUES (?, ?, ?, ?) ON CONFLICT (task_id, idempotency_key) "
                         "DO UPDATE SET body = excluded.body",
                         (task_id, effect.idempotency_key, self._effect_seq, effect.SerializeToString()))

    def put_worker(self, worker_id: str, principal: str, tenant: str, name: str, registered_at: float) -> None:
        self._db.execute("INSERT INTO workers VALUES (?, ?, ?, ?, ?)",
                         (worker_id, principal, tenant, name, registered_at))

    def worker(self, worker_id: str) -> tuple[str, str, str] | None:
        row = self._db.execute("SELECT principal, tenant, name FROM workers WHERE worker_id = ?",
                               (worker_id,)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def close(self) -> None:
        self._db.close()
