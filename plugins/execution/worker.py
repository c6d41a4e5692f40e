"""The worker: a separate process that leases tasks over gRPC and runs them.

A worker registers, then loops: lease up to its free slots (one call for
many tasks), run each task's actions through the tool adapters and model
routes, and complete the tasks (completions of a moment share one call). A
heartbeat extends every held lease in one call and says which were lost or
cancelled. Side-effecting tool calls go through the effect ledger: intent
before, outcome after, and on resumption the ledger's answer (settled,
resolve) decides, never a blind repeat. A lost lease stops the attempt at
once and it commits nothing (the plane refuses its epoch anyway).

The worker runs under a :class:`~planes.plugins.control.subscriber.CachedConfig`
kept current by a snapshot subscriber: while that configuration is not
admitting (no snapshot yet, lease run out under stop-admitting, expired) it
finishes what it holds and leases nothing new; degraded, it carries on and
reports itself degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import duration_pb2, json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.call import acting_for
from planes.kernel.identity import Identity
from planes.kernel.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    PlanesError,
    Unavailable,
)

from .config import RunConfig, class_rank
from .models import ModelAdapter, ModelRequest, select_routes
from .policy import action_digest
from .tools import DataAccess, Reconciliation, Secrets, ToolAdapter, ToolCall, ToolContext, ToolResult

log = logging.getLogger("planes.execution.worker")

RETRYABLE = (Unavailable, DeadlineExceeded)


class _LeaseLost(Exception):
    pass


class _TaskCancelled(Exception):
    pass


class _AwaitApproval(Exception):
    pass


class TaskProblem(Exception):
    """Ends the attempt with a failure ``code``; ``retry`` asks for another attempt."""

    def __init__(self, code: str, message: str, retry: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry = retry


@dataclass
class Attempt:
    lease: pb.TaskLease
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False
    runner: asyncio.Task | None = None
    calls: list[pb.CallRecord] = field(default_factory=list)
    usage: pb.Usage = field(default_factory=pb.Usage)
    #: Payloads the attempt's tool calls wrote: the task result's outputs.
    outputs: list[common_pb2.PayloadRef] = field(default_factory=list)

    @property
    def task(self) -> pb.Task:
        return self.lease.task

    @property
    def epoch(self) -> int:
        return self.lease.attempt_epoch


def _digest(output: dict) -> common_pb2.Digest:
    data = json.dumps(output, sort_keys=True, default=str).encode()
    return common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256, value=hashlib.sha256(data).digest())


def _error_code(exc: PlanesError) -> str:
    # By kind, not by class name: the data plane's EgressDenied is a PermissionDenied too.
    for kind, code in ((PermissionDenied, "tool.denied"), (DeadlineExceeded, "deadline.exceeded"),
                       (Unavailable, "tool.unavailable")):
        if isinstance(exc, kind):
            return code
    return "tool.failed"


class _TimedOut(DeadlineExceeded):
    """The worker cut a call at its limit (the contract's timeout, the task's deadline): not the adapter's error."""


class _BadResult(TaskProblem):
    """``invoke`` returned, so the tool acted, but what it returned cannot be carried: the adapter is broken.

    ``message`` names where in the output (for the task's failure);
    ``evidence`` says the same without the output's keys, which may be data.
    """

    def __init__(self, message: str, evidence: str, context: ToolContext, seconds: float):
        super().__init__("tool.failed", message)
        self.evidence = evidence
        self.context = context
        self.seconds = seconds


def _call_failure(exc: Exception, call: ToolCall) -> tuple[str, str, str]:
    """``(outcome, error kind, message)`` of a tool call that raised ``exc``, for its call record.

    The message is composed here from names and limits: an adapter's own
    message may quote its arguments or output, and evidence keeps it for
    good, so only the error's class is taken from it.
    """
    named = f"tool {call.tool!r} (adapter {call.contract.adapter!r})"
    if isinstance(exc, _BadResult):
        return exc.code, "result.unusable", exc.evidence
    if isinstance(exc, _TimedOut):
        return "deadline.exceeded", "timeout", exc.message
    if isinstance(exc, _TaskCancelled):
        return "cancelled", "cancelled", f"{named} was cancelled mid-call"
    if isinstance(exc, _LeaseLost):
        return "lease.lost", "lease.lost", f"{named} was stopped: the lease was lost"
    if isinstance(exc, PlanesError):
        return _error_code(exc), type(exc).__name__, f"{named} raised {type(exc).__name__}"
    return "worker.error", "exception", f"{named} raised {type(exc).__name__}"


_JSON_TYPES = "str, number, bool, null, list, dict"


def _not_json(value, path: str) -> tuple[str, str] | None:
    """Where ``value`` stops being JSON-compatible (a protobuf Struct value); None if it is.

    Two ways: ``path is TYPE, ...`` and, for evidence, the same without the
    path (its keys are the output's) or the value.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (f"{path} is {value!r}, not a finite number",
                                                  "output holds a number that is not finite")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"{path} has a {type(key).__name__} key {key!r}; JSON keys are strings",
                        f"output has a {type(key).__name__} key; JSON keys are strings")
            found = _not_json(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _not_json(item, f"{path}[{index}]")
            if found:
                return found
        return None
    kind = type(value).__name__
    return f"{path} is {kind}, not JSON ({_JSON_TYPES})", f"output holds a {kind}, not JSON ({_JSON_TYPES})"


def _check_result(result, call: ToolCall) -> tuple[str, str] | None:
    """Why ``result`` is not a usable ToolResult, or None: checked as soon as ``invoke`` returns.

    Two ways, as :func:`_not_json`: for the task's failure, and for evidence.
    """
    where = f"adapter {call.contract.adapter!r} action {call.action_id!r}"
    if not isinstance(result, ToolResult):
        problem = f"adapter {call.contract.adapter!r} returned {type(result).__name__}; expected ToolResult"
        return problem, problem
    if not isinstance(result.output, dict):
        problem = f"{where}: output is {type(result.output).__name__}, not a dict"
        return problem, problem
    found = _not_json(result.output, "output")
    if found is not None:
        return f"{where}: {found[0]}", f"{where}: {found[1]}"
    try:
        struct_pb2.Struct().update(result.output)
    except (ValueError, TypeError) as exc:  # what the walk above missed, protobuf still refuses
        return f"{where}: output cannot be a protobuf Struct: {exc}", f"{where}: output cannot be a protobuf Struct"
    if not all(isinstance(ref, common_pb2.PayloadRef) for ref in result.outputs):
        problem = f"{where}: outputs must be PayloadRef messages"
        return problem, problem
    return None


class Worker:
    """Runs tasks leased from a worker plane client (remote, or in-process for tests)."""

    def __init__(self, client, *, cache, name: str | None = None, tenant: str = "*", slots: int = 4,
                 adapters: dict[str, ToolAdapter] | None = None, models: dict[str, ModelAdapter] | None = None,
                 secrets_dir: Path | None = None, batch_completions: bool = True, data_reader=None,
                 data_writer=None, config_wait: float = 0.5):
        self.client = client
        self.cache = cache
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.tenant = tenant
        self.slots = slots
        self.adapters = dict(adapters or {})
        self.models = dict(models or {})
        self.secrets_dir = secrets_dir
        self.batch_completions = batch_completions
        #: ``data_reader(ref, credential) -> bytes`` and ``data_writer(tenant, data, credential, **options)
        #: -> PayloadRef``: the data plane as tools and models see it (see :class:`DataPlaneIO`).
        self.data_reader = data_reader
        self.data_writer = data_writer
        self.config_wait = config_wait
        self.worker_id = ""
        self.heartbeat_interval = 10.0
        self.held: dict[str, Attempt] = {}
        self._slot_free = asyncio.Event()
        self._completions: list[tuple[pb.CompleteTaskRequest, asyncio.Future]] = []
        self._flushing = False
        self._config: RunConfig | None = None
        self.completed = 0

    # -- configuration -------------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        current = self.cache.current
        if current is None:
            return RunConfig.empty()
        if self._config is None or self._config.revision != current.revision:
            self._config = RunConfig.from_verified(current)
        return self._config

    def _health(self) -> common_pb2.HealthSummary:
        state, reason = self.cache.state()
        value = {"active": common_pb2.HealthSummary.STATE_HEALTHY,
                 "degraded": common_pb2.HealthSummary.STATE_DEGRADED}.get(
            state.value, common_pb2.HealthSummary.STATE_STOP_ADMITTING)
        return common_pb2.HealthSummary(state=value, reason=reason)

    # -- main loop -----------------------------------------------------------------

    async def register(self) -> None:
        reply = await self.client.register_worker(pb.RegisterWorkerRequest(
            tenant=self.tenant, name=self.name, host=socket.gethostname(), slots=self.slots,
            tools=sorted(self.adapters), model_routes=sorted(self.models), config=self.config.stamp), timeout=10)
        self.worker_id = reply.worker_id
        lease = reply.lease_duration.ToNanoseconds() / 1e9
        interval = reply.heartbeat_interval.ToNanoseconds() / 1e9
        self.heartbeat_interval = max(0.05, min(interval, lease / 3))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        await self.register()
        beat = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            while not stop.is_set():
                if not self.cache.admitting():
                    await _wait(stop, self.config_wait)
                    continue
                free = self.slots - len(self.held)
                if free <= 0:
                    self._slot_free.clear()
                    await _wait(self._slot_free, 1.0)
                    continue
                try:
                    reply = await self.client.lease_tasks(pb.LeaseTasksRequest(
                        tenant=self.tenant, worker_id=self.worker_id, max_tasks=free,
                        wait=duration_pb2.Duration(seconds=1), config=self.config.stamp), timeout=10)
                except NotFound:
                    await self.register()
                    continue
                except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                    log.warning("lease failed: %s", exc.message)
                    await _wait(stop, 0.5)
                    continue
                for lease in reply.leases:
                    attempt = Attempt(lease)
                    self.held[lease.task.task_id] = attempt
                    attempt.runner = asyncio.get_running_loop().create_task(self._run(attempt))
        finally:
            for attempt in list(self.held.values()):
                if attempt.runner is not None:
                    attempt.runner.cancel()
            await asyncio.gather(*(a.runner for a in self.held.values() if a.runner), return_exceptions=True)
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            held = list(self.held.values())
            request = pb.HeartbeatRequest(worker_id=self.worker_id, health=self._health(),
                                          capacity=common_pb2.CapacitySummary(
                                              slots_total=self.slots, slots_free=self.slots - len(held)))
            for attempt in held:
                request.leases.add(task_id=attempt.task.task_id, attempt_epoch=attempt.epoch, started=True)
            try:
                reply = await self.client.heartbeat(request, timeout=max(1.0, self.heartbeat_interval))
            except PlanesError as exc:
                log.warning("heartbeat failed: %s", exc.message)
                continue
            for attempt, renewal in zip(held, reply.leases):
                if renewal.state == pb.LEASE_STATE_LOST:
                    attempt.lost = True
                    attempt.cancel.set()
                elif renewal.state == pb.LEASE_STATE_CANCEL_REQUESTED:
                    attempt.cancel.set()
                if renewal.HasField("credential"):
                    attempt.lease.credential.CopyFrom(renewal.credential)

    # -- one attempt ------------------------------------------------------------------

    def _request_base(self, attempt: Attempt) -> dict:
        return {"tenant": attempt.task.tenant, "task_id": attempt.task.task_id, "attempt_epoch": attempt.epoch}

    async def _run(self, attempt: Attempt) -> None:
        task = attempt.task
        try:
            ledger = {effect.idempotency_key: effect for effect in attempt.lease.effects}
            outputs: dict[str, object] = {}
            for action in task.spec.actions:
                self._check(attempt)
                if action.WhichOneof("target") == "tool":
                    outputs[action.action_id] = await self._tool(attempt, action, ledger)
                else:
                    outputs[action.action_id] = await self._model(attempt, action)
            summary = struct_pb2.Struct()
            summary.update({"actions": outputs})
            result = pb.TaskResult(summary=summary, usage=attempt.usage, outputs=attempt.outputs)
            await self._complete(attempt, result)
        except (_LeaseLost, _AwaitApproval):
            pass  # the lease is gone: commit nothing more
        except _TaskCancelled:
            await self._fail(attempt, "cancelled", "cancelled while running", retry=False)
        except TaskProblem as problem:
            await self._fail(attempt, problem.code, problem.message, retry=problem.retry)
        except FailedPrecondition:
            pass  # the plane refused this epoch: the lease was lost
        except asyncio.CancelledError:
            raise
        except PlanesError as exc:
            await self._fail(attempt, _error_code(exc), exc.message, retry=isinstance(exc, RETRYABLE))
        except Exception as exc:  # an adapter bug must not take the worker down
            log.exception("task %s failed in the worker", task.task_id)
            await self._fail(attempt, "worker.error", type(exc).__name__, retry=True)
        finally:
            self.held.pop(task.task_id, None)
            self._slot_free.set()

    def _check(self, attempt: Attempt) -> None:
        if attempt.lost:
            raise _LeaseLost()
        if attempt.cancel.is_set():
            raise _TaskCancelled()

    async def _fail(self, attempt: Attempt, code: str, message: str, *, retry: bool) -> None:
        if attempt.lost:
            return
        try:
            await self.client.fail_task(pb.FailTaskRequest(
                **self._request_base(attempt), failure=pb.TaskFailure(code=code, message=message[:300]),
                retry=retry, usage=attempt.usage, config=self.config.stamp, calls=attempt.calls), timeout=10)
        except PlanesError as exc:
            log.warning("could not fail task %s: %s", attempt.task.task_id, exc.message)

    async def _complete(self, attempt: Attempt, result: pb.TaskResult) -> None:
        request = pb.CompleteTaskRequest(**self._request_base(attempt), result=result, config=self.config.stamp,
                                         calls=attempt.calls)
        if not self.batch_completions:
            await self.client.complete_task(request, timeout=10)
            self.completed += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._completions.append((request, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._completions:
                batch, self._completions = self._completions, []
                try:
                    reply = await self.client.complete_tasks(pb.CompleteTasksRequest(
                        worker_id=self.worker_id, completions=[r for r, _ in batch]), timeout=30)
                except PlanesError as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, reply.results):
                    if outcome.completed:
                        self.completed += 1
                        future.set_result(None)
                    else:
                        future.set_exception(FailedPrecondition(outcome.error))
        finally:
            self._flushing = False

    # -- tools -----------------------------------------------------------------------

    def _secrets(self, ref: str) -> Secrets:
        def resolve(name: str) -> bytes:
            if self.secrets_dir is None or "/" in name or name.startswith("."):
                raise PermissionDenied(f"credential {name!r} cannot be resolved on this worker")
            path = self.secrets_dir / name
            if not path.exists():
                raise PermissionDenied(f"credential {name!r} is not provisioned on this worker")
            return path.read_bytes()
        return Secrets(resolve, ref)

    def _context(self, attempt: Attempt, contract, key: str, timeout: float, *,
                 destination: str = "") -> ToolContext:
        task = attempt.task
        deadline = time.monotonic() + timeout
        if task.spec.HasField("deadline"):
            left = task.spec.deadline.ToNanoseconds() / 1e9 - time.time()
            deadline = min(deadline, time.monotonic() + left)
        config = self.config
        rank = max((class_rank(ref.classification) for ref in task.spec.inputs), default=0)

        def egress_allowed(destination: str) -> bool:
            allowed = contract.egress if contract is not None else []
            host = destination.rsplit(":", 1)[0]
            if destination not in allowed and host not in allowed:
                return False
            if rank and config.tenant(task.tenant).egress:
                return config.egress_allowed(task.tenant, rank, destination)
            return True

        credential = attempt.lease.credential
        return ToolContext(tenant=task.tenant, task_id=task.task_id, attempt_epoch=attempt.epoch,
                           correlation=task.spec.correlation,
                           secrets=self._secrets(contract.credential_ref if contract is not None else ""),
                           data=DataAccess(credential.token, frozenset(credential.payload_ids), self.data_reader,
                                           writer=self.data_writer, tenant=task.tenant,
                                           correlation=task.spec.correlation, refs=_task_refs(task),
                                           destination=destination or (f"tool:{contract.name}" if contract
                                                                       is not None else "")),
                           cancelled=attempt.cancel, deadline=deadline, egress_allowed=egress_allowed,
                           idempotency_key=key)

    async def _invoke(self, adapter: ToolAdapter, call: ToolCall, attempt: Attempt, retries: int):
        """Invoke with the contract's timeout and retry policy; cancellation stops the call.

        A call that fails, however it fails, leaves its call record (the
        failure code as outcome, the error kind, how long it ran) for the
        attempt's FailTask; a successful one is recorded by the caller.
        """
        tries = 0
        first = time.monotonic()
        context: ToolContext | None = None
        try:
            while True:
                tries += 1
                context = self._context(attempt, call.contract, call.idempotency_key, call.contract.timeout)
                started = time.monotonic()
                try:
                    result = await _race(adapter.invoke(call, context), attempt.cancel, context.deadline,
                                         _timeout_message(call, context.deadline - started))
                    ended = time.monotonic()
                    if ended > context.deadline:
                        # Only a blocked event loop gets a call here: _race cuts any other at the deadline.
                        # Which invoke blocked it cannot be told (this one, or another beside it), and this
                        # one's work is done: its result stands, as its effect did happen. Say so, for
                        # whoever runs the worker.
                        log.warning("the call of tool %r (adapter %r) returned %.1f s after it started, past its "
                                    "limit of %.3g s: the worker's event loop was blocked, by this adapter or "
                                    "another running beside it; an adapter must do blocking work in "
                                    "asyncio.to_thread", call.tool, call.contract.adapter, ended - started,
                                    context.deadline - started)
                    problem = _check_result(result, call)
                    if problem is not None:
                        raise _BadResult(*problem, context, ended - started)
                    # What the call wrote through the data plane is its output, whichever adapter ran it.
                    known = {ref.payload_id for ref in result.outputs}
                    result.outputs.extend(ref for ref in context.data.written if ref.payload_id not in known)
                    if result.outputs:
                        context.notes["outputs"] = ",".join(ref.payload_id for ref in result.outputs)
                    attempt.outputs.extend(result.outputs)
                    return result, context, time.monotonic() - started
                except RETRYABLE:
                    if tries >= retries or attempt.cancel.is_set():
                        raise
                    await asyncio.sleep(min(2.0, 0.1 * 2 ** tries))
        except Exception as exc:
            outcome, kind, message = _call_failure(exc, call)
            self._record(attempt, call.action_id, "tool", call.tool, call.contract.adapter, outcome,
                         time.monotonic() - first, dict(context.notes) if context is not None else {}, None,
                         error_kind=kind, error=message)
            raise

    def _record(self, attempt: Attempt, action_id: str, kind: str, target: str, adapter: str, outcome: str,
                seconds: float, notes: dict[str, str], output: dict | None, *, error_kind: str = "",
                error: str = "") -> None:
        record = pb.CallRecord(action_id=action_id, kind=kind, target=target, adapter=adapter, outcome=outcome,
                               notes=notes, error_kind=error_kind, error=error[:300])
        record.duration.FromNanoseconds(int(seconds * 1e9))
        if output is not None:
            record.result_digest.CopyFrom(_digest(output))
        attempt.calls.append(record)

    async def _tool(self, attempt: Attempt, action: pb.Action, ledger: dict[str, pb.Effect]) -> dict:
        task = attempt.task
        contract = self.config.tool(task.tenant, action.tool.tool)
        if contract is None:
            raise TaskProblem("tool.unknown", f"no tool contract {action.tool.tool!r} in revision "
                                              f"{self.config.revision}", retry=True)
        adapter = self.adapters.get(contract.adapter)
        if adapter is None:
            # The plane leases a worker only tasks it has the adapters for, unless it does not know them (a
            # worker with none, or a new revision changed the contract since the lease): another attempt may
            # reach a worker that has it.
            raise TaskProblem("tool.adapter_missing", f"no adapter {contract.adapter!r} on worker {self.name} "
                                                      f"(it has: {', '.join(sorted(self.adapters)) or 'none'})",
                              retry=True)
        key = f"{task.task_id}/{action.action_id}"
        call = ToolCall(action.action_id, contract.name, json_format.MessageToDict(action.tool.arguments),
                        tuple(action.tool.inputs), contract, key)
        attempt.usage.tool_calls += 1
        if contract.side_effect == "none":
            result, context, seconds = await self._invoke(adapter, call, attempt, contract.max_attempts)
            self._record(attempt, action.action_id, "tool", contract.name, contract.adapter, "ok", seconds,
                         context.notes, result.output)
            return result.output
        return await self._effect(attempt, action, adapter, call)

    async def _effect(self, attempt: Attempt, action: pb.Action, adapter: ToolAdapter, call: ToolCall) -> dict:
        contract = call.contract
        digest = action_digest(action)
        reply = await self.client.record_effect_intent(pb.RecordEffectIntentRequest(
            **self._request_base(attempt), idempotency_key=call.idempotency_key, action=action,
            action_digest=digest), timeout=10)
        decision = reply.decision
        if decision == pb.EFFECT_DECISION_SETTLED:
            if reply.effect.state == pb.EFFECT_STATE_COMMITTED:
                attempt.outputs.extend(reply.effect.outputs)  # written by an earlier attempt
                return {"settled": True, "result_digest": reply.effect.result_digest.value.hex()}
            raise TaskProblem("tool.failed", f"effect {call.idempotency_key} settled as "
                                             f"{pb.EffectState.Name(reply.effect.state)}")
        if decision == pb.EFFECT_DECISION_AWAIT_APPROVAL:
            raise _AwaitApproval()
        if decision == pb.EFFECT_DECISION_DENIED:
            raise TaskProblem("policy.denied", f"policy denies action {action.action_id}")
        if decision == pb.EFFECT_DECISION_CANCELLED:
            raise _TaskCancelled()
        notes: dict[str, str] = {}
        if decision == pb.EFFECT_DECISION_RESOLVE:
            notes["resolved"] = "retried" if contract.side_effect == "idempotent" else "reconciled"
            if contract.side_effect != "idempotent":
                context = self._context(attempt, contract, call.idempotency_key, contract.timeout)
                verdict = await adapter.reconcile(call, context)
                if verdict == Reconciliation.APPLIED:
                    await self._outcome(attempt, call, pb.EFFECT_STATE_COMMITTED, None, notes)
                    return {"settled": True, "reconciled": True}
                if verdict == Reconciliation.UNKNOWN:
                    await self._outcome(attempt, call, pb.EFFECT_STATE_ESCALATED, None, notes,
                                        error="outcome unknown and the tool is not idempotent")
                    raise TaskProblem("effect.escalated", f"effect {call.idempotency_key} needs a person: its "
                                                          "outcome is unknown and repeating it is not safe")
        retries = contract.max_attempts if contract.side_effect == "idempotent" else 1
        try:
            result, context, seconds = await self._invoke(adapter, call, attempt, retries)
        except _BadResult as bad:
            # invoke returned, so the effect happened: the ledger says so (a later attempt must not
            # repeat it), and the task fails rather than complete with an output it cannot carry.
            notes.update(bad.context.notes)
            notes["result"] = "unusable"
            await self._outcome(attempt, call, pb.EFFECT_STATE_COMMITTED, None, notes, error=bad.evidence)
            raise
        except (_TaskCancelled, _LeaseLost, PlanesError) as exc:
            await self._settle_interrupted(attempt, adapter, call, exc)
            raise
        notes.update(context.notes)
        # Recorded first: the call ran and returned even if recording its outcome fails the attempt.
        self._record(attempt, action.action_id, "tool", contract.name, contract.adapter, "ok", seconds, notes,
                     result.output)
        await self._outcome(attempt, call, pb.EFFECT_STATE_COMMITTED, result.output, notes, outputs=result.outputs)
        return result.output

    async def _settle_interrupted(self, attempt: Attempt, adapter: ToolAdapter, call: ToolCall,
                                  exc: BaseException) -> None:
        """Record what became of an effect that was stopped or failed mid-call."""
        if isinstance(exc, _LeaseLost) or attempt.lost:
            return  # a later attempt resolves it through the ledger
        if isinstance(exc, RETRYABLE):
            # The tool may or may not have acted (a timeout mid-call, a connection cut after the
            # request went out): the outcome is unknown, not failed. Left open, the next attempt
            # repeats an idempotent tool with the same key, or asks reconcile about another;
            # recorded as failed, it would only fail the task once it was re-queued.
            return
        # The outcome's error is evidence: the worker's words, not the adapter's (which may quote arguments).
        state, error = pb.EFFECT_STATE_FAILED, _call_failure(exc, call)[2]
        if isinstance(exc, _TaskCancelled):
            error = "cancelled mid-call"
            if call.contract.side_effect != "idempotent":
                context = self._context(attempt, call.contract, call.idempotency_key, 10.0)
                verdict = await adapter.reconcile(call, context)
                state = {Reconciliation.APPLIED: pb.EFFECT_STATE_COMMITTED,
                         Reconciliation.NOT_APPLIED: pb.EFFECT_STATE_FAILED}.get(verdict, pb.EFFECT_STATE_ESCALATED)
        try:
            await self._outcome(attempt, call, state, None, {}, error=error)
        except PlanesError as failure:
            log.warning("could not record the outcome of %s: %s", call.idempotency_key, failure.message)

    async def _outcome(self, attempt: Attempt, call: ToolCall, state: int, output: dict | None,
                       notes: dict[str, str], *, error: str = "", outputs=()) -> None:
        request = pb.RecordEffectOutcomeRequest(**self._request_base(attempt), idempotency_key=call.idempotency_key,
                                                state=state, error=error[:300], notes=notes, outputs=outputs)
        if output is not None:
            request.result_digest.CopyFrom(_digest(output))
        await self.client.record_effect_outcome(request, timeout=10)

    # -- models ----------------------------------------------------------------------

    async def _model(self, attempt: Attempt, action: pb.Action) -> dict:
        task = attempt.task
        parameters = json_format.MessageToDict(action.model.parameters)
        messages = parameters.pop("messages", None) or [{"role": "user", "content": str(parameters.pop("prompt", ""))}]
        refs = list(task.spec.inputs) + list(action.model.inputs)
        rank = max((class_rank(ref.classification) for ref in refs), default=0)
        context = self._context(attempt, None, "", 60.0, destination=f"model_route:{action.model.route}")
        for ref in action.model.inputs:
            content = await context.data.read(ref)
            messages.append({"role": "user", "content": content.decode(errors="replace")})
        try:
            routes = select_routes(self.config, task.tenant, action.model.route, rank)
        except PermissionDenied as exc:
            raise TaskProblem("model.denied", exc.message) from None
        request = ModelRequest(messages=messages, parameters=parameters, classification=rank)
        last: PlanesError | None = None
        for route in routes:
            adapter = self.models.get(route.adapter)
            if adapter is None:
                last = Unavailable(f"this worker has no {route.adapter!r} model adapter")
                continue
            started = time.monotonic()
            try:
                reply = await _race(adapter.complete(route, request, self._secrets(
                    str(route.spec.get("credential_ref", "")))), attempt.cancel, time.monotonic() + 120)
            except RETRYABLE as exc:
                last = exc
                continue
            notes = {"classification": str(rank)}
            if route is not routes[0]:
                notes["fallback_from"] = routes[0].name
            output = {"text": reply.text, "route": reply.route}
            self._record(attempt, action.action_id, "model", route.name, route.adapter, "ok",
                         time.monotonic() - started, notes, output)
            attempt.usage.model_calls += 1
            attempt.usage.tokens += reply.prompt_tokens + reply.completion_tokens
            return output
        raise TaskProblem("model.unavailable", last.message if last else "no model route answered", retry=True)


def _task_refs(task: pb.Task) -> tuple[common_pb2.PayloadRef, ...]:
    refs = list(task.spec.inputs)
    for action in task.spec.actions:
        target = action.WhichOneof("target")
        if target:
            refs += getattr(action, target).inputs
    return tuple(refs)


def _egress_hint(destination: str) -> str:
    """How a refused payload transfer is allowed: by a kind:name destination, which hosts do not match."""
    return (f"allow it with the destination \"{destination}\" for the payload's classification, in the kernel's "
            f"[plugin.data.egress] or in one of the tenant's egress_rule resources (where host destinations are "
            f"for a tool's own connections and do not count)")


def _correlated(tenant: str, correlation: common_pb2.Correlation | None):
    if correlation is None or not correlation.correlation_id:
        return contextlib.nullcontext()
    return acting_for(Identity("worker", tenant, frozenset({"worker"})), correlation.correlation_id,
                      request_id=correlation.request_id, trace_id=correlation.trace_id)


class DataPlaneIO:
    """A worker's reader and writer over a data plane client (the ``data_reader``/``data_writer`` hooks).

    Every request carries the attempt's task credential: a caller acting only
    as a worker is refused without one (to read, it must cover the payload).
    A read names the digest the reference holds and checks the bytes against
    it, so a changed payload is an error, not silently different input.
    """

    def __init__(self, client):
        self.client = client

    def _data(self, tenant: str, credential: str):
        from planes.plugins.data.client import DataClient  # the data plane's client library, not its plugin

        return DataClient(self.client, tenant, task_credential=credential)

    async def read(self, ref: common_pb2.PayloadRef, credential: str, *, destination: str = "",
                   correlation: common_pb2.Correlation | None = None) -> bytes:
        """The payload's bytes; with ``destination``, only once the data plane's egress rules allow it there.

        The calls carry the task's ``correlation``, so the data plane's records
        (the egress decision above all) join the task's evidence.
        """
        from planes.plugins.data.client import EgressDenied

        data = self._data(ref.tenant, credential)
        with _correlated(ref.tenant, correlation):
            if destination:
                # Refused (EgressDenied) or allowed, the decision is recorded by the data plane.
                try:
                    await data.transfer(ref.payload_id, destination)
                except EgressDenied as denied:
                    raise EgressDenied(f"{denied.message}; {_egress_hint(destination)}", denied.transfer_id) from None
            expected = ref.digest if ref.digest.value else None
            return await data.get_bytes(ref.payload_id, expected_digest=expected, verify=True, timeout=60)

    async def write(self, tenant: str, data: bytes, credential: str, *, classification: str = "internal",
                    name: str = "", media_type: str = "",
                    correlation: common_pb2.Correlation | None = None) -> common_pb2.PayloadRef:
        with _correlated(tenant, correlation):
            info = await self._data(tenant, credential).put(data, classification=classification, name=name,
                                                            media_type=media_type, correlation=correlation,
                                                            timeout=60)
        return info.ref


def _timeout_message(call: ToolCall, limit: float) -> str:
    if limit < call.contract.timeout - 0.001:
        return f"tool {call.tool!r} (adapter {call.contract.adapter!r}) ran past the task's deadline"
    return f"tool {call.tool!r} (adapter {call.contract.adapter!r}) ran past its timeout of {call.contract.timeout:g} s"


async def _race(coroutine, cancel: asyncio.Event, deadline: float,
                timeout_message: str = "the call ran past its timeout"):
    """Await ``coroutine`` unless ``cancel`` is set or ``deadline`` (monotonic) passes first."""
    work = asyncio.ensure_future(coroutine)
    stopper = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait({work, stopper}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        stopper.cancel()
        raise
    stopper.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    if cancel.is_set():
        raise _TaskCancelled()
    raise _TimedOut(timeout_message)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


#: The extension points a worker loads: a plugin that provides none of them is not the worker's business.
ADAPTER_POINTS = ("tool_adapter", "model_route")


def adapter_modules(settings) -> tuple[str, ...]:
    """``[plugin.execution-adapters] python_modules``, checked: the modules the python adapter may call
    beyond its defaults. A misspelt key or a wrongly typed value is refused by name."""
    import typing

    from planes.kernel.errors import PluginError

    configured = settings.plugin_settings_checked("execution-adapters", {"python_modules": typing.Any}).get(
        "python_modules", ())
    if isinstance(configured, str) or not all(isinstance(name, str) and name for name in configured):
        raise PluginError("execution-adapters", "[plugin.execution-adapters] python_modules must be a list of "
                                                "module names")
    return tuple(configured)


class WorkerKernel:
    """What ``setup(kernel)`` gets in a worker: the settings, not the kernel's planes.

    A worker hosts no planes and holds no signing key, so a plugin's setup
    there may read ``kernel.settings`` (``plugin_settings_as(name, ...)`` above all)
    and ``kernel.state_dir``; ``kernel.client(...)`` is refused with a
    FailedPrecondition, which stops the worker naming the plugin.
    """

    def __init__(self, settings):
        self.settings = settings

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    def client(self, contract, identity=None):
        raise FailedPrecondition(f"a worker hosts no planes: no {getattr(contract, 'plane', contract)} plane "
                                 "client in setup (keep adapters in a plugin of their own)")


def load_adapters(settings, python_modules: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Tool adapters and model adapters from every plugin, set up and validated now (not at first call).

    Raises :class:`~planes.kernel.errors.PluginError` naming the plugin when
    a plugin cannot be loaded (whether from an entry point or ``[plugins]
    modules``: a broken one might be an adapter, so it is never skipped
    unless ``[plugins] disabled`` names it), when its contract range excludes
    this worker's, when its ``setup`` raises, or when an adapter cannot be
    made, lacks a method or has a plain ``def`` where ``async def`` is needed.
    Plugins that load and provide no adapter (the planes) are left alone:
    their ``setup`` is the kernel's to call.
    """
    from planes.kernel.errors import PluginError
    from planes.kernel.host import check_implementation, check_plugin_tables, discover, validate

    from .adapters.python_tool import PythonAdapter

    tools: dict[str, ToolAdapter] = {}
    models: dict[str, ModelAdapter] = {}
    owners: dict[str, str] = {}
    kernel = WorkerKernel(settings)
    disabled = set(settings.plugins.disabled)
    for candidate in discover(settings):
        plugin = candidate.plugin
        if candidate.name in disabled or (plugin is not None and plugin.name in disabled):
            continue
        if plugin is None:
            raise PluginError(candidate.name, f"{candidate.error} (from {candidate.origin}); fix it, or name it "
                                              "in [plugins] disabled")
        provisions = [p for p in plugin.provides if getattr(p.contract, "extension_point", None) in ADAPTER_POINTS]
        if not provisions:
            continue
        validate(plugin)
        try:
            plugin.setup(kernel)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(plugin.name, f"setup failed: {type(exc).__name__}: {exc}") from exc
        for provision in provisions:
            try:
                implementation = plugin.implementation(provision)
            except PluginError:
                raise
            except Exception as exc:  # an abstract method left out fails here, as a TypeError
                raise PluginError(plugin.name, f"cannot make its {provision.key} implementation: "
                                               f"{type(exc).__name__}: {exc}") from exc
            check_implementation(plugin, provision, implementation)
            point = provision.contract.extension_point
            found = tools if point == "tool_adapter" else models
            if provision.name in found:
                # Tasks name adapters: two under one name would make which one runs depend on discovery order.
                raise PluginError(plugin.name, f"provides {provision.key}, which plugin "
                                               f"{owners[provision.key]!r} provides too; disable one in [plugins] disabled")
            found[provision.name] = implementation
            owners[provision.key] = plugin.name
    python = tools.get("python")
    # Checked at worker start: [plugin.execution-adapters] is the worker's to read, and so is each table's name.
    check_plugin_tables(settings)
    extra = adapter_modules(settings) + tuple(python_modules)
    if isinstance(python, PythonAdapter) and extra:
        python.allowed_modules = tuple(python.allowed_modules) + extra
    return tools, models


def worker_health_callable(worker: Worker) -> Callable[[], common_pb2.HealthSummary]:
    return worker._health
