"""A restarted control plane (new kernel and plugins on the same state directory) resumes its rollouts."""

from __future__ import annotations

import asyncio
import time

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contracts import ControlPlane
from tests.plugins.control.test_plane import _events, _serve

ROUTE = pb.RESOURCE_KIND_MODEL_ROUTE
GOOD = json_format.ParseDict({"adapter": "echo", "allowed_classifications": ["public"]}, struct_pb2.Struct())
HEALTHY = common_pb2.HealthSummary(state=common_pb2.HealthSummary.STATE_HEALTHY)
EXECUTION_1_0 = common_pb2.ContractVersion(plane="execution", major=1, minor=0)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _canary_of_revision_2(client, *, window=600, hosts=("host-a", "host-b"), canaries=("host-a",)):
    """Revision 1 on the fleet, revision 2 staged and rolled out to ``canaries``; returns the rollout."""
    admin = client(ControlPlane, ("admin",))
    worker = client(ControlPlane, ("worker",))
    await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
    await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
    for host in hosts:
        await worker.report_status(pb.ReportStatusRequest(
            subscriber_id=host, applied_revision=1, revision=1, outcome=pb.APPLY_OUTCOME_ACK, health=HEALTHY,
            capacity=common_pb2.CapacitySummary(slots_total=8, slots_free=3),
            contract_versions=[EXECUTION_1_0]), timeout=5)
    await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD,
                                                   expected_resource_version=1), timeout=5)
    await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
    started = await admin.start_rollout(pb.StartRolloutRequest(
        revision=2, cohort=pb.CanaryCohort(subscriber_ids=list(canaries)),
        window=duration_pb2.Duration(seconds=window)), timeout=5)
    return started.rollout


async def _status(client, rollout_id=""):
    admin = client(ControlPlane, ("admin",))
    return await admin.get_rollout_status(pb.GetRolloutStatusRequest(rollout_id=rollout_id), timeout=5)


async def _targets(client, hosts=("host-a", "host-b")):
    worker = client(ControlPlane, ("worker",))
    return [(await worker.report_status(pb.ReportStatusRequest(subscriber_id=h, applied_revision=1,
                                                               health=HEALTHY), timeout=5)).target_revision
            for h in hosts]


def test_restart_in_the_middle_of_a_canary_resumes_it(run, tmp_path):
    async def before(client, kernel, plugin):
        return await _canary_of_revision_2(client)

    async def after_restart(client, kernel, plugin):
        status = await _status(client)
        targets = await _targets(client)
        worker = client(ControlPlane, ("worker",))
        await worker.report_status(pb.ReportStatusRequest(
            subscriber_id="host-a", applied_revision=1, revision=2, outcome=pb.APPLY_OUTCOME_NACK,
            nack_reason=pb.NACK_REASON_APPLY_FAILED, error="route gpt: adapter not installed", health=HEALTHY),
            timeout=5)
        return status, targets, await _status(client, status.rollout.rollout_id)

    async def third_start(client, kernel, plugin):
        return await _status(client), await _events(client)

    rollout = _serve(run, tmp_path, before)
    resumed, targets, rolled = _serve(run, tmp_path, after_restart)
    assert resumed.rollout == rollout, "the rollout (cohort, window, state, start) survived the restart"
    assert resumed.fleet_revision == 1
    assert targets == [2, 1], "after the restart only the canary is targeted at the staged revision"
    hosts = {s.subscriber_id: s for s in resumed.subscribers}
    assert sorted(hosts) == ["host-a", "host-b"]
    assert hosts["host-a"].canary and not hosts["host-b"].canary
    assert (hosts["host-b"].applied_revision, hosts["host-b"].last_outcome) == (1, pb.APPLY_OUTCOME_ACK)
    assert hosts["host-b"].capacity.slots_free == 3 and list(hosts["host-b"].contract_versions) == [EXECUTION_1_0]
    assert hosts["host-b"].health.state == common_pb2.HealthSummary.STATE_HEALTHY
    assert not hosts["host-a"].watching, "no stream survives a restart"

    assert rolled.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK, "a NACK after the restart still rolls back"
    assert rolled.rollout.rollback_revision == 3 and rolled.fleet_revision == 3

    final, events = _serve(run, tmp_path, third_start)
    assert final.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK and final.fleet_revision == 3
    assert "host-a NACKed revision 2: NACK_REASON_APPLY_FAILED" in final.rollout.reason
    host_a = next(s for s in final.subscribers if s.subscriber_id == "host-a")
    assert (host_a.last_outcome, host_a.last_outcome_revision, host_a.nack_reason) == (
        pb.APPLY_OUTCOME_NACK, 2, pb.NACK_REASON_APPLY_FAILED)
    assert host_a.error == "route gpt: adapter not installed" and not host_a.canary
    assert [e.event_type for e in events] == ["config.published", "config.published", "rollout.started",
                                              "rollout.rolled_back"]


@pytest.mark.parametrize("confirmed", [False, True], ids=["unconfirmed", "confirmed"])
def test_a_window_that_ends_while_the_plane_is_down_is_judged_at_start(run, tmp_path, confirmed):
    clock = Clock(time.time())

    async def before(client, kernel, plugin):
        rollout = await _canary_of_revision_2(client, window=60)
        if confirmed:
            await client(ControlPlane, ("worker",)).report_status(pb.ReportStatusRequest(
                subscriber_id="host-a", applied_revision=2, revision=2, outcome=pb.APPLY_OUTCOME_ACK,
                health=HEALTHY), timeout=5)
        return rollout

    async def after_restart(client, kernel, plugin):
        return await _status(client), await _events(client)

    rollout = _serve(run, tmp_path, before, clock=clock)
    clock.now += 120
    status, events = _serve(run, tmp_path, after_restart, clock=clock)
    if confirmed:
        assert status.rollout.state == pb.ROLLOUT_STATE_CANARY, "a confirmed canary waits for a person to promote"
        assert status.fleet_revision == 1 and events[-1].event_type == "rollout.started"
        return
    assert status.rollout.rollout_id == rollout.rollout_id
    assert status.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK
    assert status.rollout.reason == "canary host-a did not confirm revision 2 within the 60 s window"
    assert status.fleet_revision == 3 == status.rollout.rollback_revision
    assert (events[-1].event_type, events[-1].correlation.actor) == ("rollout.rolled_back", "control")


def test_a_canary_nack_during_an_evidence_outage_rolls_back_after_restart(run, tmp_path):
    """Evidence before commit: no rollback while evidence is down; the NACK is kept and acted on later."""
    async def before(client, kernel, plugin):
        rollout = await _canary_of_revision_2(client)

        async def outage(tenant, events):
            raise errors.Unavailable("evidence store down")

        plugin.plane._record_events = outage
        reply = await client(ControlPlane, ("worker",)).report_status(pb.ReportStatusRequest(
            subscriber_id="host-a", applied_revision=1, revision=2, outcome=pb.APPLY_OUTCOME_NACK,
            nack_reason=pb.NACK_REASON_DIGEST_MISMATCH, error="digest mismatch"), timeout=5)
        return rollout, reply, await _status(client), plugin.store.latest_revision()

    async def after_restart(client, kernel, plugin):
        return await _status(client), await _events(client)

    rollout, reply, during, latest = _serve(run, tmp_path, before)
    assert reply.target_revision == 2, "the report is accepted; the rollback waits for evidence"
    assert during.rollout.state == pb.ROLLOUT_STATE_CANARY and latest == 2, "nothing changed without its record"
    status, events = _serve(run, tmp_path, after_restart)
    assert status.rollout.rollout_id == rollout.rollout_id
    assert status.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK and status.fleet_revision == 3
    assert "host-a NACKed revision 2: NACK_REASON_DIGEST_MISMATCH" in status.rollout.reason
    assert [e.event_type for e in events][-1] == "rollout.rolled_back"


def test_the_window_deadline_rolls_back_an_unconfirmed_canary_while_running(run, tmp_path):
    async def scenario(client, kernel, plugin):
        rollout = await _canary_of_revision_2(client, window=1)
        for _ in range(100):
            status = await _status(client)
            if status.rollout.state != pb.ROLLOUT_STATE_CANARY:
                break
            await asyncio.sleep(0.05)
        return rollout, status

    rollout, status = _serve(run, tmp_path, scenario)
    assert status.rollout.rollout_id == rollout.rollout_id
    assert status.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK and status.fleet_revision == 3
    assert "did not confirm revision 2" in status.rollout.reason
