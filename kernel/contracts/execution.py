"""The execution plane: governed tasks, and the workers that run them.

Services submit tasks, which are admitted, decided by policy, held for
approval where policy asks, queued, leased to workers and run to completion,
failure or cancellation; every transition is durable and recorded in evidence
with the config revision in force. Workers are separate processes holding
fenced leases; side effects go through an effect ledger so that a replacement
worker never repeats a committed effect. The two services are two contracts:
:class:`TaskPlane` for callers and :class:`WorkerPlane` for workers.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from planes.execution.v1 import execution_service_pb2 as pb

from ..call import CallContext
from ..contract import ContractVersion, PlaneContract

__all__ = ["TaskPlane", "WorkerPlane", "pb"]


class TaskPlane(PlaneContract):
    """Contract of ``planes.execution.v1.TaskService``."""

    plane = "execution"
    service = "planes.execution.v1.TaskService"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def submit_task(self, request: pb.SubmitTaskRequest, call: CallContext) -> pb.SubmitTaskResponse:
        """Admit a task and decide its policy.

        Called by services. Makes the task durable as admitted, decides policy
        from the current snapshot (its policies, tool and data classes and the
        task's risk), then queues it, holds it for approval, or fails it as
        ``policy.denied``; each step is an evidence event. Resubmitting with
        the same idempotency key returns the existing task with ``created``
        false and changes nothing.

        Raises:
            InvalidArgument: a malformed spec (an unknown tool, an action on
                a tool outside ``allowed_tools``, a deadline in the past).
            AlreadyExists: the idempotency key was used for a different spec.
            VersionMismatch: ``contract_version`` is not served here.
            LimitExceeded: the tenant's task quota or the budget's limits.
            Unavailable: the task is evidence-required and evidence cannot be
                recorded, or the configuration lease has run out and the host
                stopped admitting.
        """

    @abc.abstractmethod
    async def submit_tasks(self, request: pb.SubmitTasksRequest, call: CallContext) -> pb.SubmitTasksResponse:
        """Submit several tasks at once, each exactly as :meth:`submit_task` would.

        Called by services submitting in bulk. Every task of the batch is
        validated before any is admitted: one malformed spec refuses the whole
        batch, naming its index. The admitted tasks are durable, and their
        transitions in evidence, before the response.

        Raises:
            InvalidArgument: a malformed spec (the message names its index).
            AlreadyExists: an idempotency key reused for a different spec.
            Unavailable: as for :meth:`submit_task`.
        """

    @abc.abstractmethod
    async def get_task(self, request: pb.GetTaskRequest, call: CallContext) -> pb.GetTaskResponse:
        """Return a task's current state.

        Called by services and operators.

        Raises:
            NotFound: no task with this id in the tenant.
        """

    @abc.abstractmethod
    def watch_task(self, request: pb.WatchTaskRequest, call: CallContext) -> AsyncIterator[pb.WatchTaskResponse]:
        """Stream a task's state changes, starting with its current state.

        Called by services and operators following a task. Yields every change
        with a version above ``after_version`` in order, none twice, and ends
        after a terminal state.

        Raises:
            NotFound: no task with this id in the tenant.
        """

    @abc.abstractmethod
    async def cancel_task(self, request: pb.CancelTaskRequest, call: CallContext) -> pb.CancelTaskResponse:
        """Cancel a task.

        Called by services and operators. A task not yet leased ends cancelled
        at once; a leased or running one gets ``cancel_requested`` and ends
        cancelled when its worker stops (told through its heartbeat) or its
        lease expires, so that outcomes of effects under way are still
        recorded. Cancelling a cancelled task returns it unchanged.

        Raises:
            NotFound: no task with this id in the tenant.
            FailedPrecondition: the task already completed or failed.
        """

    @abc.abstractmethod
    async def approve_task(self, request: pb.ApproveTaskRequest, call: CallContext) -> pb.ApproveTaskResponse:
        """Approve one pending action, bound to its payload digest.

        Called by operators. Records the approver (the caller), the action id
        and the digest as an evidence event, and requeues the task once no
        approval is pending. The approval covers exactly that digest: an
        action whose payload changed needs a new one.

        Raises:
            NotFound: no such task, or no pending approval for the action.
            FailedPrecondition: ``action_digest`` differs from the pending
                action's (the payload changed since it was shown).
        """

    @abc.abstractmethod
    async def deny_task(self, request: pb.DenyTaskRequest, call: CallContext) -> pb.DenyTaskResponse:
        """Deny one pending action; the task fails as ``approval.denied``.

        Called by operators. Records the denial with its reason as an evidence
        event.

        Raises:
            NotFound: no such task, or no pending approval for the action.
            FailedPrecondition: ``action_digest`` differs from the pending
                action's.
        """


class WorkerPlane(PlaneContract):
    """Contract of ``planes.execution.v1.WorkerService``.

    A request that commits anything names the attempt epoch of its lease; one
    from an expired or superseded attempt raises
    :class:`~planes.kernel.errors.FailedPrecondition` and changes nothing.
    """

    plane = "execution.worker"
    service = "planes.execution.v1.WorkerService"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def register_worker(
        self, request: pb.RegisterWorkerRequest, call: CallContext
    ) -> pb.RegisterWorkerResponse:
        """Register a worker process and return its id and timing parameters.

        Called once by each worker process at start-up (a restart registers
        anew). The worker id is bound to the caller's principal.

        Raises:
            InvalidArgument: no slots, or an empty name.
            VersionMismatch: the worker lacks a contract version the current
                snapshot requires.
        """

    @abc.abstractmethod
    async def lease_tasks(self, request: pb.LeaseTasksRequest, call: CallContext) -> pb.LeaseTasksResponse:
        """Lease up to ``max_tasks`` queued tasks, waiting up to ``wait``.

        Called by workers in a loop. Each lease moves its task to leased under
        a new attempt epoch higher than any before, with a credential scoped
        to that attempt, the config stamp to run under and the effect ledger
        of earlier attempts; the lease and the transition are durable before
        the response. Returns no leases when none came in time.

        Raises:
            NotFound: the worker id is not registered (register again).
            PermissionDenied: the worker id belongs to another principal.
        """

    @abc.abstractmethod
    async def heartbeat(self, request: pb.HeartbeatRequest, call: CallContext) -> pb.HeartbeatResponse:
        """Extend a worker's leases and report which it lost or must cancel.

        Called by workers at least every heartbeat interval, naming each lease
        they hold. Extends every lease whose epoch is current, moves a task to
        running the first time its lease reports ``started``, and renews
        credentials near expiry. A lost lease is an answer
        (``LEASE_STATE_LOST``), not an error.

        Raises:
            NotFound: the worker id is not registered (register again).
            PermissionDenied: the worker id belongs to another principal.
        """

    @abc.abstractmethod
    async def record_effect_intent(
        self, request: pb.RecordEffectIntentRequest, call: CallContext
    ) -> pb.RecordEffectIntentResponse:
        """Record a side effect's intent before it happens; say what to do.

        Called by a worker before every side-effecting tool call. Makes the
        intent durable (and an ``effect.intent`` evidence event) before
        answering ``PROCEED``; returns ``SETTLED`` with the recorded outcome
        for an effect already settled, ``RESOLVE`` for an intent of an earlier
        attempt with no outcome, and ``AWAIT_APPROVAL``, ``DENIED`` or
        ``CANCELLED`` when policy or cancellation stops it (``AWAIT_APPROVAL``
        also ends the lease). Never answers ``PROCEED`` twice for one
        idempotency key.

        Raises:
            FailedPrecondition: the attempt epoch is not the task's current
                one (the lease was lost).
            InvalidArgument: ``action_digest`` does not match the action, or
                the tool is outside the task's ``allowed_tools``.
            LimitExceeded: the task's budget of tool calls is spent.
            Unavailable: the task is evidence-required and evidence cannot be
                recorded: the worker must not perform the effect.
        """

    @abc.abstractmethod
    async def record_effect_outcome(
        self, request: pb.RecordEffectOutcomeRequest, call: CallContext
    ) -> pb.RecordEffectOutcomeResponse:
        """Record the outcome of a side effect whose intent was recorded.

        Called by a worker after the effect, or after resolving an intent of
        an earlier attempt. The outcome is durable (and an evidence event)
        before the response; recording the same outcome again returns the
        entry unchanged. Accepted while a cancellation is pending.

        Raises:
            FailedPrecondition: the attempt epoch is not current, or a
                different outcome is already recorded.
            NotFound: no intent with this idempotency key.
            InvalidArgument: a state that is not an outcome.
        """

    @abc.abstractmethod
    async def complete_task(self, request: pb.CompleteTaskRequest, call: CallContext) -> pb.CompleteTaskResponse:
        """Complete a task with its outputs; the lease ends.

        Called by the worker holding the current lease. The completion, with
        the config stamp the attempt ran under, is durable and recorded as
        ``task.completed`` before the response. A completion that races a
        pending cancellation wins: the work is done.

        Raises:
            FailedPrecondition: the attempt epoch is not current, or an
                intent is still unsettled.
            LimitExceeded: the reported usage breaks the task's budget.
        """

    @abc.abstractmethod
    async def complete_tasks(
        self, request: pb.CompleteTasksRequest, call: CallContext
    ) -> pb.CompleteTasksResponse:
        """Complete several leased tasks in one call, each as :meth:`complete_task`.

        Called by workers that finish tasks faster than one round trip each.
        Every completion is judged on its own: a lost lease or an unsettled
        intent refuses that one (reported in its result, nothing committed
        for it) and the others proceed. Durable and in evidence before the
        response.

        Raises:
            NotFound: the worker id is not registered (register again).
            PermissionDenied: the worker id belongs to another principal, or
                a completion names a tenant the caller may not act for.
        """

    @abc.abstractmethod
    async def fail_task(self, request: pb.FailTaskRequest, call: CallContext) -> pb.FailTaskResponse:
        """Fail a task attempt, for good or for a retry; the lease ends.

        Called by the worker holding the current lease. With ``retry`` and
        attempts left under the retry policy, the task is queued again for a
        new epoch; otherwise it fails, or ends cancelled if a cancellation is
        pending. Durable and recorded in evidence before the response.

        Raises:
            FailedPrecondition: the attempt epoch is not current.
            InvalidArgument: a failure without a code.
        """
