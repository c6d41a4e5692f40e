"""Guards: evidence outages (fail closed or buffer with a gap record) and the bounded cached configuration."""

from __future__ import annotations

import asyncio
import time

import pytest

from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contracts import EvidencePlane
from planes.plugins.control.subscriber import CachedConfig
from planes.plugins.execution import control_keys
from planes.plugins.execution.policy import action_digest
from planes.plugins.execution.worker import Worker, load_adapters

from .conftest import spec, tool, wait_state


def _break_evidence(cluster):
    """Point the execution plane's evidence writers at a port nobody listens on (a real outage)."""
    dead = connect("127.0.0.1:1", EvidencePlane, token=cluster.token(("service",), "*"))
    cluster.clients.append(dead)
    saved = cluster.plugin.strict.client, cluster.plugin.buffered.client
    cluster.plugin.strict.client = cluster.plugin.buffered.client = dead

    def restore():
        cluster.plugin.strict.client, cluster.plugin.buffered.client = saved
    return restore


def test_evidence_required_work_fails_closed_and_other_work_buffers(scenario):
    async def body(cluster):
        tasks, workers = cluster.tasks(), cluster.workers()
        required = spec(tool("a", "noop"), key="must-record", evidence_required=True)
        leased_spec = spec(tool("a", "count", ledger="/nowhere"), evidence_required=True)
        await tasks.submit_task(pb.SubmitTaskRequest(task=leased_spec))
        registered = await workers.register_worker(pb.RegisterWorkerRequest(tenant="*", name="w", slots=1))
        (lease,) = (await workers.lease_tasks(pb.LeaseTasksRequest(tenant="*", worker_id=registered.worker_id,
                                                                   max_tasks=1))).leases
        action = lease.task.spec.actions[0]
        intent = pb.RecordEffectIntentRequest(tenant="acme", task_id=lease.task.task_id,
                                              attempt_epoch=lease.attempt_epoch, idempotency_key="k",
                                              action=action, action_digest=action_digest(action))
        restore = _break_evidence(cluster)
        with pytest.raises(errors.Unavailable, match="evidence-required") as refused:
            await tasks.submit_task(pb.SubmitTaskRequest(task=required))
        with pytest.raises(errors.Unavailable, match="must not proceed"):
            await workers.record_effect_intent(intent)
        buffered = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        spooled = cluster.plugin.buffered.backlog
        restore()
        after = await tasks.submit_task(pb.SubmitTaskRequest(task=required))
        proceed = await workers.record_effect_intent(intent)
        await cluster.plugin.buffered.replay()
        events = await cluster.events(buffered.task.spec.correlation.correlation_id)
        return refused.value, after, proceed, buffered, spooled, events
    refused, after, proceed, buffered, spooled, events = scenario(body)
    assert "cannot be recorded" in refused.message
    assert after.created, "the refused submission left no task behind"
    assert proceed.decision == pb.EFFECT_DECISION_PROCEED, "the refused intent was not recorded"
    assert buffered.created and buffered.task.state == pb.TASK_STATE_QUEUED
    assert spooled
    assert [e.event_type for e in events if any(f.string_value == buffered.task.task_id for f in e.fields)] == \
        ["request.admitted", "policy.decided", "task.queued"], "the spooled events arrived once the plane was back"


def test_a_host_past_its_config_lease_stops_admitting(scenario):
    async def body(cluster):
        tasks = cluster.tasks()
        cache = cluster.plugin.cache
        cache.clock = lambda: time.time() + 10 ** 8  # far past the snapshot's expiry
        with pytest.raises(errors.Unavailable, match="not admitting tasks: configuration stop_admitting"):
            await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        cache.clock = time.time
        return await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
    assert scenario(body).created


def test_a_worker_without_a_verified_configuration_leases_nothing(scenario, tmp_path):
    async def body(cluster):
        keys = control_keys(cluster.state_dir / "keys" / "control-signing.pub.pem")
        cache = CachedConfig(tmp_path / "worker-config", keys)
        tools, models = load_adapters(cluster.kernel.settings)
        worker = Worker(cluster.workers(), cache=cache, name="cautious", adapters=tools, models=models,
                        config_wait=0.05)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "noop"))))
        await asyncio.sleep(1.0)
        waiting = await tasks.get_task(pb.GetTaskRequest(task_id=submitted.task.task_id))
        cache.offer(cluster.plugin.cache.current.signed)
        end = await wait_state(tasks, submitted.task.task_id, pb.TASK_STATE_COMPLETED)
        stop.set()
        await running
        return waiting, end
    waiting, end = scenario(body)
    assert waiting.task.state == pb.TASK_STATE_QUEUED
    assert end.state == pb.TASK_STATE_COMPLETED
