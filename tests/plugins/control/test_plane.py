"""The control plane over real gRPC: audited administration, publish, watch, reports, staged rollout."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contracts import ControlPlane, EvidencePlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.server import KernelServer
from planes.kernel.tokens import issue_token, load_public_key
from planes.plugins.control import ControlPlugin
from planes.plugins.control.subscriber import CachedConfig
from planes.plugins.evidence import EvidencePlugin
from tests.conftest import make_settings

ROUTE = pb.RESOURCE_KIND_MODEL_ROUTE
GOOD = json_format.ParseDict({"adapter": "echo", "allowed_classifications": ["public"]}, struct_pb2.Struct())


def _serve(run, tmp_path, scenario, *, clock=None, **settings_changes):
    async def main():
        settings = make_settings(tmp_path, **settings_changes)
        plugins = [EvidencePlugin(), ControlPlugin(clock) if clock else ControlPlugin()]
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "t", p) for p in plugins])).open()
        server = KernelServer(kernel)
        port = await server.start()
        made = []

        def client(contract, roles, tenant="*", principal=None):
            token = issue_token(kernel.signing_key, principal=principal or roles[0], tenant=tenant,
                                roles=list(roles), ttl_seconds=120)
            made.append(connect(f"127.0.0.1:{port}", contract, token=token))
            return made[-1]

        try:
            return await scenario(client, kernel, plugins[1])
        finally:
            for item in made:
                await item.close()
            await server.stop(grace=1)
    return run(main())


async def _events(client, tenant="*"):
    reviewer = client(EvidencePlane, ("reviewer",), tenant=tenant)
    return [e async for page in reviewer.query_events(epb.QueryEventsRequest(tenant=tenant)) for e in page.events]


def test_every_mutation_is_authorized_versioned_and_recorded(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        created = await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD),
                                           timeout=5)
        with pytest.raises(errors.Conflict):
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD,
                                                           expected_resource_version=7), timeout=5)
        with pytest.raises(errors.PermissionDenied):
            await client(ControlPlane, ("service",), tenant="acme").put_resource(
                pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="x", spec=GOOD), timeout=5)
        tenant_admin = client(ControlPlane, ("admin",), tenant="acme", principal="acme-admin")
        await tenant_admin.put_resource(pb.PutResourceRequest(kind=ROUTE, name="own", spec=GOOD), timeout=5)
        with pytest.raises(errors.PermissionDenied):
            await tenant_admin.put_resource(pb.PutResourceRequest(tenant="globex", kind=ROUTE, name="x", spec=GOOD),
                                            timeout=5)
        with pytest.raises(errors.InvalidArgument, match="field 'allowed_classifications' is required"):
            await admin.put_resource(pb.PutResourceRequest(
                tenant="acme", kind=ROUTE, name="bad", spec=json_format.ParseDict({"adapter": "x"},
                                                                                   struct_pb2.Struct())), timeout=5)
        removed = await admin.delete_resource(pb.DeleteResourceRequest(tenant="acme", kind=ROUTE, name="gpt",
                                                                       expected_resource_version=1), timeout=5)
        return created, removed, await _events(client, "acme")

    created, removed, events = _serve(run, tmp_path, scenario)
    assert created.resource.resource_version == 1 and removed.resource.name == "gpt"
    kinds = [(e.event_type, {f.name: f.string_value for f in e.fields}.get("name"), e.correlation.actor)
             for e in events]
    assert kinds == [("config.resource.put", "gpt", "admin"), ("config.resource.put", "own", "acme-admin"),
                     ("config.resource.deleted", "gpt", "admin")], "refused mutations leave no record"
    put = {f.name: f.string_value for f in events[0].fields}
    assert put["digest_before"] == "" and len(put["digest_after"]) == 64


def test_mutation_refused_when_evidence_cannot_record_it(run, tmp_path):
    async def scenario(client, kernel, plugin):
        async def outage(tenant, events):
            raise errors.Unavailable("evidence store down")

        plugin.plane._record_events = outage
        admin = client(ControlPlane, ("admin",))
        with pytest.raises(errors.Unavailable):
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD),
                                     timeout=5)
        return plugin.store.list()

    assert _serve(run, tmp_path, scenario) == []


def test_publish_watch_apply_report_and_status(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
        worker = client(ControlPlane, ("worker",), tenant="*")
        key = load_public_key(tmp_path / "keys" / "control-signing.pub.pem")
        from planes.kernel.tokens import key_id
        cache = CachedConfig(tmp_path / "host-1", {key_id(key): key})
        stream = worker.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="host-1"))
        published = await admin.publish_snapshot(pb.PublishSnapshotRequest(
            expected_revision=0, lease=duration_pb2.Duration(seconds=60)), timeout=5)
        pushed = await asyncio.wait_for(stream.__anext__(), 5)
        applied = cache.offer(pushed.snapshot)
        reply = await worker.report_status(pb.ReportStatusRequest(
            subscriber_id="host-1", applied_revision=applied.revision, revision=applied.revision,
            outcome=pb.APPLY_OUTCOME_ACK,
            health=common_pb2.HealthSummary(state=common_pb2.HealthSummary.STATE_HEALTHY)), timeout=5)
        status = await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)
        await stream.aclose()
        return published, applied, reply, status

    published, applied, reply, status = _serve(run, tmp_path, scenario)
    assert published.snapshot.revision == 1 and applied.revision == 1
    assert applied.content().resources[0].name == "gpt"
    assert reply.target_revision == 1 and status.fleet_revision == 1
    host = status.subscribers[0]
    assert (host.subscriber_id, host.applied_revision, host.last_outcome) == ("host-1", 1, pb.APPLY_OUTCOME_ACK)


def test_canary_nack_rolls_the_rollout_back_automatically(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        worker = client(ControlPlane, ("worker",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        for host in ("host-a", "host-b"):
            await worker.report_status(pb.ReportStatusRequest(subscriber_id=host, applied_revision=1), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD,
                                                       expected_resource_version=1), timeout=5)
        staged = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
        started = await admin.start_rollout(pb.StartRolloutRequest(
            revision=staged.snapshot.revision, cohort=pb.CanaryCohort(fraction=0.5),
            window=duration_pb2.Duration(seconds=600)), timeout=5)
        targets = [(await worker.report_status(pb.ReportStatusRequest(subscriber_id=h, applied_revision=1),
                                               timeout=5)).target_revision for h in ("host-a", "host-b")]
        nack = await worker.report_status(pb.ReportStatusRequest(
            subscriber_id="host-a", applied_revision=1, revision=2, outcome=pb.APPLY_OUTCOME_NACK,
            nack_reason=pb.NACK_REASON_MISSING_CONTRACT, error="needs execution 1.2"), timeout=5)
        status = await admin.get_rollout_status(pb.GetRolloutStatusRequest(rollout_id=started.rollout.rollout_id),
                                                timeout=5)
        rolled = await admin.get_snapshot(pb.GetSnapshotRequest(revision=status.rollout.rollback_revision), timeout=5)
        base = await admin.get_snapshot(pb.GetSnapshotRequest(revision=1), timeout=5)
        events = await _events(client)
        return started, targets, nack, status, rolled, base, events

    started, targets, nack, status, rolled, base, events = _serve(run, tmp_path, scenario)
    assert started.rollout.canary_subscribers == ["host-a"]
    assert targets == [2, 1], "only the canary is targeted at the staged revision"
    assert status.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK
    assert "host-a NACKed revision 2: NACK_REASON_MISSING_CONTRACT" in status.rollout.reason
    assert status.rollout.rollback_revision == 3 and nack.target_revision == 3 and status.fleet_revision == 3
    assert rolled.snapshot.content == base.snapshot.content, "the rollback republishes the base content"
    assert [e.event_type for e in events] == ["config.published", "config.published", "rollout.started",
                                              "rollout.rolled_back"]


def test_a_fraction_cohort_takes_hosts_that_run_tasks_first(run, tmp_path):
    """A kernel's data plane follows the configuration too; "data@..." sorts first, but a canary should be a
    host that runs tasks."""
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        worker = client(ControlPlane, ("worker",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        for host, plane in (("data@k", "data"), ("execution@k", "execution"), ("aardvark", "data")):
            await worker.report_status(pb.ReportStatusRequest(
                subscriber_id=host, applied_revision=1,
                contract_versions=[common_pb2.ContractVersion(plane=plane, major=1)]), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD,
                                                       expected_resource_version=1), timeout=5)
        staged = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
        one = await admin.start_rollout(pb.StartRolloutRequest(
            revision=staged.snapshot.revision, cohort=pb.CanaryCohort(fraction=0.3)), timeout=5)
        return one.rollout.canary_subscribers

    assert _serve(run, tmp_path, scenario) == ["execution@k"]


def test_promote_and_abort(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        worker = client(ControlPlane, ("worker",))
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await worker.report_status(pb.ReportStatusRequest(subscriber_id="h1", applied_revision=1), timeout=5)
        staged = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
        rollout = (await admin.start_rollout(pb.StartRolloutRequest(
            revision=staged.snapshot.revision, cohort=pb.CanaryCohort(subscriber_ids=["h1"])), timeout=5)).rollout
        promoted = await admin.promote_rollout(pb.PromoteRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)
        with pytest.raises(errors.FailedPrecondition, match="not in canary"):
            await admin.abort_rollout(pb.AbortRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)
        fleet = (await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)).fleet_revision
        staged = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=2, staged=True), timeout=5)
        second = (await admin.start_rollout(pb.StartRolloutRequest(
            revision=staged.snapshot.revision, cohort=pb.CanaryCohort(subscriber_ids=["h1"])), timeout=5)).rollout
        aborted = await admin.abort_rollout(pb.AbortRolloutRequest(rollout_id=second.rollout_id,
                                                                   reason="latency"), timeout=5)
        return promoted, fleet, aborted

    promoted, fleet, aborted = _serve(run, tmp_path, scenario)
    assert promoted.rollout.state == pb.ROLLOUT_STATE_PROMOTED and fleet == 2
    assert aborted.rollout.state == pb.ROLLOUT_STATE_ABORTED and aborted.rollout.rollback_revision == 4


def test_diff_list_and_rollback(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="a", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="b", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1), timeout=5)
        diff = await admin.diff_snapshots(pb.DiffSnapshotsRequest(tenant="*", from_revision=1, to_revision=2),
                                          timeout=5)
        back = await admin.rollback_snapshot(pb.RollbackSnapshotRequest(to_revision=1, expected_revision=2),
                                             timeout=5)
        listed = await admin.list_snapshots(pb.ListSnapshotsRequest(), timeout=5)
        with pytest.raises(errors.FailedPrecondition, match="every tenant"):
            await client(ControlPlane, ("admin",), tenant="acme").publish_snapshot(
                pb.PublishSnapshotRequest(expected_revision=3), timeout=5)
        return diff, back, listed

    diff, back, listed = _serve(run, tmp_path, scenario)
    assert [(c.change, c.after.name) for c in diff.changes] == [(pb.CHANGE_TYPE_ADDED, "b")]
    assert (back.snapshot.revision, back.snapshot.source_revision) == (3, 1)
    assert [s.revision for s in listed.snapshots] == [3, 2, 1]


def test_get_and_list_are_tenant_scoped_and_paged(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        for tenant, name in (("acme", "a"), ("acme", "b"), ("acme", "c"), ("globex", "g")):
            await admin.put_resource(pb.PutResourceRequest(tenant=tenant, kind=ROUTE, name=name, spec=GOOD),
                                     timeout=5)
        acme = client(ControlPlane, ("admin",), tenant="acme")
        first = await acme.list_resources(pb.ListResourcesRequest(page=common_pb2.PageRequest(page_size=2)),
                                          timeout=5)
        second = await acme.list_resources(pb.ListResourcesRequest(
            page=common_pb2.PageRequest(page_size=2, page_token=first.page.next_page_token)), timeout=5)
        got = await acme.get_resource(pb.GetResourceRequest(kind=ROUTE, name="b"), timeout=5)
        with pytest.raises(errors.PermissionDenied):
            await acme.get_resource(pb.GetResourceRequest(tenant="globex", kind=ROUTE, name="g"), timeout=5)
        with pytest.raises(errors.NotFound):
            await acme.get_resource(pb.GetResourceRequest(kind=ROUTE, name="g"), timeout=5)
        return first, second, got

    first, second, got = _serve(run, tmp_path, scenario)
    assert [r.name for r in first.resources] == ["a", "b"] and first.page.next_page_token
    assert [r.name for r in second.resources] == ["c"] and not second.page.next_page_token
    assert got.resource.name == "b" and got.resource.tenant == "acme"


def test_subscriber_agent_applies_and_acks_and_nacks_what_it_cannot_serve(run, tmp_path):
    from planes.kernel.tokens import key_id
    from planes.plugins.control.subscriber import SnapshotSubscriber

    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        key = load_public_key(tmp_path / "keys" / "control-signing.pub.pem")
        cache = CachedConfig(tmp_path / "agent", {key_id(key): key}, served={"execution": kernel_version()})
        applied = []
        agent = SnapshotSubscriber(client(ControlPlane, ("worker",)), cache, "host-9", on_applied=applied.append,
                                   contracts=[common_pb2.ContractVersion(plane="execution", major=1, minor=0)])
        task = asyncio.create_task(agent.run())
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await _until(lambda: applied)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(
            expected_revision=1, required_contracts=[common_pb2.ContractVersion(plane="execution", major=1,
                                                                                minor=5)]), timeout=5)
        status = None
        for _ in range(100):
            status = (await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)).subscribers[0]
            if status.last_outcome_revision == 2:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        return [a.revision for a in applied], status, cache.current.revision

    applied, status, current = _serve(run, tmp_path, scenario)
    assert applied == [1] and current == 1
    assert (status.last_outcome, status.nack_reason) == (pb.APPLY_OUTCOME_NACK, pb.NACK_REASON_MISSING_CONTRACT)
    assert "needs the execution contract 1.5; this host serves 1.0" in status.error
    assert status.applied_revision == 1


def test_host_with_a_damaged_cache_refetches_the_fleet_revision_and_acks_it(run, tmp_path):
    """A flipped byte in the cached snapshot: the host runs on nothing, says so, and takes the fleet's revision
    again (an ACK, not a stale-revision NACK that would roll a canary's rollout back)."""
    from planes.kernel.tokens import key_id
    from planes.plugins.control.subscriber import SnapshotSubscriber

    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        key = load_public_key(tmp_path / "keys" / "control-signing.pub.pem")
        keys = {key_id(key): key}

        def agent_on(cache):
            return SnapshotSubscriber(client(ControlPlane, ("worker",)), cache, "host-c",
                                      contracts=[common_pb2.ContractVersion(plane="execution", major=1, minor=0)])

        first = CachedConfig(tmp_path / "agent", keys)
        task = asyncio.create_task(agent_on(first).run())
        for revision in range(3):
            await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=revision), timeout=5)
        await _until(lambda: first.current is not None and first.current.revision == 3)
        task.cancel()
        cached = tmp_path / "agent" / "snapshot.bin"
        damaged = bytearray(cached.read_bytes())
        damaged[-5] ^= 0x01
        cached.write_bytes(bytes(damaged))

        restarted = CachedConfig(tmp_path / "agent", keys)
        agent = agent_on(restarted)
        before = agent.health()

        async def status_of_host():
            reply = await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)
            return next(s for s in reply.subscribers if s.subscriber_id == "host-c")

        reported_before = (await status_of_host()).last_seen.ToNanoseconds()
        task = asyncio.create_task(agent.run())
        status = None
        for _ in range(100):  # until the restarted host has answered the revision pushed to it
            status = await status_of_host()
            if status.last_seen.ToNanoseconds() > reported_before and status.last_outcome_revision == 3:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        return before, status, restarted

    before, status, restarted = _serve(run, tmp_path, scenario)
    assert before.state == common_pb2.HealthSummary.STATE_STOP_ADMITTING
    assert before.reason.startswith("configuration empty: cached snapshot refused")
    assert (status.last_outcome, status.last_outcome_revision, status.applied_revision) == \
        (pb.APPLY_OUTCOME_ACK, 3, 3), status.error
    assert status.nack_reason == pb.NACK_REASON_UNSPECIFIED and not status.error
    assert status.health.state == common_pb2.HealthSummary.STATE_HEALTHY
    assert restarted.admitting() and restarted.current.revision == 3, restarted.state()


def kernel_version():
    from planes.kernel.contract import ContractVersion
    return ContractVersion(1, 0)


async def _until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_restart_keeps_the_fleet_off_a_staged_revision(run, tmp_path):
    async def publish(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)

    async def after_restart(client, kernel, plugin):
        worker = client(ControlPlane, ("worker",))
        return (await worker.report_status(pb.ReportStatusRequest(subscriber_id="h", applied_revision=1),
                                           timeout=5)).target_revision

    _serve(run, tmp_path, publish)
    assert _serve(run, tmp_path, after_restart) == 1


@pytest.mark.parametrize("degradation", ["read_only", "corrupt_key", "missing_key"])
def test_degraded_plane_refuses_every_mutation_and_keeps_serving_reads(run, tmp_path, degradation):
    async def healthy(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
        await client(ControlPlane, ("worker",)).report_status(pb.ReportStatusRequest(subscriber_id="h1"), timeout=5)
        return len(await _events(client))

    async def degraded(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        refusals = []
        for attempt in (
                lambda: admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="x", spec=GOOD)),
                lambda: admin.delete_resource(pb.DeleteResourceRequest(tenant="acme", kind=ROUTE, name="gpt",
                                                                       expected_resource_version=1)),
                lambda: admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=2)),
                lambda: admin.rollback_snapshot(pb.RollbackSnapshotRequest(to_revision=1, expected_revision=2)),
                lambda: admin.start_rollout(pb.StartRolloutRequest(
                    revision=2, cohort=pb.CanaryCohort(subscriber_ids=["h1"])))):
            with pytest.raises(errors.FailedPrecondition) as refused:
                await attempt()
            refusals.append(refused.value.message)
        worker = client(ControlPlane, ("worker",))
        stream = worker.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="h2"))
        pushed = await asyncio.wait_for(stream.__anext__(), 5)
        await stream.aclose()
        reads = (await admin.get_resource(pb.GetResourceRequest(tenant="acme", kind=ROUTE, name="gpt"), timeout=5),
                 await admin.list_snapshots(pb.ListSnapshotsRequest(), timeout=5),
                 await worker.report_status(pb.ReportStatusRequest(subscriber_id="h1", applied_revision=1),
                                            timeout=5),
                 pushed)
        return refusals, reads, len(await _events(client)), plugin.store.latest_revision()

    recorded = _serve(run, tmp_path, healthy)
    changes = {}
    key = tmp_path / "keys" / "control-signing.pem"
    if degradation == "read_only":
        changes = {"plugin": {"control": {"read_only": True}}}
    elif degradation == "corrupt_key":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    else:
        key.unlink()
    # The key file's body as the degraded plane finds it (a real key, garbage, or none at all).
    material = b"".join(key.read_bytes().splitlines()[1:-1]).decode() if key.exists() else ""
    refusals, (got, listed, report, pushed), recorded_after, latest = _serve(run, tmp_path, degraded, **changes)
    expected = "read-only" if degradation == "read_only" else "signing key is unavailable"
    assert all(expected in message and "reads still work" in message for message in refusals), refusals
    if degradation == "missing_key":
        assert "control-signing.pem is missing, and revision 2 was signed with key" in refusals[0]
    if degradation == "missing_key":
        assert not key.exists(), "a missing signing key is not silently replaced by a new one"
    else:
        assert material and not any(material in message for message in refusals), "no key material in errors"
    assert got.resource.resource_version == 1 and [s.revision for s in listed.snapshots] == [2, 1]
    assert report.target_revision == 1 and pushed.snapshot.snapshot and pushed.target_revision == 1
    assert (recorded_after, latest) == (recorded, 2), "nothing was recorded or published"


def test_publish_and_rollback_records_name_the_content_digests(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="a", spec=GOOD), timeout=5)
        first = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="b", spec=GOOD), timeout=5)
        second = await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1), timeout=5)
        back = await admin.rollback_snapshot(pb.RollbackSnapshotRequest(to_revision=1, expected_revision=2,
                                                                        message="b broke"), timeout=5)
        events = [e for e in await _events(client) if e.event_type != "config.resource.put"]
        return [s.snapshot.content_digest.value.hex() for s in (first, second, back)], back, events

    (one, two, three), back, events = _serve(run, tmp_path, scenario)
    fields = [{f.name: f.string_value for f in e.fields} for e in events]
    assert [e.event_type for e in events] == ["config.published", "config.published", "config.rolled_back"]
    assert [(f["digest_before"], f["digest_after"]) for f in fields] == [("", one), (one, two), (two, three)]
    assert three == one, "a rollback republishes the old content"
    assert back.snapshot.message == "b broke" and fields[2]["message"] == "b broke"


def test_keepalives_renew_the_lease_while_nothing_is_published(run, tmp_path):
    import time

    from planes.kernel.tokens import key_id
    from planes.plugins.control.subscriber import ConfigState, SnapshotSubscriber

    class Clock:
        now = time.time()

        def __call__(self):
            return self.now

    clock = Clock()

    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        key = load_public_key(tmp_path / "keys" / "control-signing.pub.pem")
        cache = CachedConfig(tmp_path / "agent", {key_id(key): key}, clock=clock)
        reports = []
        agent = SnapshotSubscriber(client(ControlPlane, ("worker",)), cache, "host-k",
                                   capacity=lambda: reports.append(1) or common_pb2.CapacitySummary(slots_free=2))
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0,
                                                               lease=duration_pb2.Duration(seconds=60)), timeout=5)
        clock.now = time.time()  # after not_before, which is the publish time rounded down
        task = asyncio.create_task(agent.run())
        await _until(lambda: cache.current is not None and reports)
        clock.now += 120  # two leases of silence...
        lapsed = cache.state()[0]
        before = len(reports)
        await _until(lambda: len(reports) > before)  # ...until the next keepalive
        renewed = cache.state()[0]
        status = (await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)).subscribers[0]
        task.cancel()
        return lapsed, renewed, status

    lapsed, renewed, status = _serve(run, tmp_path, scenario, plugin={"control": {"keepalive_seconds": 0.2}})
    assert lapsed is ConfigState.STOP_ADMITTING and renewed is ConfigState.ACTIVE
    assert status.subscriber_id == "host-k" and status.applied_revision == 1 and status.capacity.slots_free == 2


MUTATIONS = {
    "put_resource": pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="x", spec=GOOD),
    "delete_resource": pb.DeleteResourceRequest(tenant="acme", kind=ROUTE, name="gpt", expected_resource_version=1),
    "publish_snapshot": pb.PublishSnapshotRequest(expected_revision=2),
    "rollback_snapshot": pb.RollbackSnapshotRequest(to_revision=1, expected_revision=2),
    "start_rollout": pb.StartRolloutRequest(revision=2, cohort=pb.CanaryCohort(subscriber_ids=["h1"])),
    "promote_rollout": pb.PromoteRolloutRequest(rollout_id="r"),
    "abort_rollout": pb.AbortRolloutRequest(rollout_id="r"),
}


def test_every_mutation_needs_an_admin_and_global_ones_every_tenant(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="gpt", spec=GOOD), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1, staged=True), timeout=5)
        recorded = len(await _events(client))
        outcomes = {}
        for who, caller in (("worker", client(ControlPlane, ("worker",))),
                            ("reviewer", client(ControlPlane, ("reviewer",))),
                            ("globex admin", client(ControlPlane, ("admin",), tenant="globex", principal="g"))):
            for name, request in MUTATIONS.items():
                if who == "globex admin" and name in ("put_resource", "delete_resource"):
                    continue  # the kernel scopes them to the caller's tenant: see the next check
                with pytest.raises((errors.PermissionDenied, errors.FailedPrecondition)) as refused:
                    await getattr(caller, name)(request, timeout=5)
                outcomes[(who, name)] = type(refused.value).__name__
        globex = client(ControlPlane, ("admin",), tenant="globex", principal="g")
        with pytest.raises(errors.PermissionDenied):
            await globex.put_resource(MUTATIONS["put_resource"], timeout=5)
        with pytest.raises(errors.PermissionDenied):
            await globex.delete_resource(MUTATIONS["delete_resource"], timeout=5)
        return outcomes, recorded, len(await _events(client)), plugin.store.latest_revision()

    outcomes, recorded, recorded_after, latest = _serve(run, tmp_path, scenario)
    assert all(outcome == "PermissionDenied" for (who, _), outcome in outcomes.items() if who != "globex admin")
    assert {name for (who, name), outcome in outcomes.items()
            if who == "globex admin" and outcome == "FailedPrecondition"} == {
        "publish_snapshot", "rollback_snapshot", "start_rollout", "promote_rollout", "abort_rollout"}
    assert (recorded_after, latest) == (recorded, 2), "refused mutations change and record nothing"


def test_a_subscriber_is_watching_until_its_last_stream_ends(run, tmp_path):
    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        old, new = client(ControlPlane, ("worker",)), client(ControlPlane, ("worker",))
        # Held open: a stream whose reader lets go is cancelled.
        old_stream = old.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="h"))
        await asyncio.wait_for(old_stream.__anext__(), 5)
        # A reconnect: the new stream opens before the old connection is gone.
        new_stream = new.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="h"))
        await asyncio.wait_for(new_stream.__anext__(), 5)

        async def watching():
            return (await admin.get_rollout_status(pb.GetRolloutStatusRequest(), timeout=5)).subscribers[0].watching

        async def settled(expected):
            for _ in range(100):
                if await watching() == expected:
                    break
                await asyncio.sleep(0.05)
            return await watching()

        await old.close()
        await asyncio.sleep(0.3)
        after_old = await watching()
        await new.close()
        del old_stream, new_stream
        return after_old, await settled(False)

    assert _serve(run, tmp_path, scenario) == (True, False)


def test_a_watcher_on_the_previous_revision_gets_a_delta_and_one_without_it_fetches_the_full_snapshot(
        run, tmp_path):
    from planes.kernel.tokens import key_id
    from planes.plugins.control.subscriber import SnapshotSubscriber

    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        for index in range(40):
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name=f"r{index:02d}",
                                                           spec=GOOD), timeout=5)
        key = load_public_key(tmp_path / "keys" / "control-signing.pub.pem")
        keys = {key_id(key): key}
        cache = CachedConfig(tmp_path / "agent", keys)
        applied = []
        agent = SnapshotSubscriber(client(ControlPlane, ("worker",)), cache, "host-d", on_applied=applied.append)
        task = asyncio.create_task(agent.run())
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=0), timeout=5)
        await _until(lambda: applied)
        # A watcher that says it runs revision 1 gets revision 2 as a delta.
        worker = client(ControlPlane, ("worker",))
        stream = worker.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id="host-w", known_revision=1))
        changed = json_format.ParseDict({"adapter": "echo", "allowed_classifications": ["public", "internal"]},
                                        struct_pb2.Struct())
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=ROUTE, name="r07", spec=changed,
                                                       expected_resource_version=1), timeout=5)
        await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=1), timeout=5)
        pushed = await asyncio.wait_for(stream.__anext__(), 5)
        await stream.aclose()
        await _until(lambda: len(applied) == 2)
        task.cancel()
        # A subscriber with nothing to build on: the delta is unusable, the full snapshot is fetched.
        empty = SnapshotSubscriber(client(ControlPlane, ("worker",)), CachedConfig(tmp_path / "empty", keys),
                                   "host-e")
        await empty.handle(pushed)
        full = (await admin.get_snapshot(pb.GetSnapshotRequest(revision=2), timeout=5)).snapshot
        return pushed, full, cache, empty

    pushed, full, cache, empty = _serve(run, tmp_path, scenario)
    assert pushed.HasField("delta") and not pushed.HasField("snapshot")
    assert pushed.delta.base_revision == 1 and pushed.target_revision == 2
    assert pushed.ByteSize() * 10 < full.ByteSize(), "one changed resource of 40"
    assert cache.current.revision == 2 and cache.current.signed.content == full.content
    assert [r.name for r in cache.current.content().resources if "internal" in str(r.spec)] == ["r07"]
    assert empty.cache.current.revision == 2 and empty.cache.current.signed.content == full.content
    assert "fetched the full snapshot" in empty.last_error
