"""The group committer on a real SQLite store: batching, undo of one operation, recovery after a failure."""

from __future__ import annotations

import asyncio

import pytest

from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.plugins.execution.committer import Committer
from planes.plugins.execution.store import SqliteTaskStore


class _Evidence:
    """An evidence writer that keeps what it is given, or fails as told."""

    def __init__(self):
        self.events = []
        self.failure: Exception | None = None

    async def record(self, tenant, events):
        if self.failure is not None:
            raise self.failure
        self.events.extend(events)


def _task(task_id: str) -> pb.Task:
    return pb.Task(task_id=task_id, tenant="acme", state=pb.TASK_STATE_QUEUED, version=1)


def test_one_failing_operation_is_undone_alone_and_a_broken_batch_leaves_the_store_usable(run, tmp_path):
    async def scenario():
        store = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        evidence = _Evidence()
        committer = Committer(store, evidence, evidence)
        committer.start()

        def insert(task_id):
            def op(tx):
                tx.insert_task(_task(task_id), b"d")
                return task_id
            return op

        def insert_then_fail(tx):
            tx.insert_task(_task("bad"), b"d")
            raise errors.InvalidArgument("no")

        results = await asyncio.gather(committer.run(insert("a")), committer.run(insert_then_fail),
                                       committer.run(insert("b")), return_exceptions=True)
        def register_with_required_evidence(tx):
            tx.store.put_worker("w", "p", "*", "n", 0.0)
            tx.emit("acme", epb.Event(event_id="x"), True)

        evidence.failure = RuntimeError("evidence plane bug")
        with pytest.raises(errors.Internal):
            await committer.run(register_with_required_evidence)
        evidence.failure = None
        after = await committer.run(insert("c"))
        found = await committer.run(lambda tx: [tx.task(t) is not None for t in ("a", "bad", "b", "c")])
        worker = await committer.run(lambda tx: tx.store.worker("w"))
        await committer.stop()
        store.close()
        return results, after, found, worker
    results, after, found, worker = run(scenario())
    assert results[0] == "a" and results[2] == "b" and isinstance(results[1], errors.InvalidArgument)
    assert after == "c"
    assert found == [True, False, True, True], "the failed operation left nothing; the others committed"
    assert worker is None, "the batch whose evidence failed was rolled back"


def test_evidence_required_events_of_several_tenants_are_never_recorded_for_undone_work(run, tmp_path):
    from planes.plugins.evidence.writer import EvidenceUnavailable

    class PerTenant(_Evidence):
        async def record(self, tenant, events):
            if tenant == "beta":
                raise EvidenceUnavailable("down")
            self.events.extend((tenant, e.event_id) for e in events)

    async def scenario():
        store = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        evidence = PerTenant()
        committer = Committer(store, evidence, evidence)
        committer.start()

        def insert(tenant, task_id, *, also=None):
            def op(tx):
                tx.insert_task(pb.Task(task_id=task_id, tenant=tenant, state=pb.TASK_STATE_QUEUED, version=1), b"d")
                tx.emit(tenant, epb.Event(event_id=f"exec:{task_id}:1"), True)
                if also:
                    tx.emit(also, epb.Event(event_id=f"exec:{task_id}:other"), True)
                return task_id
            return op

        results = await asyncio.gather(
            committer.run(insert("beta", "b1")), committer.run(insert("acme", "a1")),
            committer.run(insert("acme", "a2", also="gamma")), committer.run(insert("gamma", "g1")),
            return_exceptions=True)
        found = await committer.run(lambda tx: {t: tx.task(t) is not None for t in ("b1", "a1", "a2", "g1")})
        await committer.stop()
        store.close()
        return results, found, evidence.events
    (b1, a1, a2, g1), found, recorded = run(scenario())
    assert isinstance(b1, EvidenceUnavailable) and (a1, g1) == ("a1", "g1")
    # One operation with evidence-required events of two tenants could not be made all-or-nothing.
    assert isinstance(a2, errors.Internal)
    assert found == {"b1": False, "a1": True, "a2": False, "g1": True}
    assert sorted(recorded) == [("acme", "exec:a1:1"), ("gamma", "exec:g1:1")]
