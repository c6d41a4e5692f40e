"""Desired state on disk: resources with optimistic concurrency, and signed snapshots.

SQLite (WAL) under the state directory; a PostgreSQL backend implements the
same methods. Every write runs in one immediate transaction, so a version
check and its write cannot interleave with another writer's. Snapshots are
cut from all resources, serialized once, deterministically, and signed; the
revision counter only ever grows, rollbacks included.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound
from planes.kernel.tokens import SigningKey

from .schema import kind_name, validate
from .subscriber import SNAPSHOT_CONTEXT

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, spec BLOB NOT NULL, updated_ns INTEGER NOT NULL, updated_by TEXT NOT NULL,
    PRIMARY KEY (kind, tenant, name)
);
CREATE TABLE IF NOT EXISTS history (
    kind INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    operation TEXT NOT NULL, spec BLOB, updated_ns INTEGER NOT NULL, updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (revision INTEGER PRIMARY KEY, signed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def canonical_spec(spec: struct_pb2.Struct) -> bytes:
    return spec.SerializeToString(deterministic=True)


def digest_of(data: bytes) -> common_pb2.Digest:
    return common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256, value=hashlib.sha256(data).digest())


class ControlStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, read_only: bool = False):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self.read_only = read_only
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise FailedPrecondition(f"{what} refused: the control store is read-only (degraded); reads still work")

    def _row_to_resource(self, row) -> pb.Resource:
        kind, tenant, name, version, spec, updated_ns, updated_by = row
        message = struct_pb2.Struct.FromString(spec)
        return pb.Resource(kind=kind, tenant=tenant, name=name, resource_version=version, spec=message,
                           updated_at=timestamp_pb2.Timestamp(seconds=updated_ns // 10**9, nanos=updated_ns % 10**9),
                           updated_by=updated_by, spec_digest=digest_of(spec))

    # -- resources --------------------------------------------------------------

    def get(self, kind: int, tenant: str, name: str) -> pb.Resource:
        row = self.db.execute("SELECT * FROM resources WHERE kind = ? AND tenant = ? AND name = ?",
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
                self.db.execute(f"SELECT * FROM resources {where} ORDER BY kind, tenant, name", params)]

    def check_version(self, kind: int, tenant: str, name: str, expected_version: int) -> pb.Resource | None:
        """The current resource (None if absent) if ``expected_version`` matches it; else the error.

        0 means "create": an existing resource is ALREADY_EXISTS. Writes call
        it inside their transaction; callers may call it first to refuse early.
        """
        row = self.db.execute("SELECT * FROM resources WHERE kind = ? AND tenant = ? AND name = ?",
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
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.check_version(kind, tenant, name, expected_version)
            version = (before.resource_version if before else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (kind, tenant, name, version, body, now, actor))
            self.db.execute("INSERT INTO history VALUES (?, ?, ?, ?, 'put', ?, ?, ?)",
                            (kind, tenant, name, version, body, now, actor))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return before, self.get(kind, tenant, name)

    def delete(self, kind: int, tenant: str, name: str, expected_version: int, actor: str) -> pb.Resource:
        self._writable("deleting a resource")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.get(kind, tenant, name)
            self.check_version(kind, tenant, name, expected_version)
            self.db.execute("DELETE FROM resources WHERE kind = ? AND tenant = ? AND name = ?", (kind, tenant, name))
            self.db.execute("INSERT INTO history VALUES (?, ?, ?, ?, 'delete', NULL, ?, ?)",
                            (kind, tenant, name, before.resource_version, int(self.clock() * 1e9), actor))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return before

    # -- snapshots ----------------------------------------------------------------

    def counter(self, name: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    def set_counter(self, name: str, value: int) -> None:
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

    def publish(self, key: SigningKey | None, *, expected_revision: int, actor: str, validity: float = 86_400,
                lease: float = 300, on_lease_expiry: int = pb.LEASE_EXPIRY_POLICY_STOP_ADMITTING,
                required_contracts: list[common_pb2.ContractVersion] | None = None, message: str = "",
                content: bytes | None = None, source_revision: int = 0) -> pb.SignedSnapshot:
        """Cut, sign and store the next revision (of all resources, or of ``content``)."""
        self._writable("publishing")
        if key is None:
            raise FailedPrecondition("publishing refused: the control plane's signing key is unavailable")
        if validity <= 0 or lease <= 0:
            raise InvalidArgument("validity and lease must be positive")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            latest = self.latest_revision()
            if expected_revision != latest:
                raise Conflict(f"expected revision {expected_revision}, latest is {latest}; "
                               "someone published meanwhile")
            if content is None:
                resources = [self._row_to_resource(row) for row in
                             self.db.execute("SELECT * FROM resources ORDER BY kind, tenant, name")]
                content = pb.SnapshotContent(resources=resources).SerializeToString(deterministic=True)
                count = len(resources)
            else:
                count = len(pb.SnapshotContent.FromString(content).resources)
            now = self.clock()
            revision = latest + 1
            header = pb.Snapshot(
                revision=revision, content_digest=digest_of(content),
                not_before=timestamp_pb2.Timestamp(seconds=int(now)),
                expires_at=timestamp_pb2.Timestamp(seconds=int(now + validity)),
                lease=duration_pb2.Duration(seconds=int(lease)), on_lease_expiry=on_lease_expiry,
                required_contracts=required_contracts or [], key_id=key.kid,
                created_at=timestamp_pb2.Timestamp(seconds=int(now)), created_by=actor,
                source_revision=source_revision, message=message, resource_count=count,
            ).SerializeToString(deterministic=True)
            signed = pb.SignedSnapshot(snapshot=header, signature=key.private_key.sign(SNAPSHOT_CONTEXT + header),
                                       key_id=key.kid, content=content)
            self.db.execute("INSERT INTO snapshots VALUES (?, ?)", (revision, signed.SerializeToString()))
            self.db.execute("INSERT OR REPLACE INTO counters VALUES ('revision', ?)", (revision,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return signed

    def rollback(self, key: SigningKey | None, to_revision: int, *, expected_revision: int, actor: str,
                 **options) -> pb.SignedSnapshot:
        """Publish a NEW revision carrying ``to_revision``'s content; the counter never goes back."""
        old = self.snapshot(to_revision)
        return self.publish(key, expected_revision=expected_revision, actor=actor, content=old.content,
                            source_revision=to_revision, message=f"rollback to revision {to_revision}", **options)
