"""What the control plane refuses: acting as another's subscriber, moving the fleet backwards,
recording writes that lost a race, and revision 0 where it does not mean what the caller thinks."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contracts import ControlPlane
from tests.plugins.control.test_plane import _events, _serve

ROUTE = pb.RESOURCE_KIND_MODEL_ROUTE


def _spec(adapter: str = "echo") -> struct_pb2.Struct:
    return json_format.ParseDict({"adapter": adapter, "allowed_classifications": ["public"]}, struct_pb2.Struct())


async def _canary(admin, host, *, staged_content: str = "v2") -> pb.Rollout:
    """Revision 1 on the fleet (host-a reporting it), revision 2 staged and in canary on host-a."""
    await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec()), timeout=5)
    await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
    await host.report_status(pb.ReportStatusRequest(subscriber_id="host-a", applied_revision=1), timeout=5)
    await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec(staged_content),
                                                   expected_resource_version=1), timeout=5)
    await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
    return (await admin.start_rollout(pb.StartRolloutRequest(
        revision=2, cohort=pb.CanaryCohort(subscriber_ids=["host-a"])), timeout=5)).rollout


async def _canary_then_changed(client) -> tuple:
    """:func:`_canary`, then the resource changed again (v3, not yet published); the admin client and rollout."""
    admin = client(ControlPlane, ("admin",))
    rollout = await _canary(admin, client(ControlPlane, ("worker",)))
    await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec("v3"),
                                                   expected_resource_version=2), timeout=5)
    return admin, rollout


# -- subscribers are bound to who they are ----------------------------------------------------------

def test_nobody_reports_or_watches_as_another_principals_subscriber(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        host = client(ControlPlane, ("service",), principal="host-a-svc")
        rollout = await _canary(admin, host)
        recorded = len(await _events(client))
        nack = pb.ReportStatusRequest(subscriber_id="host-a", applied_revision=1, revision=2,
                                      outcome=pb.APPLY_OUTCOME_NACK, nack_reason=pb.NACK_REASON_BAD_SIGNATURE)
        refusals = {}
        for who, caller in (("tenant worker", client(ControlPlane, ("worker",), tenant="acme", principal="evil")),
                            ("fleet worker", client(ControlPlane, ("worker",), principal="other"))):
            with pytest.raises(errors.PermissionDenied) as refused:
                await caller.report_status(nack, timeout=5)
            refusals[(who, "report")] = refused.value.message
            with pytest.raises(errors.PermissionDenied) as refused:
                stream = caller.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="host-a"))
                await asyncio.wait_for(stream.__anext__(), 5)
            refusals[(who, "watch")] = refused.value.message
        with pytest.raises(errors.PermissionDenied, match="acts for tenant 'acme'"):
            await client(ControlPlane, ("worker",), tenant="acme", principal="evil").report_status(
                pb.ReportStatusRequest(subscriber_id="evil-own-id"), timeout=5)
        status = await admin.get_rollout_status(pb.GetRolloutStatusRequest(rollout_id=rollout.rollout_id), timeout=5)
        own = await client(ControlPlane, ("worker",), principal="other").report_status(
            pb.ReportStatusRequest(subscriber_id="other-1", applied_revision=1), timeout=5)
        # The host itself still reports, and an admin (here also a service) may act as any subscriber.
        acked = await host.report_status(pb.ReportStatusRequest(
            subscriber_id="host-a", applied_revision=2, revision=2, outcome=pb.APPLY_OUTCOME_ACK), timeout=5)
        await client(ControlPlane, ("admin", "service"), principal="ops").report_status(
            pb.ReportStatusRequest(subscriber_id="host-a", applied_revision=2), timeout=5)
        after = await host.report_status(pb.ReportStatusRequest(subscriber_id="host-a", applied_revision=2),
                                         timeout=5)
        return (refusals, status, recorded, len(await _events(client)), plugin.store.latest_revision(), own, acked,
                after, plugin.store.subscriber_owners())

    refusals, status, recorded, recorded_after, latest, own, acked, after, owners = _serve(run, tmp_path, scenario)
    assert "'evil' acts for tenant 'acme' and may not be subscriber 'host-a'" in refusals[("tenant worker", "report")]
    assert "subscriber 'host-a' belongs to another principal; 'other' may" in refusals[("fleet worker", "report")]
    assert "belongs to another principal" in refusals[("fleet worker", "watch")]
    assert not any("host-a-svc" in message for message in refusals.values()), "the owner is not named"
    assert status.rollout.state == pb.ROLLOUT_STATE_CANARY, "the forged NACK rolled nothing back"
    assert (recorded_after, latest) == (recorded, 2), "nothing was recorded or published"
    host_a = next(s for s in status.subscribers if s.subscriber_id == "host-a")
    assert (host_a.applied_revision, host_a.last_outcome, host_a.watching) == (1, pb.APPLY_OUTCOME_UNSPECIFIED, False)
    assert own.target_revision == 1 and acked.target_revision == 2 and after.target_revision == 2
    assert owners == {"host-a": "host-a-svc", "other-1": "other"}, "the admin claimed no id"


def test_a_subscriber_keeps_its_owner_across_a_restart(run, tmp_path):
    async def first(client, kernel, plugin):
        await client(ControlPlane, ("worker",), principal="w1").report_status(
            pb.ReportStatusRequest(subscriber_id="host-a"), timeout=5)

    async def second(client, kernel, plugin):
        with pytest.raises(errors.PermissionDenied, match="belongs to another principal"):
            await client(ControlPlane, ("worker",), principal="w2").report_status(
                pb.ReportStatusRequest(subscriber_id="host-a"), timeout=5)
        return (await client(ControlPlane, ("worker",), principal="w1").report_status(
            pb.ReportStatusRequest(subscriber_id="host-a"), timeout=5)).target_revision

    _serve(run, tmp_path, first)
    assert _serve(run, tmp_path, second) == 0


def test_the_number_of_subscribers_is_bounded(run, tmp_path):
    async def scenario(client, kernel, plugin):
        worker = client(ControlPlane, ("worker",))
        for host in ("h1", "h2"):
            await worker.report_status(pb.ReportStatusRequest(subscriber_id=host), timeout=5)
        with pytest.raises(errors.LimitExceeded) as refused:
            await worker.report_status(pb.ReportStatusRequest(subscriber_id="h3"), timeout=5)
        with pytest.raises(errors.LimitExceeded):
            stream = worker.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="h4"))
            await asyncio.wait_for(stream.__anext__(), 5)
        with pytest.raises(errors.InvalidArgument, match="at most 256"):
            await worker.report_status(pb.ReportStatusRequest(subscriber_id="h" * 257), timeout=5)
        await worker.report_status(pb.ReportStatusRequest(subscriber_id="h1", applied_revision=0), timeout=5)
        return refused.value, sorted(s.subscriber_id for s in plugin.store.subscribers())

    refused, stored = _serve(run, tmp_path, scenario, plugin={"control": {"max_subscribers": 2}})
    assert (refused.name, refused.limit, refused.actual) == ("subscribers", 2, 3)
    assert "keeps at most 2 subscribers and knows 2" in refused.message
    assert stored == ["h1", "h2"], "a known subscriber still reports; refused ones are not kept"


def test_a_new_subscriber_takes_the_place_of_the_one_silent_longest_once_it_is_idle(run, tmp_path):
    """Workers' ids carry their pid, so restarts register new ids: the limit must not fill up for good."""
    now = [1_000_000.0]

    async def scenario(client, kernel, plugin):
        worker = client(ControlPlane, ("worker",))
        for offset, host in ((0, "h1"), (10, "h2")):
            now[0] = 1_000_000.0 + offset
            await worker.report_status(pb.ReportStatusRequest(subscriber_id=host), timeout=5)
        now[0] = 1_000_020.0
        with pytest.raises(errors.LimitExceeded):  # nobody idle yet
            await worker.report_status(pb.ReportStatusRequest(subscriber_id="h3"), timeout=5)
        now[0] = 1_000_000.0 + 3600 + 5  # h1 silent for an hour and 5 s, h2 for 55 minutes and 55 s
        await worker.report_status(pb.ReportStatusRequest(subscriber_id="h3"), timeout=5)
        stored = sorted(s.subscriber_id for s in plugin.store.subscribers())
        owners = sorted(plugin.store.subscriber_owners())
        with pytest.raises(errors.LimitExceeded):  # h2 is not idle yet, h3 just reported
            await worker.report_status(pb.ReportStatusRequest(subscriber_id="h4"), timeout=5)
        return stored, owners

    stored, owners = _serve(run, tmp_path, scenario, clock=lambda: now[0],
                            plugin={"control": {"max_subscribers": 2, "subscriber_idle_seconds": 3600}})
    assert stored == ["h2", "h3"] and owners == ["h2", "h3"], "h1's status and owner are forgotten"


# -- the fleet never goes back ----------------------------------------------------------------------

def test_a_publish_or_rollback_to_the_fleet_waits_for_the_canary(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin, rollout = await _canary_then_changed(client)
        recorded = len(await _events(client))
        refusals = []
        for attempt in (lambda: admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=2), timeout=5),
                        lambda: admin.rollback_snapshot(pb.RollbackSnapshotRequest(to_revision=1,
                                                                                   expected_revision=2), timeout=5)):
            with pytest.raises(errors.FailedPrecondition) as refused:
                await attempt()
            refusals.append(refused.value.message)
        unchanged = (len(await _events(client)), plugin.store.latest_revision(), plugin.store.counter("fleet"))
        staged = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=2, staged=True), timeout=5)
        promoted = await admin.promote_rollout(pb.PromoteRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)
        fleet = (await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)).fleet_revision
        return rollout, refusals, recorded, unchanged, staged, promoted, fleet

    rollout, refusals, recorded, unchanged, staged, promoted, fleet = _serve(run, tmp_path, scenario)
    assert f"a publish to the whole fleet refused: rollout {rollout.rollout_id} has revision 2 in canary " \
           "(the fleet runs 1); promote or abort it first, or publish it staged" == refusals[0]
    assert refusals[1].startswith("a rollback of the whole fleet refused: rollout")
    assert unchanged == (recorded, 2, 1), "refused: nothing recorded, published or targeted"
    assert staged.snapshot.revision == 3, "a staged publish does not move the fleet, so it may go ahead"
    assert promoted.rollout.state == pb.ROLLOUT_STATE_PROMOTED and fleet == 2


def test_a_rollout_behind_the_fleet_is_not_promoted_and_aborting_it_keeps_the_fleets_content(run, tmp_path):
    async def before(client, kernel, plugin):
        admin, rollout = await _canary_then_changed(client)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=2, staged=True), timeout=5)
        # What a publish to the fleet during the canary left behind before such publishes were refused.
        plugin.store.set_counter("fleet", 3)
        return rollout.rollout_id

    async def after(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        recorded = len(await _events(client))
        with pytest.raises(errors.FailedPrecondition) as refused:
            await admin.promote_rollout(pb.PromoteRolloutRequest(rollout_id=rollout_id), timeout=5)
        unchanged = (len(await _events(client)), plugin.store.counter("fleet"))
        aborted = await admin.abort_rollout(pb.AbortRolloutRequest(rollout_id=rollout_id), timeout=5)
        rolled = await admin.get_snapshot(pb.GetSnapshotRequest(revision=aborted.rollout.rollback_revision), timeout=5)
        fleet_content = (await admin.get_snapshot(pb.GetSnapshotRequest(revision=3), timeout=5)).snapshot.content
        return refused.value.message, recorded, unchanged, aborted, rolled, fleet_content

    rollout_id = _serve(run, tmp_path, before)
    message, recorded, unchanged, aborted, rolled, fleet_content = _serve(run, tmp_path, after)
    assert message == (f"promoting rollout {rollout_id} would move the fleet from revision 3 back to 2; "
                       "abort the rollout instead")
    assert unchanged == (recorded, 3)
    assert aborted.rollout.rollback_revision == 4
    assert pb.Snapshot.FromString(rolled.snapshot.snapshot).source_revision == 3
    assert rolled.snapshot.content == fleet_content, "the canaries go to what the fleet runs, not to the base"


def test_aborting_a_rollout_over_no_configuration_publishes_none(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec()), timeout=5)
        await client(ControlPlane, ("worker",)).report_status(pb.ReportStatusRequest(subscriber_id="h1"), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0, staged=True), timeout=5)
        rollout = (await admin.start_rollout(pb.StartRolloutRequest(
            revision=1, cohort=pb.CanaryCohort(subscriber_ids=["h1"])), timeout=5)).rollout
        aborted = await admin.abort_rollout(pb.AbortRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)
        return rollout, aborted, await admin.get_snapshot(pb.GetSnapshotRequest(revision=2), timeout=5)

    rollout, aborted, rolled = _serve(run, tmp_path, scenario)
    header = pb.Snapshot.FromString(rolled.snapshot.snapshot)
    assert rollout.base_revision == 0 and aborted.rollout.rollback_revision == 2
    assert (header.resource_count, rolled.snapshot.content) == (0, b""), "not the canary's revision again"


# -- a refused write leaves no record -----------------------------------------------------------------

@pytest.mark.parametrize("operation", ["create", "replace", "delete"])
def test_of_two_racing_writes_only_the_one_that_happened_is_recorded(run, tmp_path, operation):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        if operation != "create":
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec()),
                                     timeout=5)
        record = plugin.plane._record_events

        async def slow(tenant, events):  # the evidence write takes a moment: time for the other writer
            await asyncio.sleep(0.05)
            await record(tenant, events)

        plugin.plane._record_events = slow
        version = 0 if operation == "create" else 1
        if operation == "delete":
            writes = [admin.delete_resource(pb.DeleteResourceRequest(
                tenant="acme", kind=ROUTE, name="gpt", expected_resource_version=1), timeout=5) for _ in range(2)]
        else:
            writes = [admin.put_resource(pb.PutResourceRequest(
                tenant="acme", kind=ROUTE, name="gpt", spec=_spec(adapter), expected_resource_version=version),
                timeout=5) for adapter in ("a", "b")]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        return outcomes, await _events(client, "acme"), plugin.store.list()

    outcomes, events, stored = _serve(run, tmp_path, scenario)
    lost = [o for o in outcomes if isinstance(o, Exception)]
    assert len(lost) == 1 and isinstance(lost[0], errors.AlreadyExists if operation == "create"
                                         else errors.Conflict if operation == "replace" else errors.NotFound)
    won = next(o for o in outcomes if not isinstance(o, Exception))
    written = [e for e in events if e.event_type in ("config.resource.put", "config.resource.deleted")]
    if operation == "delete":
        assert [e.event_type for e in written] == ["config.resource.put", "config.resource.deleted"] and not stored
    else:
        assert [e.event_type for e in written] == ["config.resource.put"] * (1 if operation == "create" else 2)
        fields = {f.name: f.string_value for f in written[-1].fields}
        assert fields["digest_after"] == won.resource.spec_digest.value.hex() == stored[0].spec_digest.value.hex()


# -- revision 0 -----------------------------------------------------------------------------------------

def test_a_diff_to_revision_0_compares_with_the_unpublished_desired_state(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        for tenant, name in (("acme", "gpt"), ("acme", "old"), ("globex", "g")):
            await admin.put_resource(pb.PutResourceRequest(tenant=tenant, kind=ROUTE, name=name, spec=_spec()),
                                     timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec("v2"),
                                                       expected_resource_version=1), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="new", spec=_spec()),
                                 timeout=5)
        await admin.delete_resource(pb.DeleteResourceRequest(tenant="acme", kind=ROUTE, name="old",
                                                             expected_resource_version=1), timeout=5)
        everyone = await admin.diff_snapshots(pb.DiffSnapshotsRequest(tenant="*", from_revision=1), timeout=5)
        acme = await admin.diff_snapshots(pb.DiffSnapshotsRequest(tenant="acme", from_revision=1), timeout=5)
        unchanged = await admin.diff_snapshots(pb.DiffSnapshotsRequest(tenant="globex", from_revision=1), timeout=5)
        return everyone, acme, unchanged

    everyone, acme, unchanged = _serve(run, tmp_path, scenario)
    summary = [(c.change, (c.after if c.HasField("after") else c.before).name) for c in everyone.changes]
    assert summary == [(pb.CHANGE_TYPE_MODIFIED, "gpt"), (pb.CHANGE_TYPE_ADDED, "new"),
                       (pb.CHANGE_TYPE_REMOVED, "old")]
    assert everyone.changes[0].after.spec.fields["adapter"].string_value == "v2"
    assert list(acme.changes) == list(everyone.changes) and not unchanged.changes


def test_a_rollback_to_revision_0_is_refused(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=_spec()), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        recorded = len(await _events(client))
        with pytest.raises(errors.InvalidArgument) as refused:
            await admin.rollback_snapshot(pb.RollbackSnapshotRequest(to_revision=0, expected_revision=1), timeout=5)
        return refused.value.message, recorded, len(await _events(client)), plugin.store.latest_revision()

    message, recorded, recorded_after, latest = _serve(run, tmp_path, scenario)
    assert message == "to_revision must name a published revision (1 or more), got 0"
    assert (recorded_after, latest) == (recorded, 1), "nothing was recorded or published"


def test_a_snapshot_is_read_only_by_identities_acting_for_every_tenant(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="globex", kind=ROUTE, name="gpt", spec=_spec()),
                                 timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        refused = []
        for roles in (("worker",), ("service",), ("operator",)):
            with pytest.raises(errors.PermissionDenied) as denied:
                await client(ControlPlane, roles, tenant="acme", principal="acme-" + roles[0]).get_snapshot(
                    pb.GetSnapshotRequest(revision=1), timeout=5)
            refused.append(denied.value.message)
        fleet = await client(ControlPlane, ("service",), principal="host-svc").get_snapshot(
            pb.GetSnapshotRequest(revision=1), timeout=5)
        return refused, fleet.snapshot

    refused, snapshot = _serve(run, tmp_path, scenario)
    assert all("acts for tenant 'acme'" in message and "globex" not in message for message in refused)
    assert pb.Snapshot.FromString(snapshot.snapshot).revision == 1 and snapshot.content


def test_a_refused_subscriber_says_so_once_in_the_log(run, tmp_path, caplog):
    """A worker with a one-tenant token is refused as a subscriber: that must not pass in silence."""
    import logging

    from planes.plugins.control.subscriber import CachedConfig, SnapshotSubscriber

    async def scenario(client, kernel, plugin):
        agent = SnapshotSubscriber(client(ControlPlane, ("worker",), tenant="acme", principal="w-acme"),
                                   CachedConfig(tmp_path / "agent", {}), "worker:w1")
        agent.max_backoff = 0.05
        task = asyncio.create_task(agent.run())
        for _ in range(200):
            await asyncio.sleep(0.02)
            if agent.last_error and len([r for r in caplog.records if "worker:w1" in r.getMessage()]) >= 1:
                await asyncio.sleep(0.3)  # more retries: still one line
                break
        task.cancel()
        return agent.last_error

    with caplog.at_level(logging.WARNING, logger="planes.plugins.control.subscriber"):
        last_error = _serve(run, tmp_path, scenario)
    lines = [r for r in caplog.records if "worker:w1" in r.getMessage()]
    assert last_error.startswith("PermissionDenied") and "acts for tenant 'acme'" in last_error
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert "running on the cached configuration and retrying" in lines[0].getMessage()
