"""Egress rules, backpressure and byte budgets, and that payload bytes never reach logs, errors or evidence."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as cpb
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contracts import ControlPlane
from planes.kernel.errors import SettingsError
from planes.plugins.data.client import EgressDenied
from planes.plugins.data.limits import ByteBudget, DataSettings
from planes.plugins.data.store import ObjectWriter

from .conftest import fields
from .test_admission import chunk, header, put_raw, trailer

MiB = 1 << 20
SECRET = b"TOP-SECRET-PAYLOAD-BYTES-91c2"


def test_egress_follows_classification_rules_and_every_decision_is_recorded(serve):
    async def scenario(served):
        data = served.data()
        internal = await data.put(b"internal", classification="internal")
        confidential = await data.put(b"confidential", classification="confidential")
        allowed = await data.transfer(internal.ref.payload_id, "tool:search")
        with pytest.raises(EgressDenied, match="confidential data may not go to model_route 'gpt-remote'") as denied:
            await data.transfer(confidential.ref.payload_id, "model_route:gpt-remote")
        local = await data.transfer(confidential.ref.payload_id, "model_route:local-llama")
        sink = await data.transfer(internal.ref.payload_id, "sink:s3-archive", raise_on_denial=False)
        with pytest.raises(ValueError, match="destination must be"):
            await data.transfer(internal.ref.payload_id, "printer:lobby")
        with pytest.raises(errors.InvalidArgument, match="needs a destination"):
            await data.client.transfer_payload(pb.TransferPayloadRequest(tenant="acme",
                                                                         payload_id=internal.ref.payload_id))
        return allowed, denied.value, local, sink, await served.events()

    settings = {"egress": {"confidential": ["model_route:local-*"]}}
    allowed, denied, local, sink, events = serve(scenario, data_settings=settings)
    assert allowed.allowed and allowed.rule == "internal:tool:*"
    assert local.allowed and local.rule == "confidential:model_route:local-*"
    assert not sink.allowed and "no egress rule allows it" in sink.refusal_reason
    recorded = {(e.event_type, fields(e)["destination"]) for e in events if e.event_type in ("data.transferred",
                                                                                              "data.denied")}
    assert recorded == {("data.transferred", "tool:search"), ("data.denied", "model_route:gpt-remote"),
                        ("data.transferred", "model_route:local-llama"), ("data.denied", "sink:s3-archive")}
    denial = next(e for e in events if e.event_type == "data.denied" and fields(e)["transfer_id"] == denied.transfer_id)
    assert fields(denial)["classification"] == "confidential"


def test_settings_are_checked_with_actionable_messages():
    with pytest.raises(SettingsError, match="'secret' is not a classification"):
        DataSettings.from_mapping({"egress": {"secret": ["*"]}})
    with pytest.raises(SettingsError, match="unknown setting"):
        DataSettings.from_mapping({"max_chunk_byte": 5})
    with pytest.raises(SettingsError, match="max_chunks must be an integer >= 1"):
        DataSettings.from_mapping({"max_chunks": 0})
    with pytest.raises(SettingsError, match="get_chunk_bytes must not exceed"):
        DataSettings.from_mapping({"max_chunk_bytes": 10, "get_chunk_bytes": 20})


def test_byte_budget_waits_in_order_and_gives_back_on_cancel(run):
    async def scenario():
        budget = ByteBudget(100)
        order = []
        assert await budget.acquire(60) == 60

        async def take(name, size):
            granted = await budget.acquire(size)
            order.append(name)
            return granted

        first = asyncio.create_task(take("first", 50))
        second = asyncio.create_task(take("second", 10))    # would fit, but waits its turn
        cancelled = asyncio.create_task(take("cancelled", 30))
        await asyncio.sleep(0)
        waiting = budget.used
        cancelled.cancel()
        budget.release(60)
        outcomes = await asyncio.gather(first, second, cancelled, return_exceptions=True)
        used = budget.used
        huge = await asyncio.wait_for(_after_release(budget, 60), 5)
        return order, waiting, used, huge, outcomes

    order, waiting, used, huge, outcomes = run(scenario())
    assert waiting == 60 and order == ["first", "second"] and used == 60
    assert outcomes[:2] == [50, 10] and isinstance(outcomes[2], asyncio.CancelledError)
    assert huge == 100, "a request larger than the budget takes all of it once the budget is free"


async def _after_release(budget, size):
    budget.release(size)
    return await budget.acquire(10_000)


def test_a_producer_faster_than_storage_waits_instead_of_growing_memory(serve, monkeypatch):
    """A stalled disk writer stops the plane reading the stream, so the producer waits."""
    gate = threading.Event()
    real_append = ObjectWriter.append  # the disk half of a write (the plane hashes on another thread)

    def slow_append(self, data):
        gate.wait(30)
        return real_append(self, data)

    monkeypatch.setattr(ObjectWriter, "append", slow_append)
    total, step = 48 * MiB, 256 * 1024
    payload = bytes(total)

    async def scenario(served):
        sent = 0

        async def stream():
            nonlocal sent
            yield header(total)
            for offset in range(0, total, step):
                yield chunk(payload[offset:offset + step], offset)
                sent += step
            yield trailer(payload)

        client = served.remote()
        put = asyncio.create_task(client.wire("put_payload")(stream(), timeout=60))
        budget = served.plugin.plane.tenant_budget("acme")
        stalled = []
        for _ in range(20):   # let the stream run into the stall
            await asyncio.sleep(0.1)
            stalled.append((sent, budget.used))
        gate.set()
        response = pb.PutPayloadResponse.FromString(await put)
        return stalled, response.payload.ref.size, budget.used

    settings = {"stream_inflight_bytes": 1 * MiB, "tenant_inflight_bytes": 2 * MiB}
    stalled, size, used_after = serve(scenario, data_settings=settings)
    most_sent = max(s for s, _ in stalled)
    assert most_sent < total / 2, f"the producer kept sending into a stalled plane ({most_sent} bytes)"
    assert all(used <= 1 * MiB for _, used in stalled), "in flight stays within the stream's bound"
    assert size == total and used_after == 0, "everything arrives once the disk catches up"


CHUNK = 64 * 1024


@pytest.mark.parametrize(("bound", "streams", "past", "held"), [
    ("stream_inflight_bytes", 1, -1, 2), ("stream_inflight_bytes", 1, 0, 3), ("stream_inflight_bytes", 1, 1, 3),
    ("tenant_inflight_bytes", 2, -1, 2), ("tenant_inflight_bytes", 2, 0, 3), ("tenant_inflight_bytes", 2, 1, 3),
], ids=["stream-limit-1", "stream-limit", "stream-limit+1", "tenant-limit-1", "tenant-limit", "tenant-limit+1"])
def test_in_flight_bounds_at_limit_minus_one_limit_and_plus_one(serve, monkeypatch, bound, streams, past, held):
    """With the disk stalled, a bound of three chunks' bytes holds three chunks, one byte less holds two, one
    more still three: per stream with one stream, per tenant summed over two streams."""
    limit = 3 * CHUNK + past
    gate = threading.Event()
    real_append = ObjectWriter.append

    def stalled_append(self, data):
        gate.wait(30)
        return real_append(self, data)

    monkeypatch.setattr(ObjectWriter, "append", stalled_append)
    payload = bytes(range(256)) * (8 * CHUNK // 256)

    async def scenario(served):
        async def stream():
            yield header(len(payload))
            for offset in range(0, len(payload), CHUNK):
                yield chunk(payload[offset:offset + CHUNK], offset)
            yield trailer(payload)

        client = served.remote()
        puts = [asyncio.create_task(client.wire("put_payload")(stream(), timeout=60)) for _ in range(streams)]
        budget = served.plugin.plane.tenant_budget("acme")
        async with asyncio.timeout(20):  # only turns a hang into a failure
            while budget.used < held * CHUNK:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for a wrong bound to let one more chunk in
        stalled = budget.used
        gate.set()
        sizes = [pb.PutPayloadResponse.FromString(await put).payload.ref.size for put in puts]
        return stalled, sizes, budget.used

    other = "tenant_inflight_bytes" if bound == "stream_inflight_bytes" else "stream_inflight_bytes"
    stalled, sizes, after = serve(scenario, data_settings={bound: limit, other: 64 * CHUNK})
    assert stalled == held * CHUNK, f"{bound} = {limit} held {stalled // CHUNK} chunks in flight"
    assert sizes == [len(payload)] * streams and after == 0, "every put completes once the disk catches up"


def test_payload_bytes_never_reach_logs_errors_or_evidence(serve, caplog):
    caplog.set_level(logging.DEBUG)
    data_bytes = SECRET * 100

    async def scenario(served):
        client = served.remote()
        messages = []
        data = served.data()
        for stream in (
            (header(len(data_bytes)), chunk(data_bytes, 0), trailer(data_bytes[::-1])),      # quarantined
            (header(10), chunk(data_bytes[:20], 0)),                                         # overrun
            (header(len(data_bytes)), chunk(data_bytes[:-3], 0), chunk(data_bytes[:40], 10)),  # overlap
        ):
            try:
                await put_raw(client, *stream)
            except errors.PlanesError as exc:
                messages.append(f"{exc} {exc.metadata}")
        info = await data.put(data_bytes, classification="confidential")
        try:
            await data.transfer(info.ref.payload_id, "sink:anywhere")
        except errors.PlanesError as exc:
            messages.append(f"{exc} {exc.metadata}")
        events = await served.events()
        return messages, [str(e) for e in events]

    messages, events = serve(scenario)
    assert len(messages) == 4
    text = SECRET.decode()
    assert all(text not in m for m in messages), "errors name sizes and digests, never bytes"
    assert all(text not in e for e in events), "evidence carries sizes and digests, never bytes"
    assert text not in caplog.text, "logs carry sizes and digests, never bytes"
    assert "quarantined" in caplog.text, "the quarantine itself is logged"


def test_without_evidence_transfers_fail_closed_and_puts_are_spooled(run, tmp_path):
    """The evidence plane is down (nothing listens at its endpoint): no transfer is allowed unrecorded."""
    from dataclasses import replace

    from planes.kernel.host import Candidate, PluginHost
    from planes.kernel.kernel import Kernel
    from planes.kernel.server import KernelServer
    from planes.kernel.settings import PlaneEndpoint
    from planes.plugins.data import DataPlugin
    from tests.conftest import make_settings

    from .conftest import Served

    async def main():
        settings = replace(make_settings(tmp_path), planes={"evidence": PlaneEndpoint(endpoint="127.0.0.1:1")})
        plugin = DataPlugin()
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "t", plugin)])).open()
        server = KernelServer(kernel)
        served = Served(kernel, await server.start(), plugin, tmp_path)
        try:
            data = served.data()
            info = await data.put(b"kept while evidence is down", classification="internal")
            with pytest.raises(errors.Unavailable, match="data.transferred cannot be recorded"):
                await data.transfer(info.ref.payload_id, "tool:search")
            spooled = list((tmp_path / "data" / "evidence-spool").iterdir())
            return info, await data.get_bytes(info.ref.payload_id), spooled
        finally:
            for client in served.made:
                await client.close()
            await server.stop(grace=1)

    info, back, spooled = run(main())
    assert back == b"kept while evidence is down" and info.state == pb.PAYLOAD_STATE_AVAILABLE
    assert spooled, "the data.stored event waits in the encrypted spool"


def test_a_failed_disk_write_fails_the_put_keeps_nothing_and_frees_its_budget(serve, monkeypatch):
    """The storing lane's error reaches the caller; the partial file and the in-flight bytes go."""
    real_append, appended = ObjectWriter.append, []

    def failing_append(self, data):
        appended.append(len(data))
        if len(appended) == 3:
            raise OSError(5, "Input/output error")
        return real_append(self, data)

    monkeypatch.setattr(ObjectWriter, "append", failing_append)
    total, step = 8 * MiB, MiB
    payload = bytes(range(256)) * (total // 256)

    async def scenario(served):
        client = served.remote()
        messages = [header(total), *(chunk(payload[o:o + step], o) for o in range(0, total, step)), trailer(payload)]
        try:
            await put_raw(client, *messages)
        except errors.PlanesError as exc:
            failure = exc
        else:
            failure = None
        incoming = list((served.state_dir / "data" / "incoming").iterdir())
        objects = list((served.state_dir / "data" / "objects").iterdir())
        monkeypatch.setattr(ObjectWriter, "append", real_append)
        after = await served.data().put(payload, classification="internal")
        return failure, incoming, objects, served.plugin.plane.tenant_budget("acme").used, after

    failure, incoming, objects, used, after = serve(scenario)
    assert isinstance(failure, errors.Internal), failure
    assert incoming == [] and objects == [], "nothing of the failed put stays on disk"
    assert used == 0, "its in-flight bytes went back to the tenant's budget"
    assert after.ref.size == total, "the next put goes through"


async def _publish(served, *changes) -> int:
    """Apply ``(name, spec or None to delete)`` egress_rule changes for tenant acme and publish them."""
    admin = served.remote(ControlPlane, ("admin",), "*")
    for name, spec in changes:
        request = {"tenant": "acme", "kind": cpb.RESOURCE_KIND_EGRESS_RULE, "name": name}
        if spec is None:
            current = (await admin.get_resource(cpb.GetResourceRequest(**request))).resource
            await admin.delete_resource(cpb.DeleteResourceRequest(
                **request, expected_resource_version=current.resource_version))
            continue
        await admin.put_resource(cpb.PutResourceRequest(**request, spec=json_format.ParseDict(spec, struct_pb2.Struct())))
    listed = await admin.list_snapshots(cpb.ListSnapshotsRequest())
    latest = listed.snapshots[0].revision if listed.snapshots else 0
    published = await admin.publish_snapshot(cpb.PublishSnapshotRequest(expected_revision=latest))
    revision = published.snapshot.revision
    egress = served.plugin.plane.control_egress
    async with asyncio.timeout(20):  # only turns a hang into a failure
        while egress.cache.current is None or egress.cache.current.revision < revision \
                or egress.target_revision != revision:  # applied, and the control plane told so
            await asyncio.sleep(0.02)
    return revision


def test_egress_rules_published_by_the_control_plane_allow_transfers_until_withdrawn(serve):
    async def scenario(served):
        data = served.data()
        info = await data.put(b"quarterly numbers", classification="confidential")
        payload_id = info.ref.payload_id
        before = await data.transfer(payload_id, "tool:push-conf", raise_on_denial=False)
        first = await _publish(served, ("to-push", {"classification": "confidential",
                                                    "destinations": ["tool:push-*", "10.0.0.5:443"]}),
                               ("hosts-only", {"classification": "confidential", "destinations": ["sink.example"]}))
        allowed = await data.transfer(payload_id, "tool:push-conf")
        host_only = await data.transfer(payload_id, "sink:sink.example", raise_on_denial=False)
        other_tenant = served.data("globex")
        theirs = await other_tenant.put(b"theirs", classification="confidential")
        globex = await other_tenant.transfer(theirs.ref.payload_id, "tool:push-conf", raise_on_denial=False)
        await _publish(served, ("to-push", None))
        withdrawn = await data.transfer(payload_id, "tool:push-conf", raise_on_denial=False)
        return before, first, allowed, host_only, globex, withdrawn, await served.events()

    before, first, allowed, host_only, globex, withdrawn, events = serve(scenario, control=True)
    assert not before.allowed
    assert "[plugin.data.egress]" in before.refusal_reason and "egress_rule resource of tenant 'acme'" in \
        before.refusal_reason
    assert allowed.allowed and allowed.rule == f"egress_rule/to-push@{first}:tool:push-*"
    assert not host_only.allowed, "a host destination is for the execution plane, not a data destination"
    assert not globex.allowed, "acme's rule allows nothing for globex"
    assert not withdrawn.allowed, "a withdrawn rule allows nothing once its removal is in force"
    decisions = [(e.event_type, fields(e).get("rule", "")) for e in events
                 if e.event_type in ("data.transferred", "data.denied")]
    assert decisions == [("data.denied", ""), ("data.transferred", allowed.rule), ("data.denied", ""),
                         ("data.denied", "")]


def test_control_plane_rules_count_only_while_the_configuration_is_in_force(serve):
    async def scenario(served):
        data = served.data()
        info = await data.put(b"numbers", classification="confidential")
        await _publish(served, ("to-push", {"classification": "confidential", "destinations": ["tool:push"]}))
        allowed = await data.transfer(info.ref.payload_id, "tool:push")
        egress = served.plugin.plane.control_egress
        egress.target_revision = None  # as after a restart, before the control plane has answered
        unanswered = await data.transfer(info.ref.payload_id, "tool:push", raise_on_denial=False)
        egress.target_revision = egress.cache.current.revision
        egress.cache.clock = lambda: 2**40  # far past the revision's expiry: stop admitting
        expired = await data.transfer(info.ref.payload_id, "tool:push", raise_on_denial=False)
        return allowed, unanswered, expired

    allowed, unanswered, expired = serve(scenario, control=True)
    assert allowed.allowed
    assert not unanswered.allowed, "whether the cached revision is still the one to run is unknown: fail closed"
    assert not expired.allowed, "an expired configuration allows nothing beyond the settings"


def test_the_data_planes_subscriber_serves_the_kernels_contracts(serve):
    """It applies a snapshot that requires a contract this kernel serves, and refuses one it does not."""
    from planes.common.v1 import common_pb2

    async def scenario(served):
        admin = served.remote(ControlPlane, ("admin",), "*")
        cache = served.plugin.plane.control_egress.cache
        outcomes = []
        for revision, (plane, minor) in enumerate((("evidence", 0), ("data", 5)), start=1):
            await admin.publish_snapshot(cpb.PublishSnapshotRequest(
                expected_revision=revision - 1,
                required_contracts=[common_pb2.ContractVersion(plane=plane, major=1, minor=minor)]))
            async with asyncio.timeout(20):  # only turns a hang into a failure
                while True:
                    status = await admin.get_rollout_status(cpb.GetRolloutStatusRequest())
                    mine = [s for s in status.subscribers if s.subscriber_id.startswith("data@")]
                    if mine and mine[0].last_outcome_revision == revision:
                        break
                    await asyncio.sleep(0.02)
            outcomes.append((mine[0].last_outcome, mine[0].error, cache.current.revision))
        return outcomes, sorted(f"{c.plane}={c.major}.{c.minor}" for c in mine[0].contract_versions)

    outcomes, contracts = serve(scenario, control=True)
    assert outcomes[0] == (cpb.APPLY_OUTCOME_ACK, "", 1), "evidence 1.0 is served by this kernel"
    assert outcomes[1] == (cpb.APPLY_OUTCOME_NACK, "revision 2 needs the data contract 1.5; this host serves 1.0", 1)
    assert contracts == ["data=1.0"], "it reports the plane it follows the configuration for"


def test_a_kernel_without_a_control_plane_follows_the_settings_even_with_a_control_key_left(serve, tmp_path):
    """A state directory that once ran the control plane keeps its key; without the plugin, data still starts."""
    from planes.kernel.secrets import ensure_private_dir

    ensure_private_dir(tmp_path / "keys")
    (tmp_path / "keys" / "control-signing.pub.pem").write_bytes(b"left by an earlier kernel")

    async def scenario(served):
        data = served.data()
        info = await data.put(b"numbers", classification="internal")
        return served.plugin.plane.control_egress, await data.transfer(info.ref.payload_id, "tool:search")

    following, allowed = serve(scenario, state_dir=tmp_path)
    assert following is None and allowed.allowed and allowed.rule == "internal:tool:*"


def test_a_data_plane_behind_its_target_revision_applies_no_control_plane_rule(serve):
    """Rules only allow more: a host that refused the newer revision (here: a contract it does not serve)
    must not go on allowing what the newer one withdrew."""
    from planes.common.v1 import common_pb2

    async def scenario(served):
        data = served.data()
        info = await data.put(b"numbers", classification="confidential")
        first = await _publish(served, ("to-push", {"classification": "confidential", "destinations": ["tool:push"]}))
        allowed = await data.transfer(info.ref.payload_id, "tool:push")
        admin = served.remote(ControlPlane, ("admin",), "*")
        current = (await admin.get_resource(cpb.GetResourceRequest(
            tenant="acme", kind=cpb.RESOURCE_KIND_EGRESS_RULE, name="to-push"))).resource
        await admin.delete_resource(cpb.DeleteResourceRequest(
            tenant="acme", kind=cpb.RESOURCE_KIND_EGRESS_RULE, name="to-push",
            expected_resource_version=current.resource_version))
        await admin.publish_snapshot(cpb.PublishSnapshotRequest(
            expected_revision=first, required_contracts=[common_pb2.ContractVersion(plane="data", major=1, minor=9)]))
        egress = served.plugin.plane.control_egress
        async with asyncio.timeout(20):  # only turns a hang into a failure
            while egress.target_revision != first + 1:
                await asyncio.sleep(0.02)
        behind = await data.transfer(info.ref.payload_id, "tool:push", raise_on_denial=False)
        return allowed, behind, egress.cache.current.revision

    allowed, behind, applied = serve(scenario, control=True)
    assert allowed.allowed and applied == 1, "revision 2 was refused: the host stays on 1"
    assert not behind.allowed, "behind its target, the host applies no control-plane rule"
