"""The task lifecycle, fenced leases, the effect ledger and approvals.

:class:`ExecutionEngine` holds the rules; every operation is a function of a
:class:`~.committer.Tx` run by the :class:`~.committer.Committer`, so each
transition is durable, and recorded as an evidence event carrying the config
revision in force, before anyone is told about it.

Lifecycle: admitted -> policy decided -> (awaiting approval ->) queued ->
leased -> running -> completed | failed | cancelled. A lease carries an
attempt epoch, one higher than any before: every committing request names it,
and one from an expired or superseded attempt is refused
(:class:`~planes.kernel.errors.FailedPrecondition`) and changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.protobuf import duration_pb2, timestamp_pb2

from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.call import CallContext
from planes.kernel.errors import (
    AlreadyExists,
    EvidenceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unavailable,
    VersionMismatch,
)
from planes.kernel.tokens import SigningKey

from .committer import Committer, Tx
from .config import RunConfig
from .credentials import issue_credential
from .policy import PolicyEngine, action_digest
from .store import LEASED_STATES, TERMINAL_STATES

log = logging.getLogger("planes.execution.engine")

S = pb
EVENT_TYPES = {
    S.TASK_STATE_ADMITTED: "request.admitted", S.TASK_STATE_POLICY_DECIDED: "policy.decided",
    S.TASK_STATE_AWAITING_APPROVAL: "approval.requested", S.TASK_STATE_QUEUED: "task.queued",
    S.TASK_STATE_LEASED: "task.leased", S.TASK_STATE_RUNNING: "task.running",
    S.TASK_STATE_COMPLETED: "task.completed", S.TASK_STATE_FAILED: "task.failed",
    S.TASK_STATE_CANCELLED: "task.cancelled",
}
EFFECT_EVENTS = {S.EFFECT_STATE_INTENDED: "effect.intent", S.EFFECT_STATE_COMMITTED: "effect.committed",
                 S.EFFECT_STATE_FAILED: "effect.failed", S.EFFECT_STATE_COMPENSATED: "effect.compensated",
                 S.EFFECT_STATE_ESCALATED: "effect.escalated"}
_PLAIN_REASONS = frozenset(("submitted", "queued", "started", "completed", "allow", "deny", "require_approval",
                            "transform"))
_EPOCH_STATES = frozenset((S.TASK_STATE_LEASED, S.TASK_STATE_RUNNING, S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED,
                           S.TASK_STATE_CANCELLED))
#: Notes of one call record that are recorded: each is an evidence field, and an event has at most 64.
MAX_CALL_NOTES = 32
MAX_NOTE_NAME_CHARS = 64
#: A recorded note value's length; a longer one is cut, saying how long it was.
MAX_NOTE_CHARS = 512
#: Notes the worker itself sets on a call record, kept before any of the adapter's.
WORKER_NOTES = frozenset(("outputs", "result", "resolved", "fallback_from"))
OUTCOMES = (S.EFFECT_STATE_COMMITTED, S.EFFECT_STATE_FAILED, S.EFFECT_STATE_COMPENSATED, S.EFFECT_STATE_ESCALATED)
SUPPORTED_MAJOR = 1
#: How many queued tasks a lease looks past, for ones the worker has the adapters to run.
SKIP_AHEAD = 64


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


@dataclass
class EngineSettings:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    #: Attempts (leases) a task gets before it fails as attempts.exhausted.
    max_attempts: int = 3
    max_lease_batch: int = 256
    #: Largest task spec accepted, serialized. Every transition stores the task again and every
    #: worker lease carries it, so bulk data belongs in payloads (``inputs``), not in arguments.
    max_spec_bytes: int = 1 << 20
    #: Call records one CompleteTask or FailTask may carry: each becomes an evidence event, so a
    #: worker must not be able to flood the log. A worker sends one per tool or model call of
    #: the attempt.
    max_call_records: int = 1024


@dataclass(frozen=True)
class ConfigView:
    """What the engine runs under right now."""

    config: RunConfig
    admitting: bool
    reason: str


class ExecutionEngine:
    def __init__(self, committer: Committer, signing_key: SigningKey, config: Callable[[], ConfigView],
                 settings: EngineSettings | None = None):
        self.committer = committer
        self.key = signing_key
        self.config = config
        self.settings = settings or EngineSettings()
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._work = asyncio.Event()
        self._workers: dict[str, tuple[str, str, str]] = {}
        #: worker_id -> the tool adapters it registered with (empty: not filtered).
        self._worker_adapters: dict[str, frozenset[str]] = {}
        #: task_id -> the adapter it was last reported waiting for (once per task and adapter, not per lease).
        self._waiting: dict[str, str] = {}
        #: (task_id, epoch) -> when the credential last issued for it expires.
        self._credentials_until: dict[tuple[str, int], float] = {}

    # -- helpers (run on the store thread) -------------------------------------

    def _event(self, task: pb.Task, event_type: str, fields: dict[str, str], config: RunConfig,
               suffix: str = "") -> epb.Event:
        # The spec's correlation already names the task's tenant (filled at
        # admission); fields are added in place (measured 4 us an event
        # against 7 for building EventField objects first).
        event = epb.Event(event_id=f"exec:{task.task_id}:{task.version}{suffix}", event_type=event_type,
                          correlation=task.spec.correlation, config=config.stamp)
        add = event.fields.add
        add(name="task_id", string_value=task.task_id)
        for name, value in fields.items():
            add(name=name, string_value=value)
        return event

    def _transition(self, tx: Tx, task: pb.Task, state: int, reason: str, config: RunConfig, *,
                    enqueue: bool = False, fields: dict[str, str] | None = None) -> None:
        previous = task.state
        task.state = state
        task.version += 1
        task.updated_at.CopyFrom(tx.stamp())
        if state not in LEASED_STATES:
            task.ClearField("lease_expires_at")
        body = task.SerializeToString()
        tx.add_transition(task.task_id, task.version, previous, reason, body)
        tx.dirty[task.task_id] = (task, enqueue or tx.dirty.get(task.task_id, (None, False))[1])
        # Every committed field costs a salted commitment in evidence: the
        # event type names the new state, so only what it does not say is added.
        details = dict(fields) if fields else {}
        if reason not in _PLAIN_REASONS:
            details["reason"] = reason
        if task.attempt_epoch and state in _EPOCH_STATES:
            details["attempt_epoch"] = str(task.attempt_epoch)
        event_type = EVENT_TYPES[state] if state != previous else "task.updated"
        tx.emit(task.tenant, self._event(task, event_type, details, config), task.spec.evidence_required)
        task_id = task.task_id
        tx.after.append(lambda: self._notify(task_id, body, previous, reason))
        if enqueue:
            tx.after.append(self._wake_workers)

    def _notify(self, task_id: str, body: bytes, previous: int, reason: str) -> None:
        queues = self._watchers.get(task_id)
        if queues:
            change = pb.WatchTaskResponse(task=pb.Task.FromString(body), previous_state=previous, reason=reason)
            for queue in queues:
                queue.put_nowait(change)

    def _wake_workers(self) -> None:
        self._work.set()
        self._work = asyncio.Event()

    @staticmethod
    def _load(tx: Tx, tenant: str, task_id: str) -> pb.Task:
        task = tx.task(task_id)
        if task is None or task.tenant != tenant:
            raise NotFound(f"no task {task_id!r} in tenant {tenant!r}")
        return task

    def _fenced(self, tx: Tx, tenant: str, task_id: str, epoch: int, principal: str) -> pb.Task:
        """The task, if ``epoch`` holds its current, unexpired lease; FailedPrecondition otherwise.

        The lease is also bound to the principal of the worker holding it:
        knowing the epoch is not enough to commit for another worker.
        """
        task = self._load(tx, tenant, task_id)
        if epoch != task.attempt_epoch:
            raise FailedPrecondition(f"attempt epoch {epoch} of task {task_id} is stale: the current "
                                     f"attempt is {task.attempt_epoch}; this attempt may commit nothing")
        if task.state not in LEASED_STATES:
            raise FailedPrecondition(f"task {task_id} is {pb.TaskState.Name(task.state)}, not leased: attempt "
                                     f"{epoch} may commit nothing")
        if _seconds(task.lease_expires_at) <= tx.now:
            raise FailedPrecondition(f"the lease of attempt {epoch} of task {task_id} has expired; "
                                     "it may commit nothing")
        owner = self._workers.get(task.worker_id) or (tx.store.worker(task.worker_id) if task.worker_id else None)
        if owner is not None and owner[0] != principal:
            raise PermissionDenied(f"task {task_id} is leased to another worker")
        return task

    # -- admission ---------------------------------------------------------------

    def _admitting(self) -> RunConfig:
        view = self.config()
        if not view.admitting:
            raise Unavailable(f"not admitting tasks: {view.reason}")
        return view.config

    def prepare(self, tenant: str, spec: pb.TaskSpec, call: CallContext, config: RunConfig) -> pb.TaskSpec:
        """Validate a spec and fill its correlation from the call (no store access)."""
        version = spec.contract_version
        if version.major and version.major != SUPPORTED_MAJOR:
            raise VersionMismatch("execution", f"{version.major}.{version.minor}", f"{SUPPORTED_MAJOR}.0")
        if spec.HasField("deadline") and _seconds(spec.deadline) <= _now():
            raise InvalidArgument("the task's deadline is in the past")
        if len(spec.idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        size = spec.ByteSize()
        if size > self.settings.max_spec_bytes:
            raise LimitExceeded("task spec bytes", self.settings.max_spec_bytes, size,
                                message=f"the task spec is {size} bytes, over the limit of "
                                        f"{self.settings.max_spec_bytes}: pass bulk data as payloads "
                                        "(the spec's inputs), not as arguments")
        for ref in spec.inputs:
            if not ref.payload_id:
                raise InvalidArgument("an input payload reference has no payload_id")
            if ref.tenant and ref.tenant != tenant:
                raise PermissionDenied(f"input {ref.payload_id} belongs to another tenant")
        PolicyEngine(config).check_spec(tenant, spec)
        filled = pb.TaskSpec()
        filled.CopyFrom(spec)
        correlation = filled.correlation
        correlation.tenant = tenant
        correlation.correlation_id = correlation.correlation_id or call.correlation_id
        correlation.request_id = correlation.request_id or call.request_id
        correlation.trace_id = correlation.trace_id or call.trace.trace_id
        correlation.span_id = correlation.span_id or call.trace.span_id
        correlation.actor = correlation.actor or call.identity.principal
        return filled

    async def submit(self, tenant: str, specs: list[pb.TaskSpec], call: CallContext) -> list[pb.SubmitTaskResponse]:
        config = self._admitting()
        prepared = []
        for index, spec in enumerate(specs):
            try:
                prepared.append(self.prepare(tenant, spec, call, config))
            except InvalidArgument as exc:
                raise InvalidArgument(exc.message if len(specs) == 1 else f"task {index}: {exc.message}") from None
        return await self.committer.run(lambda tx: self._submit_all(tx, tenant, prepared, config))

    def _submit_all(self, tx: Tx, tenant: str, specs: list[pb.TaskSpec],
                    config: RunConfig) -> list[pb.SubmitTaskResponse]:
        """Admit ``specs`` all or none: a call that would take the tenant past its task quota creates nothing.

        The count includes tasks inserted earlier in the same batch (other
        calls, not yet in the store) and by this call, so neither a large call
        nor many concurrent ones get past the quota. All or none, so a caller
        never has to work out which of its tasks were admitted.
        """
        responses = [self._submit(tx, tenant, spec, config) for spec in specs]
        quota = config.tenant(tenant).quota_tasks
        # Tasks ended at admission (denied by policy) take no room.
        added = tx.unfinished_inserts().get(tenant, 0)
        if quota and added:
            unfinished = tx.count_unfinished(tenant)
            if unfinished > quota:
                raise LimitExceeded("tasks", quota, unfinished,
                                    message=f"tenant {tenant} has {unfinished - added} unfinished tasks and a quota "
                                            f"of {quota}: {added} more would make {unfinished}; none were submitted")
        return responses

    def _submit(self, tx: Tx, tenant: str, spec: pb.TaskSpec, config: RunConfig) -> pb.SubmitTaskResponse:
        digest = _spec_digest(spec)
        key = spec.idempotency_key
        if key:
            existing = tx.by_idempotency_key(tenant, key)
            if existing is not None:
                if existing[1] != digest:
                    raise AlreadyExists(f"idempotency key {key!r} was used for a different task spec")
                return pb.SubmitTaskResponse(task=tx.task(existing[0]), created=False)
        task = pb.Task(task_id=f"t-{os.urandom(12).hex()}", tenant=tenant, spec=spec, config=config.stamp,
                       state=pb.TASK_STATE_UNSPECIFIED)
        task.created_at.CopyFrom(_stamp(tx.now))
        tx.insert_task(task, digest)
        self._transition(tx, task, pb.TASK_STATE_ADMITTED, "submitted", config,
                         fields={"actor": spec.correlation.actor, "risk": pb.Risk.Name(spec.risk)})
        self._decide(tx, task, config)
        return pb.SubmitTaskResponse(task=task, created=True)

    def _decide(self, tx: Tx, task: pb.Task, config: RunConfig) -> None:
        engine = PolicyEngine(config)
        decision = pb.PolicyDecision(verdict=pb.POLICY_VERDICT_ALLOW, config=config.stamp)
        decision.decided_at.CopyFrom(_stamp(tx.now))
        pending = []
        for index, action in enumerate(task.spec.actions):
            verdict = engine.decide_action(task.tenant, task.spec, action)
            decision.rules.extend(verdict.rules)
            if verdict.transforms:
                task.spec.actions[index].CopyFrom(verdict.action)
                decision.transforms.extend(verdict.transforms)
            strength = _STRENGTH[verdict.verdict]
            if strength > _STRENGTH[decision.verdict]:
                decision.verdict = verdict.verdict
                decision.reason = f"{action.action_id}: {verdict.reason}"
            if verdict.verdict == pb.POLICY_VERDICT_REQUIRE_APPROVAL:
                pending.append((task.spec.actions[index], verdict.reason))
        task.policy.CopyFrom(decision)
        verdict_name = pb.PolicyVerdict.Name(decision.verdict).removeprefix("POLICY_VERDICT_").lower()
        self._transition(tx, task, pb.TASK_STATE_POLICY_DECIDED, verdict_name, config,
                         fields={"verdict": verdict_name, **({"rules": ",".join(decision.rules)}
                                                             if decision.rules else {}),
                                 **({"transforms": str(len(decision.transforms))} if decision.transforms else {})})
        if decision.verdict == pb.POLICY_VERDICT_DENY:
            task.failure.CopyFrom(pb.TaskFailure(code="policy.denied", message=decision.reason))
            self._transition(tx, task, pb.TASK_STATE_FAILED, "policy.denied", config)
        elif pending:
            for action, reason in pending:
                self._hold(tx, task, action, reason)
            self._transition(tx, task, pb.TASK_STATE_AWAITING_APPROVAL, "approval required", config,
                             fields={"actions": ",".join(a.action_id for a, _ in pending)})
        else:
            self._transition(tx, task, pb.TASK_STATE_QUEUED, "queued", config, enqueue=True)

    @staticmethod
    def _hold(tx: Tx, task: pb.Task, action: pb.Action, reason: str) -> pb.PendingApproval:
        held = task.pending_approvals.add(action=action, action_digest=action_digest(action), reason=reason)
        held.requested_at.CopyFrom(_stamp(tx.now))
        return held

    # -- reads -----------------------------------------------------------------------

    async def get(self, tenant: str, task_id: str) -> pb.Task:
        return await self.committer.run(lambda tx: self._load(tx, tenant, task_id))

    async def watch(self, tenant: str, task_id: str, after: int) -> AsyncIterator[pb.WatchTaskResponse]:
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(task_id, set()).add(queue)
        try:
            def backlog(tx: Tx):
                self._load(tx, tenant, task_id)
                return tx.store.transitions(task_id, after)
            last = after
            for task, previous, reason in await self.committer.run(backlog):
                last = task.version
                yield pb.WatchTaskResponse(task=task, previous_state=previous, reason=reason)
                if task.state in TERMINAL_STATES:
                    return
            while True:
                change = await queue.get()
                if change.task.version <= last:
                    continue
                last = change.task.version
                yield change
                if change.task.state in TERMINAL_STATES:
                    return
        finally:
            queues = self._watchers.get(task_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._watchers[task_id]

    # -- cancellation and approvals ---------------------------------------------------

    async def cancel(self, tenant: str, task_id: str, reason: str) -> pb.Task:
        config = self.config().config

        def cancel(tx: Tx) -> pb.Task:
            task = self._load(tx, tenant, task_id)
            if task.state == pb.TASK_STATE_CANCELLED:
                return task
            if task.state in TERMINAL_STATES:
                raise FailedPrecondition(f"task {task_id} already ended {pb.TaskState.Name(task.state)}")
            why = f"cancel requested: {reason}" if reason else "cancel requested"
            if task.state in LEASED_STATES:
                if not task.cancel_requested:
                    task.cancel_requested = True
                    self._transition(tx, task, task.state, why, config)
                return task
            task.failure.CopyFrom(pb.TaskFailure(code="cancelled", message=reason or "cancelled"))
            self._transition(tx, task, pb.TASK_STATE_CANCELLED, why, config)
            return task
        return await self.committer.run(cancel)

    async def decide_approval(self, tenant: str, request, approve: bool, approver: str) -> tuple[pb.Task, pb.Approval]:
        config = self.config().config

        def decide(tx: Tx):
            task = self._load(tx, tenant, request.task_id)
            index = next((i for i, p in enumerate(task.pending_approvals)
                          if p.action.action_id == request.action_id), None)
            if index is None or task.state != pb.TASK_STATE_AWAITING_APPROVAL:
                raise NotFound(f"task {request.task_id} has no pending approval for action {request.action_id!r}")
            pending = task.pending_approvals[index]
            if request.action_digest.value != pending.action_digest.value:
                raise FailedPrecondition(f"action {request.action_id!r} changed since it was shown: its digest is "
                                         f"{pending.action_digest.value.hex()[:16]}..., a new approval must name it")
            approval = pb.Approval(action_id=request.action_id, action_digest=pending.action_digest,
                                   decision=pb.APPROVAL_DECISION_APPROVED if approve else pb.APPROVAL_DECISION_DENIED,
                                   approver=approver,
                                   comment=request.comment if approve else request.reason)
            approval.decided_at.CopyFrom(_stamp(tx.now))
            task.approvals.append(approval)
            del task.pending_approvals[index]
            fields = {"action_id": request.action_id, "approver": approver,
                      "action_digest": pending.action_digest.value.hex()}
            tx.emit(task.tenant, self._event(task, "approval.granted" if approve else "approval.denied", fields,
                                             config, suffix=f":approval:{len(task.approvals)}"),
                    task.spec.evidence_required)
            if not approve:
                task.failure.CopyFrom(pb.TaskFailure(code="approval.denied", message=request.reason or "denied"))
                task.ClearField("pending_approvals")
                self._transition(tx, task, pb.TASK_STATE_FAILED, f"approval denied by {approver}", config)
            elif task.pending_approvals:
                self._transition(tx, task, task.state, f"approved by {approver}", config)
            else:
                self._transition(tx, task, pb.TASK_STATE_QUEUED, f"approved by {approver}", config, enqueue=True)
            return task, approval
        return await self.committer.run(decide)

    # -- workers ------------------------------------------------------------------------

    async def register(self, request: pb.RegisterWorkerRequest, principal: str) -> pb.RegisterWorkerResponse:
        if not request.name:
            raise InvalidArgument("a worker needs a name")
        if not request.slots:
            raise InvalidArgument("a worker needs at least one slot")
        worker_id = f"w-{os.urandom(8).hex()}"

        def register(tx: Tx):
            tx.store.put_worker(worker_id, principal, request.tenant, request.name, tx.now)
        await self.committer.run(register)
        self._workers[worker_id] = (principal, request.tenant, request.name)
        self._worker_adapters[worker_id] = frozenset(request.tools)
        return pb.RegisterWorkerResponse(worker_id=worker_id, lease_duration=_duration(self.settings.lease_seconds),
                                         heartbeat_interval=_duration(self.settings.heartbeat_seconds))

    async def check_worker(self, worker_id: str, principal: str) -> tuple[str, str, str]:
        known = self._workers.get(worker_id)
        if known is None:
            known = await self.committer.run(lambda tx: tx.store.worker(worker_id))
            if known is None:
                raise NotFound(f"worker {worker_id!r} is not registered; register again")
            self._workers[worker_id] = known
        if known[0] != principal:
            raise PermissionDenied(f"worker {worker_id} was registered by another principal")
        return known

    async def lease(self, request: pb.LeaseTasksRequest, principal: str) -> pb.LeaseTasksResponse:
        _, _, name = await self.check_worker(request.worker_id, principal)
        tenant = None if request.tenant == "*" else request.tenant
        count = max(1, min(request.max_tasks or 1, self.settings.max_lease_batch))
        wait = _seconds(request.wait) if request.HasField("wait") else 0.0
        loop = asyncio.get_running_loop()
        until = loop.time() + min(wait, 60.0)
        excluded: set[str] = set()
        while True:
            work = self._work
            config = self.config().config
            strict = _OneStrictTenant(excluded)
            try:
                leases = await self.committer.run(
                    lambda tx, config=config, strict=strict: self._lease(
                        tx, tenant, request.worker_id, name, count, request.config.revision, config, strict))
            except EvidenceUnavailable:
                if strict.tenant is None or strict.tenant in excluded:
                    raise
                # That tenant's tasks wait for its evidence; lease the others'.
                excluded.add(strict.tenant)
                continue
            remaining = until - loop.time()
            if leases or remaining <= 0:
                return pb.LeaseTasksResponse(leases=leases)
            try:
                await asyncio.wait_for(work.wait(), remaining)
            except TimeoutError:
                return pb.LeaseTasksResponse()

    def _lease(self, tx: Tx, tenant: str | None, worker_id: str, name: str, count: int, worker_revision: int,
               config: RunConfig, strict: _OneStrictTenant | None = None) -> list[pb.TaskLease]:
        leases = []
        expires = tx.now + self.settings.lease_seconds
        adapters = self._worker_adapters.get(worker_id)
        # Evidence-required tasks of one tenant per lease (see _OneStrictTenant).
        strict = strict or _OneStrictTenant()
        strict.tenant = None  # the committer may run this again
        # Look past tasks this worker cannot run (another worker will), up to a bound.
        for task in tx.queued(tenant, count + SKIP_AHEAD):
            if len(leases) == count:
                break
            if not strict.admits(task):
                continue
            if worker_revision and task.config.revision > worker_revision:
                continue  # decided under a configuration newer than the worker runs
            if task.spec.HasField("deadline") and _seconds(task.spec.deadline) <= tx.now:
                # Before the adapter check: a task no worker can run still ends at its deadline.
                task.failure.CopyFrom(pb.TaskFailure(code="deadline.exceeded", message="deadline passed in queue"))
                self._transition(tx, task, pb.TASK_STATE_FAILED, "deadline exceeded", config)
                continue
            missing = self._missing_adapter(task, adapters, config) if adapters else None
            if missing is not None:
                self._report_waiting(tx, task, missing, name, adapters, config)
                continue
            task.attempt_epoch += 1
            task.worker_id = worker_id
            task.lease_expires_at.CopyFrom(_stamp(expires))
            self._transition(tx, task, pb.TASK_STATE_LEASED, f"leased by {name}", config,
                             fields={"worker": name})
            lease = pb.TaskLease(task=task, attempt_epoch=task.attempt_epoch, lease_expires_at=task.lease_expires_at,
                                 credential=self._credential(task, expires), config=task.config)
            if task.attempt_epoch > 1:
                lease.effects.extend(tx.store.effects(task.task_id))
            leases.append(lease)
        return leases

    @staticmethod
    def _missing_adapter(task: pb.Task, adapters: frozenset[str], config: RunConfig) -> tuple[str, str] | None:
        """``(tool, adapter)`` of the first tool of the task whose adapter the worker lacks; None if it has all."""
        for action in task.spec.actions:
            if action.WhichOneof("target") == "tool":
                contract = config.tool(task.tenant, action.tool.tool)
                if contract is not None and contract.adapter not in adapters:
                    return action.tool.tool, contract.adapter
        return None

    def _report_waiting(self, tx: Tx, task: pb.Task, missing: tuple[str, str], worker: str,
                        adapters: frozenset[str], config: RunConfig) -> None:
        """Say once, on the task, that no registered worker has an adapter it needs.

        A worker is leased only tasks it has the adapters for, so a task
        whose tool names an adapter no worker has (a typo, a plugin not
        loaded) would wait unseen. It stays queued, since a worker with the
        adapter may yet register, but its watchers, its evidence
        (``task.updated``) and the kernel's log say what it waits for.
        """
        tool, adapter = missing
        if self._waiting.get(task.task_id) == adapter:
            return
        if any(adapter in registered for registered in self._worker_adapters.values()):
            return  # a worker that can run it is registered: it only has to get to it
        reason = (f"waiting for a worker with adapter {adapter!r} (tool {tool!r}): no registered worker has it; "
                  f"worker {worker} has: {', '.join(sorted(adapters))}")
        self._transition(tx, task, pb.TASK_STATE_QUEUED, reason, config, fields={"tool": tool, "adapter": adapter})
        task_id = task.task_id

        def reported() -> None:
            if len(self._waiting) > 100_000:
                self._waiting.clear()  # only an optimisation: forgetting means reporting again
            self._waiting[task_id] = adapter
            log.warning("task %s of tenant %s is %s", task_id, task.tenant, reason)
        tx.after.append(reported)

    def _credential(self, task: pb.Task, expires: float) -> pb.TaskCredential | None:
        """A credential for the attempt's payloads; None when the task references none (it would grant nothing)."""
        payloads = [ref.payload_id for ref in task.spec.inputs]
        for action in task.spec.actions:
            target = action.WhichOneof("target")
            if target:
                payloads += [ref.payload_id for ref in getattr(action, target).inputs]
        if not payloads:
            return None
        if len(self._credentials_until) > 100_000:
            self._credentials_until.clear()  # only an optimisation: forgetting means renewing
        self._credentials_until[(task.task_id, task.attempt_epoch)] = expires
        return issue_credential(self.key, tenant=task.tenant, task_id=task.task_id, attempt_epoch=task.attempt_epoch,
                                payload_ids=payloads, expires_at=expires)

    async def heartbeat(self, request: pb.HeartbeatRequest, principal: str) -> pb.HeartbeatResponse:
        await self.check_worker(request.worker_id, principal)
        config = self.config().config

        def beat(tx: Tx) -> pb.HeartbeatResponse:
            response = pb.HeartbeatResponse()
            expires = tx.now + self.settings.lease_seconds
            for progress in request.leases:
                renewal = response.leases.add(task_id=progress.task_id, attempt_epoch=progress.attempt_epoch,
                                              state=pb.LEASE_STATE_LOST)
                task = tx.task(progress.task_id)
                if (task is None or task.worker_id != request.worker_id or task.attempt_epoch != progress.attempt_epoch
                        or task.state not in LEASED_STATES or _seconds(task.lease_expires_at) <= tx.now):
                    continue
                if progress.started and task.state == pb.TASK_STATE_LEASED:
                    self._transition(tx, task, pb.TASK_STATE_RUNNING, "started", config)
                task.lease_expires_at.CopyFrom(_stamp(expires))
                tx.dirty[task.task_id] = (task, False)
                renewal.state = pb.LEASE_STATE_CANCEL_REQUESTED if task.cancel_requested else pb.LEASE_STATE_ACTIVE
                renewal.lease_expires_at.CopyFrom(task.lease_expires_at)
                # Renewed (re-signed) only when the one held has less than half a lease left.
                held = self._credentials_until.get((task.task_id, task.attempt_epoch), 0.0)
                if held - tx.now < self.settings.lease_seconds / 2:
                    credential = self._credential(task, expires)
                    if credential is not None:
                        renewal.credential.CopyFrom(credential)
            return response
        return await self.committer.run(beat)

    # -- the effect ledger ---------------------------------------------------------------

    async def record_intent(self, request: pb.RecordEffectIntentRequest,
                            principal: str) -> pb.RecordEffectIntentResponse:
        if not request.idempotency_key:
            raise InvalidArgument("an effect needs an idempotency key")
        if request.action.WhichOneof("target") is None:
            raise InvalidArgument("the action names neither a tool nor a model")
        if action_digest(request.action).value != request.action_digest.value:
            raise InvalidArgument("action_digest does not match the action")
        config = self.config().config

        def intend(tx: Tx) -> pb.RecordEffectIntentResponse:
            task = self._fenced(tx, request.tenant, request.task_id, request.attempt_epoch, principal)
            effect = tx.store.effect(task.task_id, request.idempotency_key)
            if effect is not None:
                decision = (pb.EFFECT_DECISION_RESOLVE if effect.state == pb.EFFECT_STATE_INTENDED
                            else pb.EFFECT_DECISION_SETTLED)
                return pb.RecordEffectIntentResponse(decision=decision, effect=effect)
            if task.cancel_requested:
                return pb.RecordEffectIntentResponse(decision=pb.EFFECT_DECISION_CANCELLED)
            action = request.action
            if action.WhichOneof("target") == "tool" and action.tool.tool not in task.spec.allowed_tools:
                raise InvalidArgument(f"tool {action.tool.tool!r} is not in the task's allowed_tools")
            verdict = PolicyEngine(config).decide_action(task.tenant, task.spec, action)
            approved = any(a.action_id == action.action_id and a.decision == pb.APPROVAL_DECISION_APPROVED
                           and a.action_digest.value == request.action_digest.value for a in task.approvals)
            if verdict.verdict == pb.POLICY_VERDICT_DENY:
                return pb.RecordEffectIntentResponse(decision=pb.EFFECT_DECISION_DENIED)
            if verdict.verdict == pb.POLICY_VERDICT_TRANSFORM and verdict.action is not None \
                    and action_digest(verdict.action).value != request.action_digest.value:
                return pb.RecordEffectIntentResponse(decision=pb.EFFECT_DECISION_DENIED)
            if verdict.verdict == pb.POLICY_VERDICT_REQUIRE_APPROVAL and not approved:
                self._hold(tx, task, action, verdict.reason)
                task.worker_id = ""
                self._transition(tx, task, pb.TASK_STATE_AWAITING_APPROVAL,
                                 f"approval required for {action.action_id}", config)
                return pb.RecordEffectIntentResponse(decision=pb.EFFECT_DECISION_AWAIT_APPROVAL)
            budget = task.spec.budget.max_tool_calls
            if budget and action.WhichOneof("target") == "tool":
                calls = sum(1 for e in tx.store.effects(task.task_id))
                if calls >= budget:
                    raise LimitExceeded("tool_calls", budget, calls + 1)
            effect = pb.Effect(idempotency_key=request.idempotency_key, action_id=action.action_id,
                               tool=action.tool.tool if action.WhichOneof("target") == "tool" else action.model.route,
                               action_digest=request.action_digest, state=pb.EFFECT_STATE_INTENDED,
                               intent_epoch=request.attempt_epoch)
            effect.intended_at.CopyFrom(_stamp(tx.now))
            tx.store.put_effect(task.task_id, effect)
            self._effect_event(tx, task, effect, config, {})
            return pb.RecordEffectIntentResponse(decision=pb.EFFECT_DECISION_PROCEED, effect=effect)
        return await self.committer.run(intend)

    def _effect_event(self, tx: Tx, task: pb.Task, effect: pb.Effect, config: RunConfig, notes) -> None:
        fields = {"idempotency_key": effect.idempotency_key, "action_id": effect.action_id, "tool": effect.tool,
                  "action_digest": effect.action_digest.value.hex(), "intent_epoch": str(effect.intent_epoch)}
        if effect.state != pb.EFFECT_STATE_INTENDED:
            fields["outcome_epoch"] = str(effect.outcome_epoch)
            if effect.result_digest.value:
                fields["result_digest"] = effect.result_digest.value.hex()
            if effect.error:
                fields["error"] = effect.error
        fields.update({f"note.{k}": v for k, v in sorted(notes.items())})
        suffix = f":effect:{hashlib.sha256(effect.idempotency_key.encode()).hexdigest()[:16]}:{effect.state}"
        tx.emit(task.tenant, self._event(task, EFFECT_EVENTS[effect.state], fields, config, suffix=suffix),
                task.spec.evidence_required)

    async def record_outcome(self, request: pb.RecordEffectOutcomeRequest,
                             principal: str) -> pb.RecordEffectOutcomeResponse:
        if request.state not in OUTCOMES:
            raise InvalidArgument(f"{pb.EffectState.Name(request.state)} is not an outcome")
        config = self.config().config

        def settle(tx: Tx) -> pb.RecordEffectOutcomeResponse:
            task = self._fenced(tx, request.tenant, request.task_id, request.attempt_epoch, principal)
            effect = tx.store.effect(task.task_id, request.idempotency_key)
            if effect is None:
                raise NotFound(f"no intent with idempotency key {request.idempotency_key!r} in task {task.task_id}")
            if effect.state != pb.EFFECT_STATE_INTENDED:
                if effect.state == request.state:
                    return pb.RecordEffectOutcomeResponse(effect=effect)
                raise FailedPrecondition(f"effect {request.idempotency_key!r} is already settled as "
                                         f"{pb.EffectState.Name(effect.state)}")
            effect.state = request.state
            effect.outcome_epoch = request.attempt_epoch
            effect.settled_at.CopyFrom(_stamp(tx.now))
            effect.outputs.extend(request.outputs)
            effect.result_digest.CopyFrom(request.result_digest)
            effect.error = request.error[:500]
            tx.store.put_effect(task.task_id, effect)
            self._effect_event(tx, task, effect, config, dict(request.notes))
            return pb.RecordEffectOutcomeResponse(effect=effect)
        return await self.committer.run(settle)

    # -- ending an attempt -----------------------------------------------------------------

    def check_calls(self, calls) -> None:
        """Refuse call records no worker makes: a kind other than tool or model, or no outcome.

        What a tool influences (how many calls, their notes) is bounded when
        recorded (:meth:`_bounded`), never refused: a refused completion would
        leave the task neither completed nor failed, and its tools run again.
        """
        for index, record in enumerate(calls):
            if record.kind not in ("tool", "model"):
                raise InvalidArgument(f"call record {index}: kind must be 'tool' or 'model', got {record.kind[:20]!r}")
            if not record.outcome:
                raise InvalidArgument(f"call record {index} has no outcome ('ok' or an error code)")

    def _bounded(self, calls) -> tuple[list, int]:
        """The call records to record as evidence events, and how many beyond ``max_call_records`` were left out.

        Each record's notes are cut to :data:`MAX_CALL_NOTES` well-named ones
        (``notes_omitted`` counts the rest) and each value to
        :data:`MAX_NOTE_CHARS` characters, so an event stays small whatever
        the tool did.
        """
        limit = self.settings.max_call_records
        kept = []
        for record in list(calls)[:limit]:
            # The worker's own notes first (the payloads a call wrote), then the adapter's by name.
            names = sorted((name for name in record.notes if 0 < len(name) <= MAX_NOTE_NAME_CHARS),
                           key=lambda name: (name not in WORKER_NOTES, name))
            omitted = len(record.notes) - min(len(names), MAX_CALL_NOTES)
            if omitted or any(len(record.notes[name]) > MAX_NOTE_CHARS for name in names):
                bounded = pb.CallRecord()
                bounded.CopyFrom(record)
                bounded.ClearField("notes")
                for name in names[:MAX_CALL_NOTES]:
                    value = record.notes[name]
                    bounded.notes[name] = value if len(value) <= MAX_NOTE_CHARS else (
                        f"{value[:MAX_NOTE_CHARS - 40]}... ({len(value)} characters in all)")
                if omitted:
                    bounded.notes["notes_omitted"] = str(omitted)
                record = bounded
            kept.append(record)
        return kept, max(0, len(calls) - limit)

    def _record_calls(self, tx: Tx, task: pb.Task, epoch: int, calls, config: RunConfig) -> None:
        """One evidence event per call record of attempt ``epoch``: what ran, where, how long, how it ended.

        A tool call that did not end "ok" is ``tool.failed``, with the error
        kind and the worker's message (names and limits, never argument or
        output values) and the attempt, since a task may fail several.
        """
        calls, omitted = self._bounded(calls)
        for index, record in enumerate(calls):
            fields = {"action_id": record.action_id, "target": record.target, "adapter": record.adapter,
                      "outcome": record.outcome, "duration_ms": str(record.duration.ToMilliseconds())}
            fields.update({f"note.{k}": v for k, v in sorted(record.notes.items())})
            if omitted and index == len(calls) - 1:
                fields["calls_omitted"] = str(omitted)  # over max_call_records: counted, not each recorded
            if record.result_digest.value:
                fields["result_digest"] = record.result_digest.value.hex()
            if record.kind == "model":
                kind = "model.called"
            elif record.outcome == "ok":
                kind = "tool.invoked"
            else:
                kind = "tool.failed"
                fields.update(attempt_epoch=str(epoch), error_kind=record.error_kind or "unknown",
                              error=record.error[:500])
            tx.emit(task.tenant, self._event(task, kind, fields, config, suffix=f":call:{epoch}:{index}"),
                    task.spec.evidence_required)

    def _complete(self, tx: Tx, request: pb.CompleteTaskRequest, config: RunConfig, principal: str) -> pb.Task:
        task = self._fenced(tx, request.tenant, request.task_id, request.attempt_epoch, principal)
        unsettled = [e.idempotency_key for e in tx.store.effects(task.task_id) if e.state == pb.EFFECT_STATE_INTENDED]
        if unsettled:
            raise FailedPrecondition(f"task {task.task_id} has an unsettled effect intent {unsettled[0]!r}")
        budget, usage = task.spec.budget, request.result.usage
        for name, limit, actual in (("tokens", budget.max_tokens, usage.tokens),
                                    ("tool_calls", budget.max_tool_calls, usage.tool_calls),
                                    ("model_calls", budget.max_model_calls, usage.model_calls),
                                    ("bytes", budget.max_bytes, usage.bytes)):
            if limit and actual > limit:
                raise LimitExceeded(name, limit, actual)
        if task.state == pb.TASK_STATE_LEASED:
            self._transition(tx, task, pb.TASK_STATE_RUNNING, "started", config)
        self._record_calls(tx, task, request.attempt_epoch, request.calls, config)
        task.result.CopyFrom(request.result)
        ran_under = request.config.revision
        self._transition(tx, task, pb.TASK_STATE_COMPLETED, "completed", config,
                         fields={"ran_under_revision": str(ran_under)} if ran_under != config.revision else None)
        return task

    async def complete(self, request: pb.CompleteTaskRequest, principal: str) -> pb.Task:
        self.check_calls(request.calls)
        config = self.config().config
        return await self.committer.run(lambda tx: self._complete(tx, request, config, principal))

    async def complete_many(self, request: pb.CompleteTasksRequest, principal: str,
                            may_act_for: Callable[[str], bool]) -> pb.CompleteTasksResponse:
        await self.check_worker(request.worker_id, principal)
        for completion in request.completions:
            if not may_act_for(completion.tenant):
                raise PermissionDenied(f"{principal} may not act for tenant {completion.tenant!r}")
        config = self.config().config

        async def one(completion: pb.CompleteTaskRequest) -> pb.CompletionResult:
            try:
                self.check_calls(completion.calls)
                await self.committer.run(lambda tx: self._complete(tx, completion, config, principal))
                return pb.CompletionResult(task_id=completion.task_id, completed=True)
            except (FailedPrecondition, NotFound, LimitExceeded, PermissionDenied, InvalidArgument) as exc:
                return pb.CompletionResult(task_id=completion.task_id, error=exc.message, code=exc.code.name)
        # Queued together, so they share one batch and one commit.
        results = await asyncio.gather(*(one(c) for c in request.completions))
        return pb.CompleteTasksResponse(results=results)

    async def fail(self, request: pb.FailTaskRequest, principal: str) -> pb.Task:
        if not request.failure.code:
            raise InvalidArgument("a failure needs a code")
        self.check_calls(request.calls)
        config = self.config().config

        def fail(tx: Tx) -> pb.Task:
            task = self._fenced(tx, request.tenant, request.task_id, request.attempt_epoch, principal)
            # The tools ran even though the attempt failed: evidence says which, and how each ended.
            self._record_calls(tx, task, request.attempt_epoch, request.calls, config)
            task.failure.CopyFrom(request.failure)
            task.failure.message = task.failure.message[:500]
            if task.cancel_requested:
                self._transition(tx, task, pb.TASK_STATE_CANCELLED, "cancelled", config)
            elif request.retry and task.attempt_epoch < self.settings.max_attempts:
                self._transition(tx, task, pb.TASK_STATE_QUEUED, f"retry after {request.failure.code}", config,
                                 enqueue=True)
            else:
                self._transition(tx, task, pb.TASK_STATE_FAILED, request.failure.code, config)
            return task
        return await self.committer.run(fail)

    # -- lease expiry -------------------------------------------------------------------------

    async def reap(self) -> int:
        """End every expired lease: requeue its task for a new attempt, or end it. Returns how many."""
        config = self.config().config

        excluded: set[str] = set()
        attempt = _OneStrictTenant(excluded)

        def reap(tx: Tx) -> tuple[int, bool]:
            nonlocal attempt
            strict = attempt = _OneStrictTenant(excluded)
            expired = tx.expired_leases(1000)
            reaped = 0
            for task in expired:
                if not strict.admits(task):
                    continue
                reaped += 1
                reason = f"lease of attempt {task.attempt_epoch} expired"
                task.worker_id = ""
                if task.cancel_requested:
                    task.failure.CopyFrom(pb.TaskFailure(code="cancelled", message=reason))
                    self._transition(tx, task, pb.TASK_STATE_CANCELLED, reason, config)
                elif task.attempt_epoch >= self.settings.max_attempts:
                    task.failure.CopyFrom(pb.TaskFailure(code="attempts.exhausted", message=reason))
                    self._transition(tx, task, pb.TASK_STATE_FAILED, reason, config)
                else:
                    self._transition(tx, task, pb.TASK_STATE_QUEUED, reason, config, enqueue=True)
            return reaped, reaped < len(expired)
        total, more, unavailable = 0, True, None
        while more:
            try:
                reaped, more = await self.committer.run(reap)
            except EvidenceUnavailable as exc:
                if attempt.tenant is None or attempt.tenant in excluded:
                    raise
                excluded.add(attempt.tenant)  # reaped on a later round; the other tenants' now
                unavailable, more = exc, True
                continue
            total += reaped
        if unavailable is not None:
            raise unavailable
        return total


class _OneStrictTenant:
    """Admits evidence-required tasks of one tenant only, for an operation that spans tenants.

    The committer records an operation's evidence-required events in one
    append, so they must belong to one tenant (see :mod:`.committer`); the
    tasks of the others are left for the next operation. Tenants in
    ``excluded`` (their evidence could not be recorded just now) are passed
    over, so one tenant's outage does not hold up the others' tasks.
    """

    __slots__ = ("tenant", "excluded")

    def __init__(self, excluded: frozenset[str] | set[str] = frozenset()):
        self.tenant: str | None = None
        self.excluded = excluded

    def admits(self, task: pb.Task) -> bool:
        if not task.spec.evidence_required:
            return True
        if task.tenant in self.excluded:
            return False
        if self.tenant is None:
            self.tenant = task.tenant
        return task.tenant == self.tenant


_STRENGTH = {pb.POLICY_VERDICT_ALLOW: 0, pb.POLICY_VERDICT_TRANSFORM: 1,
             pb.POLICY_VERDICT_REQUIRE_APPROVAL: 2, pb.POLICY_VERDICT_DENY: 3}


def _spec_digest(spec: pb.TaskSpec) -> bytes:
    # The correlation is filled from each call, so a resubmission differs
    # there; the key identifies the work, not the request.
    stripped = pb.TaskSpec()
    stripped.CopyFrom(spec)
    stripped.ClearField("correlation")
    return hashlib.sha256(stripped.SerializeToString(deterministic=True)).digest()


def _now() -> float:
    import time
    return time.time()
