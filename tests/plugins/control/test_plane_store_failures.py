"""When the control store fails under the plane: a full disk during a change, a file that cannot be
written, a file that cannot be read. Real SQLite failures, over real gRPC."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest
from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contracts import ControlPlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.plugins.control import STORE_FILE, ControlPlugin
from planes.plugins.control.plane import COMMIT_FAILED
from planes.plugins.control.store import ControlStore
from planes.plugins.evidence import EvidencePlugin
from tests.conftest import make_settings
from tests.plugins.control.test_plane import _events, _serve
from tests.plugins.control.test_plane_guards import _canary

ROUTE = pb.RESOURCE_KIND_MODEL_ROUTE


def _spec(note: str) -> struct_pb2.Struct:
    return json_format.ParseDict({"adapter": f"echo-{note}", "allowed_classifications": ["public"]},
                                 struct_pb2.Struct())


def _fields(event) -> dict[str, str]:
    return {f.name: f.string_value for f in event.fields}


def _disk_full(store: ControlStore) -> None:
    """SQLite's own limit: the database may not grow by one page, so the next write that needs one
    fails with SQLITE_FULL, "database or disk is full", as on a full filesystem."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")


def _space_freed(store: ControlStore) -> None:
    store.db.execute("PRAGMA max_page_count = 1073741823")


async def _routes(admin, count: int = 40) -> None:
    """Enough resources that a snapshot of them needs new pages to store."""
    for index in range(count):
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name=f"route-{index:03d}",
                                                       spec=_spec(f"{index:03d}-" + "x" * 60)), timeout=5)


# -- a commit that fails after its evidence record --------------------------------------------------

def test_a_publish_that_cannot_commit_is_recorded_as_failed_and_a_retry_publishes(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await _routes(admin)
        _disk_full(plugin.store)
        with pytest.raises(errors.Unavailable) as full:
            await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0, message="first"), timeout=5)
        latest_while_full = plugin.store.latest_revision()
        fleet_while_full = plugin.store.counter("fleet")
        _space_freed(plugin.store)
        published = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0, message="second"),
                                                 timeout=5)
        return full.value, latest_while_full, fleet_while_full, published, await _events(client)

    full, latest_while_full, fleet_while_full, published, events = _serve(run, tmp_path, scenario)
    assert full.message == "the control store cannot write: database or disk is full; nothing was changed"
    assert full.metadata["store_error"] == "SQLITE_FULL"
    assert (latest_while_full, fleet_while_full) == (0, 0), "nothing of the failed publish was kept"
    assert published.snapshot.revision == 1 and published.snapshot.message == "second"
    recorded = [e for e in events if e.event_type in ("config.published", COMMIT_FAILED)]
    assert [e.event_type for e in recorded] == ["config.published", COMMIT_FAILED, "config.published"]
    intent, failed, retried = recorded
    assert failed.corrects_event_id == intent.event_id
    assert failed.correlation.correlation_id == intent.correlation.correlation_id
    assert _fields(failed) == {"intent_event_id": intent.event_id, "intent_event_type": "config.published",
                               "error": "Unavailable", "reason": full.message, "store_error": "SQLITE_FULL"}
    assert _fields(intent)["message"] == "first" and _fields(retried)["message"] == "second"
    assert _fields(retried)["digest_after"] == published.snapshot.content_digest.value.hex()


def test_a_resource_write_that_cannot_commit_is_recorded_as_failed(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        _disk_full(plugin.store)
        # A spec larger than a page: storing it must grow the database.
        big = json_format.ParseDict({"adapter": "a" * 9000, "allowed_classifications": ["public"]},
                                    struct_pb2.Struct())
        with pytest.raises(errors.Unavailable, match="database or disk is full") as full:
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="big", spec=big),
                                     timeout=5)
        missing = plugin.store.list(tenant="acme")
        _space_freed(plugin.store)
        created = await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="big", spec=big),
                                           timeout=5)
        return full.value, missing, created, await _events(client, "acme")

    full, missing, created, events = _serve(run, tmp_path, scenario)
    assert missing == [] and created.resource.resource_version == 1
    assert [e.event_type for e in events] == ["config.resource.put", COMMIT_FAILED, "config.resource.put"]
    assert events[1].corrects_event_id == events[0].event_id
    assert events[1].correlation.tenant == "acme"
    assert _fields(events[1])["reason"] == full.message
    assert "a" * 100 not in str(_fields(events[1])), "the failure records the error, not the values written"


def test_a_promotion_that_cannot_commit_is_recorded_as_failed_and_the_canary_stays(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        rollout = await _canary(admin, client(ControlPlane, ("worker",)))
        plugin.store.db.execute("PRAGMA query_only = 1")  # every write refused, as by a read-only remount
        with pytest.raises(errors.Unavailable, match="readonly database"):
            await admin.promote_rollout(pb.PromoteRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)
        plugin.store.db.execute("PRAGMA query_only = 0")
        status = await admin.get_rollout_status(pb.GetRolloutStatusRequest(rollout_id=rollout.rollout_id),
                                                timeout=5)
        return status, plugin.store.counter("fleet"), plugin.store.rollouts(), await _events(client)

    status, fleet, stored, events = _serve(run, tmp_path, scenario)
    assert status.rollout.state == pb.ROLLOUT_STATE_CANARY and status.fleet_revision == 1 and fleet == 1
    assert [r.state for r in stored] == [pb.ROLLOUT_STATE_CANARY]
    assert [(s.subscriber_id, s.canary) for s in status.subscribers] == [("host-a", True)], \
        "the canary is still shown as one"
    promoted = [e for e in events if e.event_type == "rollout.promoted"]
    failed = [e for e in events if e.event_type == COMMIT_FAILED]
    assert len(promoted) == 1 and len(failed) == 1
    assert failed[0].corrects_event_id == promoted[0].event_id
    assert _fields(failed[0])["intent_event_type"] == "rollout.promoted"
    assert _fields(failed[0])["store_error"] == "SQLITE_READONLY"


# -- a store that cannot be written ---------------------------------------------------------------------

def _read_only_file(monkeypatch) -> None:
    """Open the store the way SQLite opens a file its process may not write (chmod 400 as a non-root
    user, a read-only mount): tests may run as root, where permissions would not stop a write."""
    def connect(self):
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
    monkeypatch.setattr(ControlStore, "_connect", connect)


def test_a_read_only_store_file_serves_watches_and_refuses_changes(run, tmp_path, monkeypatch, caplog):
    async def publish(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await _routes(admin, 2)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)

    _serve(run, tmp_path, publish)
    _read_only_file(monkeypatch)

    async def scenario(client, kernel, plugin):
        host = client(ControlPlane, ("service",), principal="host-a-svc")
        pushed = []
        for attempt in range(3):  # every watch, not just the first
            stream = host.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id=f"host-{attempt}"))
            pushed.append(await asyncio.wait_for(stream.__anext__(), 5))
            await stream.aclose()
        with pytest.raises(errors.FailedPrecondition) as refused:
            await client(ControlPlane, ("admin",)).publish_snapshot(
                pb.PublishSnapshotRequest(expected_revision=1), timeout=5)
        return pushed, refused.value, plugin.store.read_only, plugin.store.latest_revision()

    with caplog.at_level(logging.WARNING, logger="planes"):
        pushed, refused, read_only, latest = _serve(run, tmp_path, scenario)
    assert [p.snapshot.snapshot and p.target_revision for p in pushed] == [1, 1, 1]
    assert read_only and latest == 1
    assert "read-only" in refused.message and "attempt to write a readonly database" in refused.message
    path = str(tmp_path / STORE_FILE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(
        "planes.plugins.control")]
    assert len(warnings) == 1 and path in warnings[0] and "not writable" in warnings[0], warnings
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


def test_a_store_that_stops_taking_writes_still_serves_watches(run, tmp_path, caplog):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await _routes(admin, 2)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        plugin.store.db.execute("PRAGMA query_only = 1")  # the store refuses every write from now on
        host = client(ControlPlane, ("service",), principal="host-a-svc")
        pushed = []
        for attempt in range(3):
            stream = host.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id=f"host-{attempt}"))
            pushed.append(await asyncio.wait_for(stream.__anext__(), 5))
            await stream.aclose()
        with pytest.raises(errors.Unavailable, match="readonly database") as report:
            await host.report_status(pb.ReportStatusRequest(subscriber_id="host-0", applied_revision=1), timeout=5)
        plugin.store.db.execute("PRAGMA query_only = 0")
        return pushed, report.value, plugin.store.subscribers()

    with caplog.at_level(logging.WARNING, logger="planes"):
        pushed, report, stored = _serve(run, tmp_path, scenario)
    assert [p.target_revision for p in pushed] == [1, 1, 1]
    assert stored == [], "nothing was written while the store refused"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("planes.plugins.control")
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "attempt to write a readonly database" in warnings[0], warnings


# -- a store that cannot be read --------------------------------------------------------------------------

def _open_kernel(tmp_path):
    settings = make_settings(tmp_path)
    plugins = [EvidencePlugin(), ControlPlugin()]
    return Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "t", p) for p in plugins])).open()


def _made_store(tmp_path) -> ControlStore:
    store = ControlStore(tmp_path / STORE_FILE)
    for index in range(200):
        store.put(ROUTE, "acme", f"route-{index:03d}", _spec(f"{index:03d}-" + "y" * 200), 0, "admin")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return store


@pytest.mark.parametrize("damage", ["header", "page"])
def test_a_damaged_store_file_is_named_at_start_up(tmp_path, damage):
    store = _made_store(tmp_path)
    data = bytearray(store.path.read_bytes())
    if damage == "header":
        data[:100] = b"\xff" * 100
    else:  # the pages after the schema: the tables' contents
        page = int.from_bytes(data[16:18], "big")
        data[page:page * 6] = b"\xa5" * (page * 5)
    store.path.write_bytes(bytes(data))
    with pytest.raises(errors.PluginError) as refused:
        _open_kernel(tmp_path)
    assert refused.value.plugin == "control"
    assert str(store.path) in refused.value.message
    assert ("file is not a database" if damage == "header" else "malformed") in refused.value.message
