"""Desired state on disk: resources with optimistic concurrency, signed snapshots, rollouts.

SQLite (WAL) under the state directory; a PostgreSQL backend implements the
same methods (:class:`DesiredStateStore`). Every write runs in one immediate
transaction, so a version check and its write cannot interleave with another
writer's; :meth:`ControlStore.transaction` joins several writes (a rollback
publish, the fleet's target and the rollout's new state) into one commit.

Each resource is stored with its deterministic ``Resource`` encoding, made
once when it is written, so cutting a snapshot concatenates those bytes
instead of decoding and re-encoding every resource. Snapshots are signed; the
revision counter only ever grows, rollbacks included. Rollouts and the
subscribers' last reports live here too, so a restarted control plane resumes
a canary and still shows who runs what.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import digests
from planes.kernel.errors import (AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound,
                                  PlanesError, Unavailable)
from planes.kernel.secrets import ensure_private_dir
from planes.kernel.tokens import SigningKey

from .schema import kind_name, validate
from .subscriber import SNAPSHOT_CONTEXT, content_digest

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, spec BLOB NOT NULL, updated_ns INTEGER NOT NULL, updated_by TEXT NOT NULL,
    encoded BLOB,
    PRIMARY KEY (kind, tenant, name)
);
CREATE TABLE IF NOT EXISTS history (
    kind INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    operation TEXT NOT NULL, spec BLOB, updated_ns INTEGER NOT NULL, updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (revision INTEGER PRIMARY KEY, signed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY, state INTEGER NOT NULL, started_ns INTEGER NOT NULL, rollout BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS subscribers (subscriber_id TEXT PRIMARY KEY, status BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS subscriber_owners (subscriber_id TEXT PRIMARY KEY, principal TEXT NOT NULL);
"""
RESOURCE_COLUMNS = "kind, tenant, name, version, spec, updated_ns, updated_by"
# Field 1 of SnapshotContent, length-delimited: the tag before each resource.
_RESOURCES_TAG = b"\x0a"

log = logging.getLogger(__name__)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(resource: pb.Resource) -> bytes:
    """The resource as one element of SnapshotContent.resources: tag, length, deterministic encoding."""
    encoded = resource.SerializeToString(deterministic=True)
    return _RESOURCES_TAG + _varint(len(encoded)) + encoded


def canonical_spec(spec: struct_pb2.Struct) -> bytes:
    return spec.SerializeToString(deterministic=True)


def digest_of(data: bytes) -> common_pb2.Digest:
    return digests.digest(digests.SHA256, data)


def _store_failure(exc: BaseException) -> bool:
    """An error of the database itself (full, read-only, locked, I/O, corrupt), not of the statement."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _sqlite_code(exc: sqlite3.Error) -> str:
    return getattr(exc, "sqlite_errorname", "") or type(exc).__name__


def cannot_write(exc: sqlite3.Error) -> Unavailable:
    """What a client is told when the store refuses a write: SQLite's own words, never a traceback.

    Its message is SQLite's fixed text ("database or disk is full"), never a value being written.
    """
    return Unavailable(f"the control store cannot write: {exc}; nothing was changed",
                       metadata={"store_error": _sqlite_code(exc)})


class DesiredStateStore(Protocol):
    """What the control plane needs from its store; :class:`ControlStore` is the SQLite one.

    Mutations raise FailedPrecondition while the store is read-only, Conflict
    (or AlreadyExists) on a stale expected version, NotFound for what is absent.
    """

    read_only: bool
    #: Why the store is read-only when nobody asked for it (the file is not writable), or "".
    read_only_reason: str

    def transaction(self) -> AbstractContextManager[None]: ...
    def get(self, kind: int, tenant: str, name: str) -> pb.Resource: ...
    def list(self, tenant: str | None = None, kind: int | None = None) -> list[pb.Resource]: ...
    def check_version(self, kind: int, tenant: str, name: str, expected_version: int) -> pb.Resource | None: ...
    def put(self, kind: int, tenant: str, name: str, spec: struct_pb2.Struct, expected_version: int,
            actor: str) -> tuple[pb.Resource | None, pb.Resource]: ...
    def delete(self, kind: int, tenant: str, name: str, expected_version: int, actor: str) -> pb.Resource: ...
    def counter(self, name: str, default: int = 0) -> int: ...
    def set_counter(self, name: str, value: int) -> None: ...
    def latest_revision(self) -> int: ...
    def snapshot(self, revision: int = 0) -> pb.SignedSnapshot: ...
    def prepare_snapshot(self, key: SigningKey | None, *, expected_revision: int, actor: str,
                         **options) -> pb.SignedSnapshot: ...
    def prepare_rollback(self, key: SigningKey | None, to_revision: int, *, expected_revision: int, actor: str,
                         **options) -> pb.SignedSnapshot: ...
    def commit_snapshot(self, signed: pb.SignedSnapshot) -> pb.SignedSnapshot: ...
    def publish(self, key: SigningKey | None, *, expected_revision: int, actor: str,
                **options) -> pb.SignedSnapshot: ...
    def rollback(self, key: SigningKey | None, to_revision: int, *, expected_revision: int, actor: str,
                 **options) -> pb.SignedSnapshot: ...
    def save_rollout(self, rollout: pb.Rollout) -> None: ...
    def rollouts(self) -> list[pb.Rollout]: ...
    def save_subscriber(self, status: pb.SubscriberStatus) -> None: ...
    def subscribers(self) -> list[pb.SubscriberStatus]: ...
    def bind_subscriber(self, subscriber_id: str, principal: str) -> None: ...
    def forget_subscriber(self, subscriber_id: str) -> None: ...
    def subscriber_owners(self) -> dict[str, str]: ...
    def close(self) -> None: ...


class ControlStore:
    """Errors opening the file name it (a FailedPrecondition); a write the database refuses (disk
    full, read-only, I/O) is Unavailable with SQLite's reason, and nothing of it is kept.

    A store file that cannot be written (its permissions, a read-only mount) is found at start-up
    by a write that is rolled back: the store then serves read-only, as with ``read_only``, and
    :attr:`read_only_reason` says why.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, read_only: bool = False):
        self.path = path
        self.clock = clock
        self.read_only = read_only
        self.read_only_reason = ""
        self._depth = 0
        self._checkpointer: sqlite3.Connection | None = None
        try:
            ensure_private_dir(path.parent)
            self.db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise FailedPrecondition(f"the control store {path} cannot be opened: {exc}") from exc
        try:
            self._open()
        except (PlanesError, sqlite3.Error) as exc:
            self.db.close()
            problem = getattr(exc, "message", None) or str(exc)
            raise FailedPrecondition(f"the control store {path} cannot be opened: {problem}") from exc

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)

    def _open(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = [row[1] for row in self.db.execute("PRAGMA table_info(resources)")]
        if "encoded" not in columns:  # a store from before encodings were kept
            with self.transaction():
                self.db.execute("ALTER TABLE resources ADD COLUMN encoded BLOB")
                for row in self.db.execute(f"SELECT {RESOURCE_COLUMNS} FROM resources").fetchall():
                    self.db.execute("UPDATE resources SET encoded = ? WHERE kind = ? AND tenant = ? AND name = ?",
                                    (_framed(self._row_to_resource(row)), *row[:3]))
        if not self.read_only:
            self.read_only_reason = self._write_problem()
            self.read_only = bool(self.read_only_reason)

    def _write_problem(self) -> str:
        """Why a write would be refused (the file or its mount is read-only), or "": a write, rolled back.

        Opening a read-only file succeeds and every read works, so without
        this the plane would serve and then fail each subscriber's watch on
        its bookkeeping. Only SQLite's "read-only" counts: a lock held by
        another writer, or a full disk, may pass, and a write then reports it.
        """
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO counters VALUES ('write-probe', 0)")
            finally:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if _sqlite_code(exc).startswith("SQLITE_READONLY") or "readonly" in str(exc):
                return str(exc)
        return ""

    def close(self) -> None:
        self.db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    def defer_checkpoints(self) -> None:
        """Stop commits from copying the WAL into the database; the caller runs :meth:`checkpoint`.

        SQLite otherwise checkpoints inside whichever commit crosses 1,000
        WAL pages: every ~20 publishes of a 1,000-resource snapshot, one
        publish took 10-17 ms instead of 5. The plane checkpoints on a worker
        thread after publishing instead.
        """
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                                 timeout=30)

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking writers (SQLite releases the GIL meanwhile).

        Runs on its own connection, so a worker thread may call it while the
        event loop uses the store.
        """
        if self._checkpointer is not None:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One immediate transaction, one commit; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _store_failure(exc):
                raise cannot_write(exc) from exc
            raise
        self._depth = 1
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            self._depth = 0
            # A failed COMMIT (disk full) may leave the transaction open, and then every later
            # BEGIN would fail: roll back whatever is left, so a retry after space is freed works.
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.warning("control store: rolling back after %s failed as well", type(exc).__name__)
            if isinstance(exc, sqlite3.Error) and _store_failure(exc):
                raise cannot_write(exc) from exc
            raise
        self._depth = 0

    def _writable(self, what: str) -> None:
        if self.read_only:
            why = f"; {self.read_only_reason}" if self.read_only_reason else ""
            raise FailedPrecondition(f"{what} refused: the control store is read-only (degraded{why}); "
                                     "reads still work")

    def _row_to_resource(self, row) -> pb.Resource:
        kind, tenant, name, version, spec, updated_ns, updated_by = row
        message = struct_pb2.Struct.FromString(spec)
        return pb.Resource(kind=kind, tenant=tenant, name=name, resource_version=version, spec=message,
                           updated_at=timestamp_pb2.Timestamp(seconds=updated_ns // 10**9, nanos=updated_ns % 10**9),
                           updated_by=updated_by, spec_digest=digest_of(spec))

    # -- resources --------------------------------------------------------------

    def get(self, kind: int, tenant: str, name: str) -> pb.Resource:
        row = self.db.execute(f"SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ? AND tenant = ? AND name = ?",
                              (kind, tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"{kind_name(kind)} {name!r} not found in tenant {tenant!r}")
        return self._row_to_resource(row)

    def list(self, tenant: str | None = None, kind: int | None = None) -> list[pb.Resource]:
        clauses, params = [], []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if kind:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return [self._row_to_resource(row) for row in
                self.db.execute(f"SELECT {RESOURCE_COLUMNS} FROM resources {where} ORDER BY kind, tenant, name",
                                params)]

    def check_version(self, kind: int, tenant: str, name: str, expected_version: int) -> pb.Resource | None:
        """The current resource (None if absent) if ``expected_version`` matches it; else the error.

        0 means "create": an existing resource is ALREADY_EXISTS. Writes call
        it inside their transaction; callers may call it first to refuse early.
        """
        row = self.db.execute(f"SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ? AND tenant = ? AND name = ?",
                              (kind, tenant, name)).fetchone()
        before = self._row_to_resource(row) if row else None
        current = before.resource_version if before else 0
        label = f"{kind_name(kind)} {name!r} in tenant {tenant!r}"
        if expected_version == 0 and before is not None:
            raise AlreadyExists(f"{label} exists at version {current}; send expected_resource_version "
                                f"{current} to replace it")
        if expected_version != current:
            raise Conflict(f"{label}: expected version {expected_version}, current is {current}; "
                           "read it again and retry")
        return before

    def put(self, kind: int, tenant: str, name: str, spec: struct_pb2.Struct, expected_version: int,
            actor: str) -> tuple[pb.Resource | None, pb.Resource]:
        """Create (expected_version 0) or replace at ``expected_version``; returns (before, after)."""
        self._writable("writing a resource")
        validate(kind, tenant, name, spec)
        body = canonical_spec(spec)
        now = int(self.clock() * 1e9)
        with self.transaction():
            before = self.check_version(kind, tenant, name, expected_version)
            version = (before.resource_version if before else 0) + 1
            after = self._row_to_resource((kind, tenant, name, version, body, now, actor))
            self.db.execute(f"INSERT OR REPLACE INTO resources ({RESOURCE_COLUMNS}, encoded) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (kind, tenant, name, version, body, now, actor, _framed(after)))
            self.db.execute("INSERT INTO history VALUES (?, ?, ?, ?, 'put', ?, ?, ?)",
                            (kind, tenant, name, version, body, now, actor))
        return before, after

    def delete(self, kind: int, tenant: str, name: str, expected_version: int, actor: str) -> pb.Resource:
        self._writable("deleting a resource")
        with self.transaction():
            before = self.get(kind, tenant, name)
            self.check_version(kind, tenant, name, expected_version)
            self.db.execute("DELETE FROM resources WHERE kind = ? AND tenant = ? AND name = ?", (kind, tenant, name))
            self.db.execute("INSERT INTO history VALUES (?, ?, ?, ?, 'delete', NULL, ?, ?)",
                            (kind, tenant, name, before.resource_version, int(self.clock() * 1e9), actor))
        return before

    # -- snapshots ----------------------------------------------------------------

    def counter(self, name: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    def set_counter(self, name: str, value: int) -> None:
        self._writable(f"setting {name}")
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, value))

    def latest_revision(self) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = 'revision'").fetchone()
        return row[0] if row else 0

    def snapshot(self, revision: int = 0) -> pb.SignedSnapshot:
        revision = revision or self.latest_revision()
        row = self.db.execute("SELECT signed FROM snapshots WHERE revision = ?", (revision,)).fetchone()
        if row is None:
            raise NotFound(f"no snapshot at revision {revision}")
        return pb.SignedSnapshot.FromString(row[0])

    def publish(self, key: SigningKey | None, *, expected_revision: int, actor: str,
                **options) -> pb.SignedSnapshot:
        """Cut, sign and store the next revision (of all resources, or of ``content``), in one transaction."""
        with self.transaction():
            return self.commit_snapshot(self.prepare_snapshot(key, expected_revision=expected_revision, actor=actor,
                                                              **options))

    def prepare_snapshot(self, key: SigningKey | None, *, expected_revision: int, actor: str,
                         validity: float = 86_400, lease: float = 300,
                         on_lease_expiry: int = pb.LEASE_EXPIRY_POLICY_STOP_ADMITTING,
                         required_contracts: list[common_pb2.ContractVersion] | None = None, message: str = "",
                         content: bytes | None = None, source_revision: int = 0) -> pb.SignedSnapshot:
        """Cut and sign the next revision (of all resources, or of ``content``) without storing it.

        The cut is one consistent read. :meth:`commit_snapshot` stores it,
        unless another revision was stored meanwhile; between the two a
        caller records what it is about to publish, digest included.
        """
        self._writable("publishing")
        if key is None:
            raise FailedPrecondition("publishing refused: the control plane's signing key is unavailable")
        if validity <= 0 or lease <= 0:
            raise InvalidArgument("validity and lease must be positive")
        latest = self.latest_revision()
        if expected_revision != latest:
            raise Conflict(f"expected revision {expected_revision}, latest is {latest}; someone published meanwhile")
        if content is None:
            content, count = self._cut()
        else:
            count = len(pb.SnapshotContent.FromString(content).resources)
        now = self.clock()
        header = pb.Snapshot(
            revision=latest + 1, content_digest=content_digest(content),
            not_before=timestamp_pb2.Timestamp(seconds=int(now)),
            expires_at=timestamp_pb2.Timestamp(seconds=int(now + validity)),
            lease=duration_pb2.Duration(seconds=int(lease)), on_lease_expiry=on_lease_expiry,
            required_contracts=required_contracts or [], key_id=key.kid,
            created_at=timestamp_pb2.Timestamp(seconds=int(now)), created_by=actor,
            source_revision=source_revision, message=message, resource_count=count,
        ).SerializeToString(deterministic=True)
        return pb.SignedSnapshot(snapshot=header, signature=key.private_key.sign(SNAPSHOT_CONTEXT + header),
                                 key_id=key.kid, content=content)

    def commit_snapshot(self, signed: pb.SignedSnapshot) -> pb.SignedSnapshot:
        """Store a prepared snapshot as the latest revision; Conflict if one was stored since it was cut."""
        self._writable("publishing")
        revision = pb.Snapshot.FromString(signed.snapshot).revision
        with self.transaction():
            latest = self.latest_revision()
            if revision != latest + 1:
                raise Conflict(f"revision {revision} was cut when revision {revision - 1} was the latest; "
                               f"now it is {latest}: someone published meanwhile")
            self.db.execute("INSERT INTO snapshots VALUES (?, ?)", (revision, signed.SerializeToString()))
            self.db.execute("INSERT OR REPLACE INTO counters VALUES ('revision', ?)", (revision,))
        return signed

    def _cut(self) -> tuple[bytes, int]:
        """SnapshotContent of every resource, deterministically: the stored framed encodings, joined."""
        framed = [row[0] for row in self.db.execute("SELECT encoded FROM resources ORDER BY kind, tenant, name")]
        return b"".join(framed), len(framed)

    def rollback(self, key: SigningKey | None, to_revision: int, *, expected_revision: int, actor: str,
                 **options) -> pb.SignedSnapshot:
        """Publish a NEW revision carrying ``to_revision``'s content; the counter never goes back."""
        with self.transaction():
            return self.commit_snapshot(self.prepare_rollback(key, to_revision, expected_revision=expected_revision,
                                                              actor=actor, **options))

    def prepare_rollback(self, key: SigningKey | None, to_revision: int, *, expected_revision: int, actor: str,
                         **options) -> pb.SignedSnapshot:
        """:meth:`prepare_snapshot` of ``to_revision``'s content, as a new revision.

        ``to_revision`` must be 1 or more: :meth:`snapshot` reads 0 as the
        latest, and a rollback to the latest would change nothing.
        """
        if to_revision < 1:
            raise InvalidArgument(f"to_revision must name a published revision (1 or more), got {to_revision}")
        options.setdefault("message", f"rollback to revision {to_revision}")
        return self.prepare_snapshot(key, expected_revision=expected_revision, actor=actor,
                                     content=self.snapshot(to_revision).content, source_revision=to_revision,
                                     **options)

    # -- rollouts and subscribers ---------------------------------------------------

    def save_rollout(self, rollout: pb.Rollout) -> None:
        self._writable("changing a rollout")
        started_ns = rollout.started_at.seconds * 10**9 + rollout.started_at.nanos
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?)",
                            (rollout.rollout_id, rollout.state, started_ns, rollout.SerializeToString()))

    def rollouts(self) -> list[pb.Rollout]:
        """Every rollout, oldest first."""
        return [pb.Rollout.FromString(row[0]) for row in
                self.db.execute("SELECT rollout FROM rollouts ORDER BY started_ns, rowid")]

    def save_subscriber(self, status: pb.SubscriberStatus) -> None:
        """The subscriber's last report, as the status view shows it (a process restart keeps it)."""
        self._writable("recording a subscriber's status")
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO subscribers VALUES (?, ?)",
                            (status.subscriber_id, status.SerializeToString()))

    def subscribers(self) -> list[pb.SubscriberStatus]:
        return [pb.SubscriberStatus.FromString(row[0]) for row in
                self.db.execute("SELECT status FROM subscribers ORDER BY subscriber_id")]

    def bind_subscriber(self, subscriber_id: str, principal: str) -> None:
        """Make ``principal`` the owner of ``subscriber_id``; the first binding stays (see ``Control``)."""
        self._writable("binding a subscriber")
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO subscriber_owners VALUES (?, ?)", (subscriber_id, principal))

    def forget_subscriber(self, subscriber_id: str) -> None:
        """Drop a subscriber's status and owner (it gave its place up to a new one; see ``Control``)."""
        self._writable("forgetting a subscriber")
        with self.transaction():
            self.db.execute("DELETE FROM subscribers WHERE subscriber_id = ?", (subscriber_id,))
            self.db.execute("DELETE FROM subscriber_owners WHERE subscriber_id = ?", (subscriber_id,))

    def subscriber_owners(self) -> dict[str, str]:
        """Subscriber id -> the principal that may report and watch as it."""
        return dict(self.db.execute("SELECT subscriber_id, principal FROM subscriber_owners"))
