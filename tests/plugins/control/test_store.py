"""Desired-state store: validation, optimistic concurrency, signed snapshots, rollback, degraded mode."""

from __future__ import annotations

import sqlite3

import blake3
import pytest
from google.protobuf import json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.tokens import SigningKey
from planes.plugins.control.store import ControlStore
from planes.plugins.control.subscriber import CachedConfig, ConfigState, verify_snapshot

ROUTE = pb.RESOURCE_KIND_MODEL_ROUTE


def spec(**fields) -> struct_pb2.Struct:
    return json_format.ParseDict(fields, struct_pb2.Struct())


GOOD_ROUTE = spec(adapter="echo", allowed_classifications=["public", "internal"])


class Clock:
    now = 1_800_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    opened = ControlStore(tmp_path / "control.sqlite3", clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def key():
    return SigningKey.generate()


def test_create_replace_and_delete_with_versions(store):
    before, created = store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    assert before is None and created.resource_version == 1 and created.updated_by == "alice"
    changed = spec(adapter="openai", allowed_classifications=["public"])
    before, replaced = store.put(ROUTE, "acme", "gpt", changed, 1, "bob")
    assert before.resource_version == 1 and replaced.resource_version == 2
    assert before.spec_digest.value != replaced.spec_digest.value
    assert store.delete(ROUTE, "acme", "gpt", 2, "bob").resource_version == 2
    with pytest.raises(errors.NotFound):
        store.get(ROUTE, "acme", "gpt")
    operations = store.db.execute("SELECT operation, version FROM history ORDER BY rowid").fetchall()
    assert operations == [("put", 1), ("put", 2), ("delete", 2)]


def test_stale_writes_are_aborted_and_change_nothing(store):
    store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 1, "alice")
    with pytest.raises(errors.Conflict) as stale:
        store.put(ROUTE, "acme", "gpt", spec(adapter="x", allowed_classifications=[]), 1, "mallory")
    assert stale.value.code.name == "ABORTED"
    assert "expected version 1, current is 2" in stale.value.message
    with pytest.raises(errors.AlreadyExists):
        store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "mallory")
    with pytest.raises(errors.Conflict):
        store.delete(ROUTE, "acme", "gpt", 1, "mallory")
    current = store.get(ROUTE, "acme", "gpt")
    assert current.resource_version == 2 and current.spec.fields["adapter"].string_value == "echo"


@pytest.mark.parametrize(("kind", "tenant", "name", "body", "message"), [
    (ROUTE, "acme", "gpt", spec(adapter="echo"), "field 'allowed_classifications' is required"),
    (ROUTE, "acme", "gpt", spec(adapter=3, allowed_classifications=[]), "field 'adapter' must be a string"),
    (ROUTE, "acme", "gpt", spec(adapter="e", allowed_classifications=["secret"]),
     "has 'secret'; allowed: public, internal, confidential, restricted"),
    (ROUTE, "acme", "gpt", spec(adapter="e", allowed_classifications=[], colour="red"),
     "unknown field 'colour'; fields of a model_route:"),
    (ROUTE, "acme", "bad name!", GOOD_ROUTE, "name must be"),
    (ROUTE, "*", "gpt", GOOD_ROUTE, "belongs to one tenant"),
    (pb.RESOURCE_KIND_TENANT, "acme", "acme", spec(), "is global; write it with tenant '*'"),
    (pb.RESOURCE_KIND_IDENTITY_MAPPING, "acme", "m1", spec(principal="p", roles=["root"]), "has 'root'"),
    (pb.RESOURCE_KIND_QUOTA, "acme", "q", spec(), "set at least one of tasks, tokens, bytes"),
    (pb.RESOURCE_KIND_RETENTION_RULE, "acme", "r", spec(event_type="x", seconds=-1), "must not be negative"),
    (pb.RESOURCE_KIND_UNSPECIFIED, "acme", "x", spec(), "kind must be one of"),
])
def test_validation_errors_say_what_to_fix(store, kind, tenant, name, body, message):
    with pytest.raises(errors.InvalidArgument) as refused:
        store.put(kind, tenant, name, body, 0, "alice")
    assert message in refused.value.message
    assert store.list() == []


def test_publish_signs_a_snapshot_the_subscriber_accepts(store, key, clock, tmp_path):
    store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    store.put(pb.RESOURCE_KIND_TENANT, "*", "acme", spec(display_name="Acme"), 0, "alice")
    first = store.publish(key, expected_revision=0, actor="alice", lease=60, message="initial")
    header = verify_snapshot(first, {key.kid: key.public_key}, clock.now).header
    assert (header.revision, header.resource_count, header.created_by) == (1, 2, "alice")
    assert header.content_digest.algorithm == common_pb2.DIGEST_ALGORITHM_BLAKE3
    assert header.content_digest.value == blake3.blake3(first.content).digest()
    names = [r.name for r in pb.SnapshotContent.FromString(first.content).resources]
    assert names == ["acme", "gpt"], "ordered by kind, tenant, name"
    cache = CachedConfig(tmp_path / "sub", {key.kid: key.public_key}, clock=clock)
    assert cache.offer(first).revision == 1 and cache.state()[0] is ConfigState.ACTIVE
    with pytest.raises(errors.Conflict, match="latest is 1"):
        store.publish(key, expected_revision=0, actor="bob")


def test_rollback_publishes_a_new_revision_with_old_content(store, key, clock, tmp_path):
    store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    store.publish(key, expected_revision=0, actor="alice")
    store.put(ROUTE, "acme", "gpt", spec(adapter="broken", allowed_classifications=[]), 1, "alice")
    store.publish(key, expected_revision=1, actor="alice")
    rolled = store.rollback(key, 1, expected_revision=2, actor="alice")
    header = verify_snapshot(rolled, {key.kid: key.public_key}, clock.now).header
    assert (header.revision, header.source_revision) == (3, 1)
    assert rolled.content == store.snapshot(1).content
    assert store.latest_revision() == 3
    cache = CachedConfig(tmp_path / "sub", {key.kid: key.public_key}, clock=clock)
    cache.offer(store.snapshot(2))
    assert cache.offer(rolled).revision == 3, "a rollback is a newer revision, so subscribers take it"


def test_rollback_to_revision_0_is_refused_not_read_as_the_latest(store, key):
    store.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    store.publish(key, expected_revision=0, actor="alice")
    with pytest.raises(errors.InvalidArgument, match=r"to_revision must name a published revision \(1 or more\), got 0"):
        store.rollback(key, 0, expected_revision=1, actor="alice")
    assert store.latest_revision() == 1, "nothing was published"


def test_degraded_store_blocks_privileged_changes_but_reads_work(tmp_path, key, clock):
    path = tmp_path / "control.sqlite3"
    writable = ControlStore(path, clock=clock)
    writable.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    writable.publish(key, expected_revision=0, actor="alice")
    writable.close()
    degraded = ControlStore(path, clock=clock, read_only=True)
    for attempt in (lambda: degraded.put(ROUTE, "acme", "x", GOOD_ROUTE, 0, "a"),
                    lambda: degraded.delete(ROUTE, "acme", "gpt", 1, "a"),
                    lambda: degraded.publish(key, expected_revision=1, actor="a")):
        with pytest.raises(errors.FailedPrecondition, match="read-only"):
            attempt()
    assert degraded.get(ROUTE, "acme", "gpt").resource_version == 1
    assert degraded.snapshot().key_id == key.kid
    with pytest.raises(errors.FailedPrecondition, match="signing key is unavailable"):
        ControlStore(path, clock=clock).publish(None, expected_revision=1, actor="a")


def _cut_by_parsing(store) -> bytes:
    """The snapshot content as decoding and re-encoding every resource makes it."""
    return pb.SnapshotContent(resources=store.list()).SerializeToString(deterministic=True)


def test_a_cut_joins_stored_encodings_into_the_same_bytes_as_re_encoding(store, key):
    store.put(pb.RESOURCE_KIND_TENANT, "*", "acme", spec(display_name="Acme"), 0, "alice")
    for index in range(300):  # long enough names and specs that some lengths need two varint bytes
        store.put(ROUTE, "acme", f"route-{index:03}", spec(adapter="e" * index, allowed_classifications=["public"]),
                  0, "alice")
    store.put(ROUTE, "acme", "route-007", GOOD_ROUTE, 1, "bob")
    store.delete(ROUTE, "acme", "route-100", 1, "bob")
    signed = store.publish(key, expected_revision=0, actor="alice")
    assert signed.content == _cut_by_parsing(store)
    assert pb.Snapshot.FromString(signed.snapshot).resource_count == 300


def test_a_store_from_before_encodings_were_kept_is_upgraded_on_open(tmp_path, key, clock):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript("""
        CREATE TABLE resources (kind INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL,
            version INTEGER NOT NULL, spec BLOB NOT NULL, updated_ns INTEGER NOT NULL, updated_by TEXT NOT NULL,
            PRIMARY KEY (kind, tenant, name));""")
    old.execute("INSERT INTO resources VALUES (?, 'acme', 'gpt', 1, ?, 5, 'alice')",
                (ROUTE, GOOD_ROUTE.SerializeToString(deterministic=True)))
    old.close()
    upgraded = ControlStore(path, clock=clock)
    assert upgraded.publish(key, expected_revision=0, actor="a").content == _cut_by_parsing(upgraded)
    assert upgraded.get(ROUTE, "acme", "gpt").updated_by == "alice"


def test_rollouts_and_subscriber_reports_survive_reopening(tmp_path, clock):
    path = tmp_path / "control.sqlite3"
    first = ControlStore(path, clock=clock)
    rollout = pb.Rollout(rollout_id="r1", revision=2, base_revision=1, canary_subscribers=["h1"],
                         state=pb.ROLLOUT_STATE_CANARY)
    rollout.started_at.seconds = 100
    status = pb.SubscriberStatus(subscriber_id="h1", applied_revision=1, last_outcome=pb.APPLY_OUTCOME_NACK,
                                 nack_reason=pb.NACK_REASON_MISSING_CONTRACT, error="needs execution 1.2")
    with pytest.raises(RuntimeError):
        with first.transaction():
            first.save_rollout(rollout)
            first.save_subscriber(status)
            raise RuntimeError("crash before commit")
    assert first.rollouts() == [] and first.subscribers() == [], "a failed transaction leaves nothing"
    with first.transaction():
        first.save_rollout(rollout)
        first.save_subscriber(status)
    first.bind_subscriber("h1", "host-1")
    first.bind_subscriber("h1", "someone-else")  # the first binding stays
    first.close()
    reopened = ControlStore(path, clock=clock, read_only=True)
    assert reopened.rollouts() == [rollout] and reopened.subscribers() == [status]
    assert reopened.subscriber_owners() == {"h1": "host-1"}
    with pytest.raises(errors.FailedPrecondition, match="read-only"):
        reopened.bind_subscriber("h2", "host-2")
    with pytest.raises(errors.FailedPrecondition, match="read-only"):
        reopened.save_rollout(rollout)


# -- the database refusing writes -----------------------------------------------------------------------

def test_a_full_database_refuses_a_publish_keeps_nothing_and_takes_the_retry(store, key):
    for index in range(40):
        store.put(ROUTE, "acme", f"route-{index:03d}", spec(adapter="e" * 80, allowed_classifications=["public"]),
                  0, "alice")
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's SQLITE_FULL, as on a full disk
    with pytest.raises(errors.Unavailable) as full:
        store.publish(key, expected_revision=0, actor="alice")
    assert full.value.message == "the control store cannot write: database or disk is full; nothing was changed"
    assert full.value.metadata == {"store_error": "SQLITE_FULL"}
    assert not store.db.in_transaction, "a failed write leaves no transaction open behind it"
    assert store.latest_revision() == 0 and store.counter("fleet") == 0
    store.db.execute("PRAGMA max_page_count = 1073741823")
    assert pb.Snapshot.FromString(store.publish(key, expected_revision=0, actor="alice").snapshot).revision == 1


def test_a_store_file_that_cannot_be_written_opens_read_only_and_says_why(tmp_path, clock, monkeypatch):
    path = tmp_path / "control.sqlite3"
    ControlStore(path, clock=clock).close()
    # How SQLite opens a file its process may not write (chmod 400 as a non-root user, a read-only mount).
    monkeypatch.setattr(ControlStore, "_connect", lambda self: sqlite3.connect(
        f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False))
    opened = ControlStore(path, clock=clock)
    assert opened.read_only and opened.read_only_reason == "attempt to write a readonly database"
    with pytest.raises(errors.FailedPrecondition, match=r"read-only \(degraded; attempt to write a readonly"):
        opened.put(ROUTE, "acme", "gpt", GOOD_ROUTE, 0, "alice")
    assert opened.list() == [] and opened.latest_revision() == 0
    opened.close()


def test_the_write_probe_leaves_nothing_behind(tmp_path, clock):
    path = tmp_path / "control.sqlite3"
    opened = ControlStore(path, clock=clock)
    assert not opened.read_only and opened.read_only_reason == ""
    assert opened.db.execute("SELECT count(*) FROM counters").fetchone() == (0,)
    opened.close()


def test_a_file_that_is_not_a_store_is_named(tmp_path, clock):
    path = tmp_path / "control.sqlite3"
    path.write_bytes(b"not sqlite at all" * 300)
    with pytest.raises(errors.FailedPrecondition) as refused:
        ControlStore(path, clock=clock)
    assert refused.value.message == f"the control store {path} cannot be opened: file is not a database"
