"""The execution plane's two servicers: thin, over :class:`~.engine.ExecutionEngine`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.call import CallContext
from planes.kernel.contracts.execution import TaskPlane, WorkerPlane
from planes.kernel.errors import InvalidArgument

from .engine import ExecutionEngine

MAX_BATCH = 1000


class Tasks(TaskPlane):
    def __init__(self, engine: ExecutionEngine):
        self.engine = engine

    async def submit_task(self, request: pb.SubmitTaskRequest, call: CallContext) -> pb.SubmitTaskResponse:
        (result,) = await self.engine.submit(request.tenant, [request.task], call)
        return result

    async def submit_tasks(self, request: pb.SubmitTasksRequest, call: CallContext) -> pb.SubmitTasksResponse:
        if not request.tasks:
            raise InvalidArgument("no tasks to submit")
        if len(request.tasks) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} tasks per call, got {len(request.tasks)}")
        return pb.SubmitTasksResponse(results=await self.engine.submit(request.tenant, list(request.tasks), call))

    async def get_task(self, request: pb.GetTaskRequest, call: CallContext) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(task=await self.engine.get(request.tenant, request.task_id))

    async def watch_task(self, request: pb.WatchTaskRequest, call: CallContext) -> AsyncIterator[pb.WatchTaskResponse]:
        async for change in self.engine.watch(request.tenant, request.task_id, request.after_version):
            yield change

    async def cancel_task(self, request: pb.CancelTaskRequest, call: CallContext) -> pb.CancelTaskResponse:
        return pb.CancelTaskResponse(task=await self.engine.cancel(request.tenant, request.task_id, request.reason))

    async def approve_task(self, request: pb.ApproveTaskRequest, call: CallContext) -> pb.ApproveTaskResponse:
        task, approval = await self.engine.decide_approval(request.tenant, request, True, call.identity.principal)
        return pb.ApproveTaskResponse(task=task, approval=approval)

    async def deny_task(self, request: pb.DenyTaskRequest, call: CallContext) -> pb.DenyTaskResponse:
        task, approval = await self.engine.decide_approval(request.tenant, request, False, call.identity.principal)
        return pb.DenyTaskResponse(task=task, approval=approval)


class Workers(WorkerPlane):
    def __init__(self, engine: ExecutionEngine):
        self.engine = engine

    async def register_worker(self, request: pb.RegisterWorkerRequest, call: CallContext) -> pb.RegisterWorkerResponse:
        return await self.engine.register(request, call.identity.principal)

    async def lease_tasks(self, request: pb.LeaseTasksRequest, call: CallContext) -> pb.LeaseTasksResponse:
        return await self.engine.lease(request, call.identity.principal)

    async def heartbeat(self, request: pb.HeartbeatRequest, call: CallContext) -> pb.HeartbeatResponse:
        return await self.engine.heartbeat(request, call.identity.principal)

    async def record_effect_intent(self, request: pb.RecordEffectIntentRequest,
                                   call: CallContext) -> pb.RecordEffectIntentResponse:
        return await self.engine.record_intent(request, call.identity.principal)

    async def record_effect_outcome(self, request: pb.RecordEffectOutcomeRequest,
                                    call: CallContext) -> pb.RecordEffectOutcomeResponse:
        return await self.engine.record_outcome(request, call.identity.principal)

    async def complete_task(self, request: pb.CompleteTaskRequest, call: CallContext) -> pb.CompleteTaskResponse:
        return pb.CompleteTaskResponse(task=await self.engine.complete(request, call.identity.principal))

    async def complete_tasks(self, request: pb.CompleteTasksRequest, call: CallContext) -> pb.CompleteTasksResponse:
        if len(request.completions) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} completions per call, got {len(request.completions)}")
        return await self.engine.complete_many(request, call.identity.principal, call.identity.may_act_for)

    async def fail_task(self, request: pb.FailTaskRequest, call: CallContext) -> pb.FailTaskResponse:
        return pb.FailTaskResponse(task=await self.engine.fail(request, call.identity.principal))
