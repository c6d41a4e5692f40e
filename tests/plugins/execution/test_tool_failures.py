"""How a worker reports a tool call that goes wrong: broken results, a blocked event loop, timeouts.

Each test runs the real kernel (evidence, control, execution) on a loopback
port and an in-process worker over gRPC, with small adapters that misbehave
one way each.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import pytest

from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.plugins.execution.tools import ToolAdapter, ToolDescription, ToolResult
from planes.plugins.execution.worker import Worker

from .conftest import spec, tool, wait_state

DONE = (pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)


class _Adapter(ToolAdapter):
    """Counts its calls; ``result()`` says what each returns."""

    def __init__(self):
        self.calls = 0

    def describe(self, contract) -> ToolDescription:
        return ToolDescription(type(self).__name__, "a test adapter")

    async def invoke(self, call, context):
        self.calls += 1
        return await self.result(call, context)


class NotJson(_Adapter):
    async def result(self, call, context):
        return ToolResult(output={"text": "ok", "when": datetime.datetime.now(), "obj": object()})


class NestedNotJson(_Adapter):
    async def result(self, call, context):
        return ToolResult(output={"items": [1, {"at": {1, 2}}]})


class PlainDict(_Adapter):
    async def result(self, call, context):
        return {"text": "a dict, not a ToolResult"}


class BlocksTheLoop(_Adapter):
    async def result(self, call, context):
        time.sleep(float(call.arguments.get("seconds", 1.0)))  # the mistake under test: a blocking call
        return ToolResult(output={"text": "late"})


class Sleeps(_Adapter):
    async def result(self, call, context):
        await asyncio.sleep(60)
        return ToolResult(output={"text": "never"})


def _contract(adapter: str, side_effect: str = "none", **extra) -> tuple:
    return (cpb.RESOURCE_KIND_TOOL_CONTRACT, f"{adapter}-{side_effect}".replace("_", "-"),
            {"version": "1", "adapter": adapter, "target": {}, "side_effect": side_effect,
             "classification": "internal", **extra})


def _fields(event) -> dict[str, str]:
    return {f.name: f.string_value for f in event.fields}


def _run_one(scenario, adapters: dict[str, ToolAdapter], contract: tuple, **arguments):
    """Publish ``contract``, run one task calling it on a worker with ``adapters``; the end state and events."""
    async def body(cluster):
        await cluster.publish([contract])
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="w", adapters=adapters)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", contract[1], **arguments))))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        stop.set()
        await running
        return end, await cluster.events(submitted.task.spec.correlation.correlation_id)
    return scenario(body)


@pytest.mark.parametrize("side_effect", ["none", "non_idempotent"])
def test_output_that_is_not_json_fails_the_task_at_once_naming_the_key_and_type(scenario, side_effect):
    adapter = NotJson()
    end, events = _run_one(scenario, {"odd": adapter}, _contract("odd", side_effect))
    assert end.state == pb.TASK_STATE_FAILED, "never COMPLETED with its output lost"
    assert end.failure.code == "tool.failed"
    assert end.failure.message == ("adapter 'odd' action 'a': output['when'] is datetime, not JSON "
                                   "(str, number, bool, null, list, dict)")
    assert adapter.calls == 1, "a broken adapter is not run again"
    assert end.attempt_epoch == 1
    effects = [e.event_type for e in events if e.event_type.startswith("effect.")]
    if side_effect == "non_idempotent":
        # The tool acted: the ledger says so, and says why the task still failed.
        assert effects == ["effect.intent", "effect.committed"]
        committed = _fields(next(e for e in events if e.event_type == "effect.committed"))
        # Evidence: what went wrong, not where in the output (its keys may be data).
        assert committed["note.result"] == "unusable"
        assert committed["error"] == ("adapter 'odd' action 'a': output holds a datetime, not JSON "
                                      "(str, number, bool, null, list, dict)")
    else:
        assert effects == []


def test_a_nested_value_that_is_not_json_is_named_by_its_path(scenario):
    end, _ = _run_one(scenario, {"nested": NestedNotJson()}, _contract("nested"))
    assert end.state == pb.TASK_STATE_FAILED
    assert end.failure.message == ("adapter 'nested' action 'a': output['items'][1]['at'] is set, not JSON "
                                   "(str, number, bool, null, list, dict)")


def test_a_result_that_is_not_a_tool_result_fails_at_once_naming_the_adapter(scenario):
    adapter = PlainDict()
    end, _ = _run_one(scenario, {"plain": adapter}, _contract("plain"))
    assert end.state == pb.TASK_STATE_FAILED
    assert (end.failure.code, end.failure.message) == ("tool.failed", "adapter 'plain' returned dict; "
                                                                      "expected ToolResult")
    assert adapter.calls == 1 and end.attempt_epoch == 1


def test_a_timeout_names_the_tool_the_adapter_and_the_limit(scenario):
    end, _ = _run_one(scenario, {"sleeps": Sleeps()}, _contract("sleeps", timeout_seconds=0.2))
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "deadline.exceeded"
    assert end.failure.message == "tool 'sleeps-none' (adapter 'sleeps') ran past its timeout of 0.2 s"


def test_a_result_after_a_blocked_loop_stands_and_the_worker_says_the_loop_was_blocked(scenario, caplog):
    """The call did its work, so its result counts (which adapter blocked the loop cannot be told: it may be
    another running beside it); the worker's log says the loop was blocked and what to do about it."""
    caplog.set_level(logging.WARNING, logger="planes.execution.worker")
    adapter = BlocksTheLoop()
    end, _ = _run_one(scenario, {"blocks": adapter}, _contract("blocks", timeout_seconds=0.2), seconds=0.6)
    assert end.state == pb.TASK_STATE_COMPLETED and adapter.calls == 1
    warnings = [r.getMessage() for r in caplog.records if "event loop was blocked" in r.getMessage()]
    assert warnings and "tool 'blocks-none' (adapter 'blocks')" in warnings[0]
    assert "past its limit of 0.2 s" in warnings[0] and "asyncio.to_thread" in warnings[0]


def test_a_side_effect_that_returned_after_a_blocked_loop_is_committed_once(scenario):
    adapter = BlocksTheLoop()
    end, events = _run_one(scenario, {"blocks": adapter}, _contract("blocks", "non_idempotent", timeout_seconds=0.2),
                           seconds=0.6)
    assert end.state == pb.TASK_STATE_COMPLETED and adapter.calls == 1
    effects = [e.event_type for e in events if e.event_type.startswith("effect.")]
    assert effects == ["effect.intent", "effect.committed"], "it happened, once, and the ledger says so"


class ReadsItsInput(_Adapter):
    async def result(self, call, context):
        return ToolResult(output={"size": len(await context.data.read(call.inputs[0]))})


def test_a_payload_the_data_planes_egress_rules_refuse_is_tool_denied_naming_where_the_rule_lives(scenario):
    from planes.kernel.contracts import DataPlane
    from planes.plugins.data.client import DataClient
    from planes.plugins.execution.worker import DataPlaneIO

    async def body(cluster):
        name = "reads-conf"
        await cluster.publish([(cpb.RESOURCE_KIND_TOOL_CONTRACT, name, {
            "version": "1", "adapter": "reads", "target": {}, "side_effect": "none",
            "classification": "confidential"})])
        data = DataClient(cluster.client(DataPlane, ("service",)), "acme")
        info = await data.put(b"the secret plan", classification="confidential")
        io = DataPlaneIO(cluster.client(DataPlane, ("worker",), "*", "worker-1"))
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="w", adapters={"reads": ReadsItsInput()},
                        data_reader=io.read, data_writer=io.write)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        action = tool("a", name)
        action.tool.inputs.append(info.ref)
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(action)))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        stop.set()
        await running
        return end, await cluster.events(submitted.task.spec.correlation.correlation_id)
    end, events = scenario(body, data=True)
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "tool.denied", end.failure
    message = end.failure.message
    assert message.startswith("confidential data may not go to tool 'reads-conf': no egress rule allows it")
    assert "[plugin.data.egress]" in message and '"tool:reads-conf"' in message and "egress_rule" in message
    assert "data.denied" in [e.event_type for e in events], "the data plane recorded its refusal"


def test_a_task_whose_adapter_no_worker_has_says_so_on_the_task_and_waits(scenario):
    from planes.plugins.execution.worker import load_adapters

    async def body(cluster):
        await cluster.publish([(cpb.RESOURCE_KIND_TOOL_CONTRACT, "reverse", {
            "version": "1", "adapter": "revers", "target": {}, "side_effect": "none", "classification": "internal"})])
        tools, models = load_adapters(cluster.kernel.settings)
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="w7", adapters=tools, models=models)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "reverse"))))
        changes = []
        async with asyncio.timeout(30):
            async for change in tasks.watch_task(pb.WatchTaskRequest(task_id=submitted.task.task_id)):
                changes.append(change)
                if "no registered worker" in change.reason:
                    break
        stop.set()
        await running
        now = (await tasks.get_task(pb.GetTaskRequest(task_id=submitted.task.task_id))).task
        return tools, changes[-1], now, await cluster.events(submitted.task.spec.correlation.correlation_id)
    tools, change, now, events = scenario(body)
    assert change.reason == ("waiting for a worker with adapter 'revers' (tool 'reverse'): no registered worker "
                             f"has it; worker w7 has: {', '.join(sorted(tools))}")
    assert now.state == pb.TASK_STATE_QUEUED, "a worker with the adapter may still register"
    updated = [_fields(e) for e in events if e.event_type == "task.updated"]
    assert len(updated) == 1, "said once, not at every lease"
    assert (updated[0]["tool"], updated[0]["adapter"]) == ("reverse", "revers")


def test_a_worker_that_leases_a_task_it_has_no_adapter_for_fails_it_naming_what_it_has(scenario):
    async def body(cluster):
        # A worker without tool adapters registers none, so the plane does not filter what it leases.
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="models-only", adapters={})
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        stop.set()
        await running
        return end
    end = scenario(body)
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "tool.adapter_missing"
    assert end.failure.message == "no adapter 'python' on worker models-only (it has: none)"


# -- what a failed tool call leaves in evidence ---------------------------------------------------------

#: An argument value and output keys and values no evidence event may carry.
SECRET_ARGUMENT = "argument-value-7f3a"
SECRET_OUTPUT = "output-value-91c2"


class RaisesTyped(_Adapter):
    async def result(self, call, context):
        from planes.kernel.errors import InvalidArgument

        context.notes["isolation"] = "in-process"
        raise InvalidArgument(f"cannot use {call.arguments['secret']!r}")  # quotes its argument: the mistake


class RaisesPlain(_Adapter):
    async def result(self, call, context):
        raise RuntimeError(call.arguments["secret"])


class LeakyNotJson(_Adapter):
    async def result(self, call, context):
        return ToolResult(output={"text": SECRET_OUTPUT, SECRET_OUTPUT: datetime.datetime.now()})


class Echoes(_Adapter):
    async def result(self, call, context):
        return ToolResult(output={"text": SECRET_OUTPUT})


#: Fields of tool.invoked (without result_digest, which a failed call has not) and what tool.failed adds.
CALL_FIELDS = {"task_id", "action_id", "target", "adapter", "outcome", "duration_ms"}
FAILED_FIELDS = CALL_FIELDS | {"attempt_epoch", "error_kind", "error"}


def _failed_calls(events) -> list[dict[str, str]]:
    return [_fields(e) for e in events if e.event_type == "tool.failed"]


def _assert_no_values(events) -> None:
    for event in events:
        for name, value in _fields(event).items():
            assert SECRET_ARGUMENT not in value and SECRET_OUTPUT not in value, (event.event_type, name, value)


def _assert_failed_call(fields: dict[str, str], contract: tuple, *, outcome: str, kind: str) -> None:
    assert CALL_FIELDS <= set(fields) <= FAILED_FIELDS | {f for f in fields if f.startswith("note.")}
    assert (fields["action_id"], fields["target"], fields["adapter"]) == ("a", contract[1], contract[2]["adapter"])
    assert (fields["outcome"], fields["error_kind"]) == (outcome, kind)
    assert int(fields["duration_ms"]) >= 0 and fields["error"]


@pytest.mark.parametrize("side_effect", ["none", "non_idempotent"])
def test_an_adapter_error_leaves_one_tool_failed_naming_tool_adapter_and_kind_never_the_argument(scenario,
                                                                                                   side_effect):
    adapter = RaisesTyped()
    contract = _contract("typed", side_effect)
    end, events = _run_one(scenario, {"typed": adapter}, contract, secret=SECRET_ARGUMENT)
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "tool.failed"
    assert SECRET_ARGUMENT in end.failure.message, "the task's failure still says what the adapter said"
    failed = _failed_calls(events)
    assert adapter.calls == 1 and len(failed) == 1
    _assert_failed_call(failed[0], contract, outcome="tool.failed", kind="InvalidArgument")
    assert failed[0]["error"] == f"tool {contract[1]!r} (adapter 'typed') raised InvalidArgument"
    assert failed[0]["attempt_epoch"] == "1" and failed[0]["note.isolation"] == "in-process"
    assert "tool.invoked" not in [e.event_type for e in events]
    _assert_no_values(events)


@pytest.mark.parametrize("side_effect", ["none", "non_idempotent"])
def test_a_plain_exception_leaves_one_tool_failed_per_attempt_that_ran_the_tool(scenario, side_effect):
    adapter = RaisesPlain()
    contract = _contract("plain-error", side_effect)
    end, events = _run_one(scenario, {"plain-error": adapter}, contract, secret=SECRET_ARGUMENT)
    assert end.state == pb.TASK_STATE_FAILED
    failed = _failed_calls(events)
    # Re-queued until the cluster's 4 attempts ran out; a side effect whose outcome was lost is not
    # repeated: the next attempt asks reconcile (here: cannot tell) and escalates, without a call.
    attempts = ["1", "2", "3", "4"] if side_effect == "none" else ["1"]
    assert adapter.calls == len(attempts)
    assert [f["attempt_epoch"] for f in failed] == attempts
    for fields in failed:
        _assert_failed_call(fields, contract, outcome="worker.error", kind="exception")
        assert fields["error"] == f"tool {contract[1]!r} (adapter 'plain-error') raised RuntimeError"
    _assert_no_values(events)


def test_a_timeout_leaves_one_tool_failed_per_attempt_with_how_long_it_ran(scenario):
    adapter = Sleeps()
    # Two tries within each attempt: still one record per attempt, timed from the first try.
    contract = _contract("sleeps", timeout_seconds=0.2, max_attempts=2)
    end, events = _run_one(scenario, {"sleeps": adapter}, contract, secret=SECRET_ARGUMENT)
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "deadline.exceeded"
    failed = _failed_calls(events)
    assert [f["attempt_epoch"] for f in failed] == ["1", "2", "3", "4"] and adapter.calls == 8
    for fields in failed:
        _assert_failed_call(fields, contract, outcome="deadline.exceeded", kind="timeout")
        assert fields["error"] == "tool 'sleeps-none' (adapter 'sleeps') ran past its timeout of 0.2 s"
        assert int(fields["duration_ms"]) >= 400, "two tries of 0.2 s"
    _assert_no_values(events)


@pytest.mark.parametrize("side_effect", ["none", "non_idempotent"])
def test_an_unusable_result_leaves_one_tool_failed_without_the_outputs_keys_or_values(scenario, side_effect):
    adapter = LeakyNotJson()
    contract = _contract("leaky", side_effect)
    end, events = _run_one(scenario, {"leaky": adapter}, contract)
    assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "tool.failed"
    failed = _failed_calls(events)
    assert adapter.calls == 1 and len(failed) == 1
    _assert_failed_call(failed[0], contract, outcome="tool.failed", kind="result.unusable")
    assert failed[0]["error"] == ("adapter 'leaky' action 'a': output holds a datetime, not JSON "
                                  "(str, number, bool, null, list, dict)")
    assert "result_digest" not in failed[0]
    _assert_no_values(events)


@pytest.mark.parametrize("side_effect", ["none", "non_idempotent"])
def test_a_successful_call_is_still_tool_invoked_and_nothing_failed(scenario, side_effect):
    contract = _contract("echoes", side_effect)
    end, events = _run_one(scenario, {"echoes": Echoes()}, contract, secret=SECRET_ARGUMENT)
    assert end.state == pb.TASK_STATE_COMPLETED
    assert _failed_calls(events) == []
    (invoked,) = [_fields(e) for e in events if e.event_type == "tool.invoked"]
    assert set(invoked) == CALL_FIELDS | {"result_digest"}
    assert (invoked["target"], invoked["adapter"], invoked["outcome"]) == (contract[1], "echoes", "ok")
    _assert_no_values(events)
