"""`planes worker` processes over real gRPC: runs, SIGKILL at each step, cancellation mid-call."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from planes.execution.v1 import execution_service_pb2 as pb

from .conftest import spec, tool, wait_state

DONE = (pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _fields(event) -> dict[str, str]:
    return {f.name: f.string_value for f in event.fields}


def test_a_worker_process_runs_tasks_to_completion(scenario, tmp_path):
    ledger = tmp_path / "ledger"

    async def body(cluster):
        cluster.worker_process("w1")
        tasks = cluster.tasks()
        submitted = await tasks.submit_tasks(pb.SubmitTasksRequest(tasks=[
            spec(tool("a", "noop"), tool("b", "count", ledger=str(ledger))),
            spec(tool("a", "upper", text="hello")),
        ]))
        ends = [await wait_state(tasks, r.task.task_id, *DONE) for r in submitted.results]
        events = await cluster.events(submitted.results[0].task.spec.correlation.correlation_id)
        return ends, events
    ends, events = scenario(body)
    assert [t.state for t in ends] == [pb.TASK_STATE_COMPLETED] * 2, [t.failure for t in ends]
    assert ledger.read_text().splitlines() == [f"{ends[0].task_id}/b"]
    assert ends[1].result.summary["actions"]["a"]["text"] == "REDACTED", "the policy transform ran"
    types = [e.event_type for e in events]
    assert "tool.invoked" in types and "effect.intent" in types and "effect.committed" in types
    invoked = [_fields(e) for e in events if e.event_type == "tool.invoked"]
    assert {f["target"] for f in invoked} == {"noop", "count", "upper"}, "one batch shares its correlation"
    assert all(f["note.isolation"] == "in-process" for f in invoked)


@pytest.mark.parametrize("step", ["before-intent", "after-intent-before-effect", "after-effect-before-commit"])
def test_sigkill_at_each_step_resumes_with_the_effect_exactly_once(scenario, tmp_path, step):
    ledger, marker = tmp_path / "ledger", tmp_path / "marker"
    count = {"before-intent": tool("b", "count", ledger=str(ledger)),
             "after-intent-before-effect": tool("b", "count", ledger=str(ledger), pause_before=str(marker)),
             "after-effect-before-commit": tool("b", "count", ledger=str(ledger), pause_after=str(marker))}[step]
    actions = [tool("a", "pause", marker=str(marker)), count] if step == "before-intent" else [count]

    async def body(cluster):
        first = cluster.worker_process("doomed")
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(*actions)))
        task_id = submitted.task.task_id
        await _until(marker.exists)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        effects_at_kill = ledger.read_text().splitlines() if ledger.exists() else []
        cluster.worker_process("replacement")
        end = await wait_state(tasks, task_id, *DONE, timeout=60)
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return task_id, effects_at_kill, end, events
    task_id, effects_at_kill, end, events = scenario(body)
    assert end.state == pb.TASK_STATE_COMPLETED, end.failure
    assert end.attempt_epoch == 2
    assert effects_at_kill == ([f"{task_id}/b"] if step == "after-effect-before-commit" else [])
    assert ledger.read_text().splitlines() == [f"{task_id}/b"], "the effect happened exactly once"
    reasons = [_fields(e).get("reason", "") for e in events if e.event_type == "task.queued"]
    assert "lease of attempt 1 expired" in reasons
    settled = [_fields(e) for e in events if e.event_type == "effect.committed"]
    assert len(settled) == 1
    if step == "before-intent":
        assert "note.resolved" not in settled[0] and settled[0]["intent_epoch"] == "2"
    else:
        assert settled[0]["note.resolved"] == "reconciled"
        assert (settled[0]["intent_epoch"], settled[0]["outcome_epoch"]) == ("1", "2")


@pytest.mark.parametrize("tool_name, expected", [("count-idem", "retried"), ("count-blind", "escalated")])
def test_an_unknown_outcome_is_retried_with_its_key_or_escalated_never_repeated(scenario, tmp_path, tool_name,
                                                                                 expected):
    ledger, marker = tmp_path / "ledger", tmp_path / "marker"

    async def body(cluster):
        first = cluster.worker_process("doomed")
        tasks = cluster.tasks()
        action = tool("b", tool_name, ledger=str(ledger), pause_after=str(marker), dedupe=True)
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(action)))
        await _until(marker.exists)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        cluster.worker_process("replacement")
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, events
    end, events = scenario(body)
    assert ledger.read_text().splitlines() == [f"{end.task_id}/b"], "the effect happened exactly once"
    settled = [_fields(e) for e in events if e.event_type in ("effect.committed", "effect.escalated")]
    assert len(settled) == 1
    if expected == "retried":
        assert end.state == pb.TASK_STATE_COMPLETED, end.failure
        assert settled[0]["note.resolved"] == "retried"
    else:
        # A non-idempotent tool that cannot tell: a person decides, nothing is repeated.
        assert end.state == pb.TASK_STATE_FAILED and end.failure.code == "effect.escalated"
        assert "outcome unknown" in settled[0]["error"]


def test_subprocess_and_mcp_tools_run_through_a_worker_with_their_isolation_in_evidence(scenario):
    async def body(cluster):
        cluster.worker_process("w1")
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
            tool("a", "shell", greeting="hi"), tool("b", "clock", timezone="UTC"))))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=90)
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, events
    end, events = scenario(body)
    assert end.state == pb.TASK_STATE_COMPLETED, end.failure
    actions = end.result.summary["actions"]
    assert actions["a"]["greeting"] == "hi"
    assert actions["b"]["structured"]["timezone"] == "UTC"
    invoked = {f["target"]: f for f in (_fields(e) for e in events if e.event_type == "tool.invoked")}
    assert invoked["shell"]["note.isolation"] in ("bubblewrap", "rlimits+private-tmp")
    from planes.plugins.execution.adapters.subprocess_tool import bubblewrap
    if bubblewrap() is not None:
        assert invoked["shell"]["note.isolation"] == "bubblewrap"
    assert invoked["clock"]["note.mcp_server"] == "mcp-server-time"


def test_cancelling_in_the_middle_of_a_tool_call_stops_it(scenario, tmp_path):
    started = tmp_path / "started"

    async def body(cluster):
        cluster.worker_process("w1")
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
            tool("a", "sleep", seconds=600, started=str(started)))))
        await _until(started.exists)
        await tasks.cancel_task(pb.CancelTaskRequest(task_id=submitted.task.task_id, reason="changed my mind"))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, events
    end, events = scenario(body)
    assert end.state == pb.TASK_STATE_CANCELLED
    outcome = [_fields(e) for e in events if e.event_type == "effect.failed"]
    assert outcome and outcome[0]["error"] == "cancelled mid-call", "the interrupted effect's outcome is recorded"


@pytest.mark.parametrize("tool_name, expected", [("count-idem", "retried"), ("count", "reconciled")])
def test_a_tool_whose_answer_was_lost_is_resolved_by_the_next_attempt_not_failed(scenario, tmp_path, tool_name,
                                                                                   expected):
    """Unavailable after the tool acted: the outcome is unknown, so the effect stays open for the next attempt,
    which repeats an idempotent tool with the same key or reconciles another; the effect happens once."""
    ledger = tmp_path / "ledger"

    async def body(cluster):
        cluster.worker_process("flaky")
        tasks = cluster.tasks()
        action = tool("b", tool_name, ledger=str(ledger), unavailable_in_first_attempt=True, dedupe=True)
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(action)))
        end = await wait_state(tasks, submitted.task.task_id, *DONE, timeout=60)
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, events
    end, events = scenario(body)
    assert end.state == pb.TASK_STATE_COMPLETED, end.failure
    assert ledger.read_text().splitlines() == [f"{end.task_id}/b"], "the effect happened exactly once"
    committed = [_fields(e) for e in events if e.event_type == "effect.committed"]
    assert len(committed) == 1 and committed[0]["note.resolved"] == expected
    assert not [e for e in events if e.event_type == "effect.failed"], "a lost answer is not a failure"
