"""The execution plane over real gRPC: submit, lifecycle, policy, approvals, fencing, the ledger."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import duration_pb2

from planes.common.v1 import common_pb2
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.plugins.execution.credentials import verify_credential
from planes.plugins.execution.policy import action_digest
from planes.kernel.tokens import key_id

from .conftest import spec, tool

async def _lease_one(workers, principal_worker_id=None, wait=2):
    if principal_worker_id is None:
        registered = await workers.register_worker(pb.RegisterWorkerRequest(tenant="*", name="manual", slots=4))
        principal_worker_id = registered.worker_id
    reply = await workers.lease_tasks(pb.LeaseTasksRequest(tenant="*", worker_id=principal_worker_id, max_tasks=1,
                                                           wait=duration_pb2.Duration(seconds=wait)))
    return principal_worker_id, reply.leases


def test_submit_is_idempotent_and_a_reused_key_is_refused(scenario):
    async def body(cluster):
        tasks = cluster.tasks()
        first = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), key="order-1")))
        again = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), key="order-1")))
        with pytest.raises(errors.AlreadyExists, match="order-1"):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("b", "noop"), key="order-1")))
        fetched = await tasks.get_task(pb.GetTaskRequest(task_id=first.task.task_id))
        return first, again, fetched
    first, again, fetched = scenario(body)
    assert first.created and not again.created
    assert again.task.task_id == first.task.task_id
    assert fetched.task.state == pb.TASK_STATE_QUEUED and fetched.task.version == first.task.version


def test_malformed_and_foreign_requests_get_typed_errors(scenario):
    async def body(cluster):
        tasks = cluster.tasks()
        with pytest.raises(errors.InvalidArgument, match="not in allowed_tools"):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), tools=[])))
        with pytest.raises(errors.InvalidArgument, match="no tool contract 'ghost'"):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "ghost"))))
        with pytest.raises(errors.InvalidArgument, match="appears twice"):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), tool("a", "noop"))))
        with pytest.raises(errors.VersionMismatch):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
                tool("a", "noop"), contract_version=common_pb2.ContractVersion(plane="execution", major=2))))
        with pytest.raises(errors.InvalidArgument, match="task 1: action 'x' names neither"):
            await tasks.submit_tasks(pb.SubmitTasksRequest(tasks=[spec(tool("a", "noop")),
                                                                  spec(pb.Action(action_id="x"))]))
        created = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        with pytest.raises(errors.PermissionDenied):
            await cluster.tasks(tenant="globex").get_task(pb.GetTaskRequest(tenant="acme",
                                                                            task_id=created.task.task_id))
        with pytest.raises(errors.NotFound):
            await cluster.tasks(tenant="globex").get_task(pb.GetTaskRequest(task_id=created.task.task_id))
        with pytest.raises(errors.PermissionDenied):
            await cluster.tasks(roles=("service",)).approve_task(pb.ApproveTaskRequest(task_id="x", action_id="y"))
        listed = await cluster.tasks().get_task(pb.GetTaskRequest(task_id=created.task.task_id))
        return listed
    assert scenario(body).task.state == pb.TASK_STATE_QUEUED


def test_lifecycle_is_durable_watched_and_in_evidence_with_the_revision(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        task_id = submitted.task.task_id
        worker_id, leases = await _lease_one(workers)
        lease = leases[0]
        beat = await workers.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, leases=[
            pb.LeaseProgress(task_id=task_id, attempt_epoch=lease.attempt_epoch, started=True)]))
        done = await workers.complete_task(pb.CompleteTaskRequest(tenant="acme", task_id=task_id,
                                                                  attempt_epoch=lease.attempt_epoch))
        changes = [c async for c in tasks.watch_task(pb.WatchTaskRequest(task_id=task_id))]
        later = [c async for c in tasks.watch_task(pb.WatchTaskRequest(task_id=task_id, after_version=4))]
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return cluster.plugin.cache.current.revision, lease, beat, done, changes, later, events
    revision, lease, beat, done, changes, later, events = scenario(body)
    assert lease.attempt_epoch == 1 and lease.config.revision == revision
    assert beat.leases[0].state == pb.LEASE_STATE_ACTIVE
    assert done.task.state == pb.TASK_STATE_COMPLETED
    states = [c.task.state for c in changes]
    assert states == [pb.TASK_STATE_ADMITTED, pb.TASK_STATE_POLICY_DECIDED, pb.TASK_STATE_QUEUED,
                      pb.TASK_STATE_LEASED, pb.TASK_STATE_RUNNING, pb.TASK_STATE_COMPLETED]
    assert [c.task.version for c in changes] == [1, 2, 3, 4, 5, 6]
    assert [c.task.version for c in later] == [5, 6]
    types = [e.event_type for e in events]
    assert types == ["request.admitted", "policy.decided", "task.queued", "task.leased", "task.running",
                     "task.completed"]
    assert all(e.config.revision == revision for e in events)


def test_policy_denies_transforms_and_holds_for_approval_bound_to_the_digest(scenario):
    async def body(cluster):
        tasks = cluster.tasks()
        operator = cluster.tasks(roles=("operator",), principal="alice")
        denied = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "danger"))))
        transformed = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "upper", text="secret"))))
        held = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "deploy", text="v2"))))
        task_id = held.task.task_id
        pending = held.task.pending_approvals[0]
        changed = pb.Action()
        changed.CopyFrom(pending.action)
        changed.tool.arguments.update({"text": "v3"})
        with pytest.raises(errors.FailedPrecondition, match="changed since it was shown"):
            await operator.approve_task(pb.ApproveTaskRequest(task_id=task_id, action_id="a",
                                                              action_digest=action_digest(changed)))
        still = await tasks.get_task(pb.GetTaskRequest(task_id=task_id))
        approved = await operator.approve_task(pb.ApproveTaskRequest(task_id=task_id, action_id="a",
                                                                     action_digest=pending.action_digest))
        with pytest.raises(errors.NotFound):
            await operator.approve_task(pb.ApproveTaskRequest(task_id=task_id, action_id="a",
                                                              action_digest=pending.action_digest))
        other = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "deploy", text="x"))))
        refused = await operator.deny_task(pb.DenyTaskRequest(
            task_id=other.task.task_id, action_id="a", action_digest=other.task.pending_approvals[0].action_digest,
            reason="not today"))
        risky = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "count", ledger="/x"),
                                                                       risk=pb.RISK_HIGH)))
        events = await cluster.events(held.task.spec.correlation.correlation_id)
        return denied, transformed, held, still, approved, refused, risky, events
    denied, transformed, held, still, approved, refused, risky, events = scenario(body)
    assert denied.task.state == pb.TASK_STATE_FAILED and denied.task.failure.code == "policy.denied"
    assert denied.task.policy.verdict == pb.POLICY_VERDICT_DENY and "baseline/no-danger" in denied.task.policy.rules
    assert transformed.task.policy.verdict == pb.POLICY_VERDICT_TRANSFORM
    assert transformed.task.spec.actions[0].tool.arguments["text"] == "redacted"
    assert transformed.task.state == pb.TASK_STATE_QUEUED
    assert held.task.state == pb.TASK_STATE_AWAITING_APPROVAL
    assert held.task.pending_approvals[0].action_digest.value == action_digest(held.task.spec.actions[0]).value
    assert still.task.state == pb.TASK_STATE_AWAITING_APPROVAL and not still.task.approvals
    assert approved.task.state == pb.TASK_STATE_QUEUED
    assert approved.approval.approver == "alice"
    assert approved.approval.action_digest == held.task.pending_approvals[0].action_digest
    assert refused.task.state == pb.TASK_STATE_FAILED and refused.task.failure.code == "approval.denied"
    assert risky.task.state == pb.TASK_STATE_AWAITING_APPROVAL
    granted = [e for e in events if e.event_type == "approval.granted"]
    assert len(granted) == 1
    fields = {f.name: f.string_value for f in granted[0].fields}
    assert fields["approver"] == "alice" and fields["action_id"] == "a"
    assert fields["action_digest"] == held.task.pending_approvals[0].action_digest.value.hex()


def test_a_stale_epoch_cannot_commit_after_its_lease_expired(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "count", ledger="/nowhere"))))
        task_id = submitted.task.task_id
        worker_id, (first,) = await _lease_one(workers)
        # No heartbeat: the 2 s lease expires and the reaper requeues the task.
        _, (second,) = await _lease_one(workers, worker_id, wait=10)
        action = first.task.spec.actions[0]
        stale = dict(tenant="acme", task_id=task_id, attempt_epoch=first.attempt_epoch)
        refusals = []
        for call in (
            workers.complete_task(pb.CompleteTaskRequest(**stale)),
            workers.fail_task(pb.FailTaskRequest(**stale, failure=pb.TaskFailure(code="x"))),
            workers.record_effect_intent(pb.RecordEffectIntentRequest(
                **stale, idempotency_key="k", action=action, action_digest=action_digest(action))),
        ):
            with pytest.raises(errors.FailedPrecondition) as raised:
                await call
            refusals.append(raised.value.message)
        beat = await workers.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, leases=[
            pb.LeaseProgress(task_id=task_id, attempt_epoch=first.attempt_epoch)]))
        now = await tasks.get_task(pb.GetTaskRequest(task_id=task_id))
        return first, second, refusals, beat, now
    first, second, refusals, beat, now = scenario(body)
    assert (first.attempt_epoch, second.attempt_epoch) == (1, 2)
    assert all("attempt epoch 1" in message and "stale" in message for message in refusals)
    assert beat.leases[0].state == pb.LEASE_STATE_LOST
    assert now.task.state == pb.TASK_STATE_LEASED and now.task.attempt_epoch == 2
    assert now.task.version == second.task.version, "the stale attempt changed nothing"


def test_effect_ledger_never_answers_proceed_twice(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "count", ledger="/nowhere"))))
        _, (lease,) = await _lease_one(workers)
        action = lease.task.spec.actions[0]
        base = dict(tenant="acme", task_id=lease.task.task_id, attempt_epoch=lease.attempt_epoch)
        digest = action_digest(action)
        with pytest.raises(errors.InvalidArgument, match="does not match"):
            await workers.record_effect_intent(pb.RecordEffectIntentRequest(
                **base, idempotency_key="k", action=action, action_digest=action_digest(pb.Action(action_id="z"))))
        with pytest.raises(errors.NotFound):
            await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
                **base, idempotency_key="never", state=pb.EFFECT_STATE_COMMITTED))
        first = await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            **base, idempotency_key="k", action=action, action_digest=digest))
        second = await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            **base, idempotency_key="k", action=action, action_digest=digest))
        with pytest.raises(errors.FailedPrecondition, match="unsettled"):
            await workers.complete_task(pb.CompleteTaskRequest(**base))
        with pytest.raises(errors.InvalidArgument, match="not an outcome"):
            await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
                **base, idempotency_key="k", state=pb.EFFECT_STATE_INTENDED))
        settled = await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
            **base, idempotency_key="k", state=pb.EFFECT_STATE_COMMITTED, notes={"isolation": "in-process"}))
        repeated = await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
            **base, idempotency_key="k", state=pb.EFFECT_STATE_COMMITTED))
        with pytest.raises(errors.FailedPrecondition, match="already settled"):
            await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
                **base, idempotency_key="k", state=pb.EFFECT_STATE_FAILED))
        third = await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            **base, idempotency_key="k", action=action, action_digest=digest))
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return first, second, settled, repeated, third, events
    first, second, settled, repeated, third, events = scenario(body)
    assert first.decision == pb.EFFECT_DECISION_PROCEED
    assert second.decision == pb.EFFECT_DECISION_RESOLVE
    assert settled.effect.state == pb.EFFECT_STATE_COMMITTED and repeated.effect == settled.effect
    assert third.decision == pb.EFFECT_DECISION_SETTLED
    kinds = [e.event_type for e in events if e.event_type.startswith("effect.")]
    assert kinds == ["effect.intent", "effect.committed"]
    committed = next(e for e in events if e.event_type == "effect.committed")
    assert {f.name: f.string_value for f in committed.fields}["note.isolation"] == "in-process"


def test_cancel_a_queued_task_and_ask_a_leased_one_to_stop(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        leased = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        worker_id, (lease,) = await _lease_one(workers)
        queued = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        cancelled = await tasks.cancel_task(pb.CancelTaskRequest(task_id=queued.task.task_id, reason="user"))
        asked = await tasks.cancel_task(pb.CancelTaskRequest(task_id=leased.task.task_id))
        beat = await workers.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, leases=[
            pb.LeaseProgress(task_id=lease.task.task_id, attempt_epoch=lease.attempt_epoch)]))
        ended = await workers.fail_task(pb.FailTaskRequest(tenant="acme", task_id=lease.task.task_id,
                                                           attempt_epoch=lease.attempt_epoch,
                                                           failure=pb.TaskFailure(code="cancelled")))
        with pytest.raises(errors.FailedPrecondition):
            done = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "danger"))))
            await tasks.cancel_task(pb.CancelTaskRequest(task_id=done.task.task_id))
        return cancelled, asked, beat, ended
    cancelled, asked, beat, ended = scenario(body)
    assert cancelled.task.state == pb.TASK_STATE_CANCELLED
    assert asked.task.state == pb.TASK_STATE_LEASED and asked.task.cancel_requested
    assert beat.leases[0].state == pb.LEASE_STATE_CANCEL_REQUESTED
    assert ended.task.state == pb.TASK_STATE_CANCELLED


def test_the_credential_covers_only_the_tasks_payloads_and_expires_with_the_lease(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        ref = common_pb2.PayloadRef(payload_id="p-1", classification=common_pb2.CLASSIFICATION_INTERNAL)
        await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), inputs=[ref])))
        _, (lease,) = await _lease_one(workers)
        return lease, cluster.kernel.signing_key
    lease, key = scenario(body)
    keys = {key_id(key.public_key): key.public_key}
    token = lease.credential.token
    expires = lease.credential.expires_at.ToNanoseconds() / 1e9
    assert lease.credential.payload_ids == ["p-1"]
    assert expires == pytest.approx(lease.lease_expires_at.ToNanoseconds() / 1e9, abs=0.01)
    scope = verify_credential(token, keys, payload_id="p-1", now=expires - 1)
    assert (scope.tenant, scope.task_id, scope.attempt_epoch) == ("acme", lease.task.task_id, 1)
    with pytest.raises(errors.PermissionDenied, match="does not cover payload 'p-2'"):
        verify_credential(token, keys, payload_id="p-2", now=expires - 1)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verify_credential(token, keys, payload_id="p-1", now=expires + 0.001)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(errors.Unauthenticated):
        verify_credential(forged, keys, now=expires - 1)


def test_a_worker_id_is_bound_to_its_principal(scenario):
    async def body(cluster):
        mine = cluster.workers(principal="worker-1")
        theirs = cluster.workers(principal="worker-2")
        registered = await mine.register_worker(pb.RegisterWorkerRequest(tenant="*", name="w", slots=1))
        with pytest.raises(errors.PermissionDenied, match="another principal"):
            await theirs.lease_tasks(pb.LeaseTasksRequest(tenant="*", worker_id=registered.worker_id, max_tasks=1))
        with pytest.raises(errors.NotFound, match="register again"):
            await theirs.heartbeat(pb.HeartbeatRequest(worker_id="w-nope"))
        with pytest.raises(errors.InvalidArgument):
            await mine.register_worker(pb.RegisterWorkerRequest(tenant="*", name="w", slots=0))
        with pytest.raises(errors.PermissionDenied):
            await cluster.workers(tenant="acme").register_worker(pb.RegisterWorkerRequest(tenant="*", name="w",
                                                                                          slots=1))
        submitted = await cluster.tasks().submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        _, (lease,) = await _lease_one(mine, registered.worker_id)
        with pytest.raises(errors.PermissionDenied, match="leased to another worker"):
            await theirs.complete_task(pb.CompleteTaskRequest(tenant="acme", task_id=submitted.task.task_id,
                                                              attempt_epoch=lease.attempt_epoch))
        return await cluster.tasks().get_task(pb.GetTaskRequest(task_id=submitted.task.task_id))
    assert scenario(body).task.state == pb.TASK_STATE_LEASED, "the other worker's completion changed nothing"


def test_a_payload_changed_at_run_time_needs_a_new_approval(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        operator = cluster.tasks(roles=("operator",), principal="alice")
        held = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "deploy", text="v2"))))
        task_id = held.task.task_id
        pending = held.task.pending_approvals[0]
        await operator.approve_task(pb.ApproveTaskRequest(task_id=task_id, action_id="a",
                                                          action_digest=pending.action_digest))
        worker_id, (lease,) = await _lease_one(workers)
        changed = pb.Action()
        changed.CopyFrom(lease.task.spec.actions[0])
        changed.tool.arguments.update({"text": "v3"})
        base = dict(tenant="acme", task_id=task_id, attempt_epoch=lease.attempt_epoch)
        swapped = await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            **base, idempotency_key=f"{task_id}/a", action=changed, action_digest=action_digest(changed)))
        waiting = await tasks.get_task(pb.GetTaskRequest(task_id=task_id))
        with pytest.raises(errors.FailedPrecondition):
            await workers.complete_task(pb.CompleteTaskRequest(**base))
        await operator.approve_task(pb.ApproveTaskRequest(task_id=task_id, action_id="a",
                                                          action_digest=action_digest(changed)))
        _, (again,) = await _lease_one(workers, worker_id)
        proceed = await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            tenant="acme", task_id=task_id, attempt_epoch=again.attempt_epoch, idempotency_key=f"{task_id}/a",
            action=changed, action_digest=action_digest(changed)))
        return swapped, waiting, again, proceed
    swapped, waiting, again, proceed = scenario(body)
    assert swapped.decision == pb.EFFECT_DECISION_AWAIT_APPROVAL
    assert waiting.task.state == pb.TASK_STATE_AWAITING_APPROVAL
    assert waiting.task.pending_approvals[0].action.tool.arguments["text"] == "v3"
    assert again.attempt_epoch == 2
    assert proceed.decision == pb.EFFECT_DECISION_PROCEED


def test_quota_and_budget_limits_carry_the_limit_and_the_actual(scenario):
    from planes.control.v1 import control_service_pb2 as cpb

    async def body(cluster):
        await cluster.publish([(cpb.RESOURCE_KIND_QUOTA, "small", {"tasks": 2})])
        tasks, workers = cluster.tasks(), cluster.workers()
        budget = pb.Budget(max_tool_calls=1)
        # One call past the quota creates none of its tasks.
        with pytest.raises(errors.LimitExceeded) as batch:
            await tasks.submit_tasks(pb.SubmitTasksRequest(tasks=[spec(tool("a", "noop")) for _ in range(3)]))
        first = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
            tool("a", "count", ledger="/x"), tool("b", "count", ledger="/y"), budget=budget)))
        # Concurrent calls (sharing a batch, so not yet in the store) get one place between them.
        raced = await asyncio.gather(*(tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
                                       for _ in range(3)), return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in raced) == 1
        assert all(isinstance(r, errors.LimitExceeded) and r.limit == 2 for r in raced if isinstance(r, Exception))
        with pytest.raises(errors.LimitExceeded) as quota:
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        _, (lease,) = await _lease_one(workers)
        base = dict(tenant="acme", task_id=first.task.task_id, attempt_epoch=lease.attempt_epoch)
        one, two = lease.task.spec.actions
        await workers.record_effect_intent(pb.RecordEffectIntentRequest(
            **base, idempotency_key="k1", action=one, action_digest=action_digest(one)))
        with pytest.raises(errors.LimitExceeded) as calls:
            await workers.record_effect_intent(pb.RecordEffectIntentRequest(
                **base, idempotency_key="k2", action=two, action_digest=action_digest(two)))
        await workers.record_effect_outcome(pb.RecordEffectOutcomeRequest(
            **base, idempotency_key="k1", state=pb.EFFECT_STATE_COMMITTED))
        with pytest.raises(errors.LimitExceeded) as usage:
            await workers.complete_task(pb.CompleteTaskRequest(**base, result=pb.TaskResult(
                usage=pb.Usage(tool_calls=2))))
        return (quota.value, calls.value, usage.value), batch.value
    (quota, calls, usage), batch = scenario(body)
    assert (batch.name, batch.limit, batch.actual) == ("tasks", 2, 3)
    assert (quota.name, quota.limit, quota.actual) == ("tasks", 2, 3)
    assert (calls.name, calls.limit, calls.actual) == ("tool_calls", 1, 2)
    assert (usage.name, usage.limit, usage.actual) == ("tool_calls", 1, 2)


def test_a_worker_is_leased_only_tasks_it_has_the_adapters_for(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        shell = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "shell", x=1))))
        plain = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        python_only = await workers.register_worker(pb.RegisterWorkerRequest(tenant="*", name="py", slots=4,
                                                                            tools=["python"]))
        got = await workers.lease_tasks(pb.LeaseTasksRequest(tenant="*", worker_id=python_only.worker_id,
                                                             max_tasks=4))
        sandboxed = await workers.register_worker(pb.RegisterWorkerRequest(tenant="*", name="sb", slots=4,
                                                                          tools=["subprocess"]))
        other = await workers.lease_tasks(pb.LeaseTasksRequest(tenant="*", worker_id=sandboxed.worker_id,
                                                               max_tasks=4))
        return shell, plain, got, other
    shell, plain, got, other = scenario(body)
    assert [lease.task.task_id for lease in got.leases] == [plain.task.task_id]
    assert [lease.task.task_id for lease in other.leases] == [shell.task.task_id]


def test_a_task_spec_over_the_size_limit_is_refused_before_it_is_stored(scenario):
    """One tenant's 60 MB spec stalled the store for every tenant: specs are capped (1 MiB by default)."""
    limit = 1 << 20

    def sized(total: int, key: str) -> pb.TaskSpec:
        task = spec(tool("a", "upper", text=""), key=key)
        overhead = task.ByteSize()
        text = "x" * (total - overhead)
        task = spec(tool("a", "upper", text=text), key=key)
        while task.ByteSize() > total:  # the text's length prefix grew by a byte or two
            text = text[:-1]
            task = spec(tool("a", "upper", text=text), key=key)
        assert task.ByteSize() == total
        return task

    async def body(cluster):
        tasks = cluster.tasks()
        with pytest.raises(errors.LimitExceeded) as refused:
            await tasks.submit_task(pb.SubmitTaskRequest(task=sized(limit + 1, "big")))
        at_limit = await tasks.submit_task(pb.SubmitTaskRequest(task=sized(limit, "at-limit")))
        # Nothing was kept under the refused spec's idempotency key: a small spec now takes it afresh.
        small = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"), key="big")))
        return refused.value, at_limit, small
    refused, at_limit, small = scenario(body)
    assert (refused.name, refused.limit, refused.actual) == ("task spec bytes", limit, limit + 1)
    assert "pass bulk data as payloads" in refused.message
    assert at_limit.task.task_id and small.created


def test_call_records_past_the_limits_are_bounded_when_recorded_never_refused(scenario):
    """A worker cannot flood evidence, and a tool cannot make its task unfinishable: past max_call_records the
    calls are counted, not recorded one by one; notes are cut to 32 and each value to 512 characters."""
    async def body(cluster):
        cluster.plugin.engine.settings.max_call_records = 3
        tasks, workers = cluster.tasks(), cluster.workers()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        task_id, correlation = submitted.task.task_id, submitted.task.spec.correlation.correlation_id
        worker_id, (lease,) = await _lease_one(workers)
        base = dict(tenant="acme", task_id=task_id, attempt_epoch=lease.attempt_epoch)
        failure = pb.TaskFailure(code="tool.failed")
        with pytest.raises(errors.InvalidArgument, match="kind must be 'tool' or 'model'"):
            await workers.fail_task(pb.FailTaskRequest(**base, failure=failure, calls=[pb.CallRecord(outcome="ok")]))
        noisy = pb.CallRecord(action_id="a", kind="tool", target="noop", adapter="python", outcome="tool.failed",
                              error_kind="InvalidArgument", error="tool 'noop' (adapter 'python') raised it",
                              notes={**{f"n{i:02d}": "v" for i in range(40)}, "big": "x" * (20 << 10),
                                     "y" * 65: "badly named"})
        ended = await workers.fail_task(pb.FailTaskRequest(**base, failure=failure, calls=[noisy] * 5))
        return ended.task, await cluster.events(correlation)

    ended, events = scenario(body)
    assert ended.state == pb.TASK_STATE_FAILED, "the failure went through"
    failed = [{f.name: f.string_value for f in e.fields} for e in events if e.event_type == "tool.failed"]
    assert len(failed) == 3 and failed[-1]["calls_omitted"] == "2" and "calls_omitted" not in failed[0]
    notes = {k: v for k, v in failed[0].items() if k.startswith("note.")}
    assert len(notes) == 33 and notes["note.notes_omitted"] == "10", "32 well-named notes kept, the rest counted"
    assert notes["note.big"].endswith(f"... ({20 << 10} characters in all)") and len(notes["note.big"]) < 600
