"""The engine on a real committer and SQLite store, without gRPC: admission rules that batching must not bend."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import struct_pb2

from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.call import CallContext
from planes.kernel.identity import Identity
from planes.kernel.tokens import SigningKey
from planes.plugins.execution.committer import Committer
from planes.plugins.execution.config import RunConfig
from planes.plugins.execution.engine import ConfigView, ExecutionEngine
from planes.plugins.execution.store import SqliteTaskStore


class _Evidence:
    """An evidence writer that keeps what it is given, and refuses the tenants in ``down``."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.down: set[str] = set()

    async def record(self, tenant, events):
        from planes.plugins.evidence.writer import EvidenceUnavailable

        if tenant in self.down:
            raise EvidenceUnavailable("evidence plane down")
        self.events += [(tenant, event.event_id) for event in events]


def _config(*resources) -> RunConfig:
    content = cpb.SnapshotContent()
    for tenant, kind, name, values in resources:
        spec = struct_pb2.Struct()
        spec.update(values)
        content.resources.add(tenant=tenant, kind=kind, name=name, spec=spec)
    return RunConfig(1, b"d", content)


def _call(tenant: str) -> CallContext:
    return CallContext(Identity("svc", tenant, frozenset({"service"})))


def _engine(tmp_path, config: RunConfig):
    store = SqliteTaskStore(tmp_path / "tasks.sqlite3")
    evidence = _Evidence()
    committer = Committer(store, evidence, evidence)
    engine = ExecutionEngine(committer, SigningKey.generate(), lambda: ConfigView(config, True, "ok"))
    return committer, engine, evidence, store


QUOTA_2 = ("acme", cpb.RESOURCE_KIND_QUOTA, "q", {"tasks": 2})


def test_one_call_past_the_tenants_task_quota_creates_none_of_its_tasks(run, tmp_path):
    committer, engine, _, store = _engine(tmp_path, _config(QUOTA_2))

    async def main():
        committer.start()
        try:
            with pytest.raises(errors.LimitExceeded) as refused:
                await engine.submit("acme", [pb.TaskSpec() for _ in range(10)], _call("acme"))
            created = await engine.submit("acme", [pb.TaskSpec() for _ in range(2)], _call("acme"))
            return refused.value, created
        finally:
            await committer.stop()
    refused, created = run(main())
    assert (refused.name, refused.limit, refused.actual) == ("tasks", 2, 10)
    assert "none were submitted" in refused.message
    assert [r.created for r in created] == [True, True], "the refused call took no room"
    assert store.count_unfinished("acme") == 2


def test_concurrent_calls_in_one_batch_share_the_tenants_task_quota(run, tmp_path):
    committer, engine, _, store = _engine(tmp_path, _config(QUOTA_2))

    async def main():
        committer.start()
        try:
            # Queued before the committer runs: one batch, none of it in the store yet.
            return await asyncio.gather(*(engine.submit("acme", [pb.TaskSpec()], _call("acme")) for _ in range(10)),
                                        return_exceptions=True)
        finally:
            await committer.stop()
    results = run(main())
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(admitted) == 2 and store.count_unfinished("acme") == 2
    assert all(isinstance(r, errors.LimitExceeded) and (r.limit, r.actual) == (2, 3) for r in refused)


# -- evidence-required work of several tenants in one batch ---------------------------------------

def test_one_tenants_evidence_outage_fails_only_its_work_and_evidence_names_only_what_happened(run, tmp_path):
    committer, engine, evidence, store = _engine(tmp_path, _config())
    evidence.down = {"beta"}

    async def main():
        committer.start()
        try:
            # Queued together: one batch, evidence-required work of two tenants.
            return await asyncio.gather(
                engine.submit("acme", [pb.TaskSpec(evidence_required=True)], _call("acme")),
                engine.submit("beta", [pb.TaskSpec(evidence_required=True)], _call("beta")),
                engine.submit("acme", [pb.TaskSpec(evidence_required=True)], _call("acme")),
                return_exceptions=True)
        finally:
            await committer.stop()
    first, beta, second = run(main())
    assert isinstance(beta, errors.EvidenceUnavailable)
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException), \
        "the tenant whose evidence was recorded is not refused"
    recorded = {event_id.split(":")[1] for _, event_id in evidence.events}
    assert recorded == {first[0].task.task_id, second[0].task.task_id}
    assert all(store.task(task_id) is not None for task_id in recorded), "no evidence of work that never happened"
    assert {tenant for tenant, _ in evidence.events} == {"acme"}
    assert store.count_unfinished("beta") == 0


def test_a_lease_across_tenants_passes_over_one_whose_evidence_is_down(run, tmp_path):
    committer, engine, evidence, store = _engine(tmp_path, _config())

    async def main():
        committer.start()
        try:
            submitted = {}
            for tenant in ("beta", "acme", "beta", "acme"):
                (reply,) = await engine.submit(tenant, [pb.TaskSpec(evidence_required=True)], _call(tenant))
                submitted.setdefault(tenant, []).append(reply.task.task_id)
            worker = await engine.register(pb.RegisterWorkerRequest(name="w", slots=8), "w-principal")
            evidence.down = {"beta"}
            evidence.events.clear()
            during = await engine.lease(pb.LeaseTasksRequest(worker_id=worker.worker_id, tenant="*", max_tasks=8),
                                        "w-principal")
            evidence.down = set()
            after = await engine.lease(pb.LeaseTasksRequest(worker_id=worker.worker_id, tenant="*", max_tasks=8),
                                       "w-principal")
            return submitted, during, after
        finally:
            await committer.stop()
    submitted, during, after = run(main())
    assert sorted(lease.task.task_id for lease in during.leases) == sorted(submitted["acme"])
    assert sorted(lease.task.task_id for lease in after.leases) == sorted(submitted["beta"])
    leased = [(tenant, event_id) for tenant, event_id in evidence.events if event_id.endswith(":4")]
    assert sorted(leased) == sorted([("acme", f"exec:{t}:4") for t in submitted["acme"]]
                                    + [("beta", f"exec:{t}:4") for t in submitted["beta"]])
    assert all(store.task(t).state == pb.TASK_STATE_LEASED for t in submitted["acme"] + submitted["beta"])
