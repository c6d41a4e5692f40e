"""The control plane's servicer: desired state, snapshots, distribution, staged rollouts.

Every mutation is authorized by the kernel (admin role; tenant scope), then
recorded in evidence BEFORE it is committed (who, what, digests before and
after): when evidence cannot be written the mutation is refused, so there is
never a change without its record. Subscribers watch the fleet's target
revision (or the rollout's, for canaries) and report ACK/NACK with health and
capacity; a canary that NACKs or reports unhealthy inside the rollout window
rolls the rollout back automatically, by publishing a new revision with the
base content (subscribers never accept an older revision).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Callable

from google.protobuf import duration_pb2, timestamp_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.kernel.call import CallContext
from planes.kernel.contract import Encoded
from planes.kernel.contracts.control import ControlPlane
from planes.kernel.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from planes.kernel.identity import ALL_TENANTS
from planes.kernel.tokens import SigningKey

from .schema import kind_name, validate
from .store import ControlStore, canonical_spec, digest_of

DEFAULT_VALIDITY = 86_400.0
DEFAULT_LEASE = 300.0


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _duration(message: duration_pb2.Duration, default: float) -> float:
    value = message.seconds + message.nanos / 1e9
    return value if value > 0 else default


class Control(ControlPlane):
    def __init__(self, store: ControlStore, key: SigningKey | None, record: Callable, *,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.key = key
        self._record_events = record
        self.clock = clock
        self.subscribers: dict[str, pb.SubscriberStatus] = {}
        self.rollouts: dict[str, pb.Rollout] = {}
        self._changed = asyncio.Condition()
        # The revision everyone runs, kept on disk: after a restart the fleet
        # must not jump to a staged (canary) revision just because it is the
        # latest published one.
        self._fleet_revision = store.counter("fleet")
        #: The push message of recent revisions: a publish reaches every
        #: watcher, and reading and parsing a large snapshot once per watcher
        #: was most of the distribution time.
        self._pushes: dict[int, Encoded] = {}

    # -- evidence ---------------------------------------------------------------

    async def _record(self, call: CallContext, tenant: str, event_type: str, **fields: str) -> None:
        event = epb.Event(event_id=f"control:{event_type}:{os.urandom(12).hex()}", event_type=event_type,
                          correlation=common_pb2.Correlation(correlation_id=call.correlation_id,
                                                             request_id=call.request_id,
                                                             trace_id=call.trace.trace_id, tenant=tenant,
                                                             actor=call.identity.principal))
        for name, value in fields.items():
            event.fields.add(name=name, string_value=str(value), classification=common_pb2.CLASSIFICATION_INTERNAL)
        await self._record_events(tenant, [event])

    # -- resources ----------------------------------------------------------------

    async def put_resource(self, request: pb.PutResourceRequest, call: CallContext) -> pb.PutResourceResponse:
        self.store._writable("writing a resource")
        validate(request.kind, request.tenant, request.name, request.spec)
        # Refuse early what the store would refuse, so a refused write leaves no record.
        current = self.store.check_version(request.kind, request.tenant, request.name,
                                           request.expected_resource_version)
        await self._record(
            call, request.tenant, "config.resource.put", kind=kind_name(request.kind), name=request.name,
            version_before=current.resource_version if current else 0,
            digest_before=current.spec_digest.value.hex() if current else "",
            digest_after=digest_of(canonical_spec(request.spec)).value.hex())
        _, after = self.store.put(request.kind, request.tenant, request.name, request.spec,
                                  request.expected_resource_version, call.identity.principal)
        return pb.PutResourceResponse(resource=after)

    async def get_resource(self, request: pb.GetResourceRequest, call: CallContext) -> pb.GetResourceResponse:
        return pb.GetResourceResponse(resource=self.store.get(request.kind, request.tenant, request.name))

    async def list_resources(self, request: pb.ListResourcesRequest, call: CallContext) -> pb.ListResourcesResponse:
        found = [r for r in self.store.list(tenant=request.tenant)
                 if not request.kinds or r.kind in request.kinds]
        start = int(request.page.page_token or 0) if (request.page.page_token or "0").isdigit() else 0
        size = request.page.page_size or 500
        page = found[start:start + size]
        token = str(start + size) if start + size < len(found) else ""
        return pb.ListResourcesResponse(resources=page, page=common_pb2.PageResponse(next_page_token=token))

    async def delete_resource(self, request: pb.DeleteResourceRequest, call: CallContext) -> pb.DeleteResourceResponse:
        self.store._writable("deleting a resource")
        current = self.store.get(request.kind, request.tenant, request.name)
        self.store.check_version(request.kind, request.tenant, request.name, request.expected_resource_version)
        await self._record(call, request.tenant, "config.resource.deleted", kind=kind_name(request.kind),
                           name=request.name, version_before=current.resource_version,
                           digest_before=current.spec_digest.value.hex())
        before = self.store.delete(request.kind, request.tenant, request.name, request.expected_resource_version,
                                   call.identity.principal)
        return pb.DeleteResourceResponse(resource=before)

    # -- snapshots ------------------------------------------------------------------

    def _all_tenants(self, call: CallContext, what: str) -> None:
        if call.identity.tenant != ALL_TENANTS:
            raise FailedPrecondition(f"{what} affects every tenant: it needs an identity acting for all ('*')")

    def _can_publish(self, expected_revision: int) -> None:
        """Refuse early what publishing would refuse, so a refused publish leaves no record."""
        self.store._writable("publishing")
        if self.key is None:
            raise FailedPrecondition("publishing refused: the control plane's signing key is unavailable")
        latest = self.store.latest_revision()
        if expected_revision != latest:
            raise Conflict(f"expected revision {expected_revision}, latest is {latest}; someone published meanwhile")

    def _profile(self) -> dict:
        profiles = self.store.list(tenant=ALL_TENANTS, kind=pb.RESOURCE_KIND_DEPLOYMENT_PROFILE)
        if not profiles:
            return {}
        from google.protobuf import json_format
        return json_format.MessageToDict(profiles[0].spec)

    async def publish_snapshot(self, request: pb.PublishSnapshotRequest, call: CallContext) -> pb.PublishSnapshotResponse:
        self._all_tenants(call, "publishing")
        profile = self._profile()
        policy = request.on_lease_expiry or (
            pb.LEASE_EXPIRY_POLICY_DEGRADED if profile.get("lease_expiry") == "degraded"
            else pb.LEASE_EXPIRY_POLICY_STOP_ADMITTING)
        self._can_publish(request.expected_revision)
        revision = self.store.latest_revision() + 1
        await self._record(call, ALL_TENANTS, "config.published", revision=revision, staged=request.staged,
                           message=request.message)
        signed = self.store.publish(
            self.key, expected_revision=request.expected_revision, actor=call.identity.principal,
            validity=_duration(request.validity, float(profile.get("validity_seconds", DEFAULT_VALIDITY))),
            lease=_duration(request.lease, float(profile.get("lease_seconds", DEFAULT_LEASE))),
            on_lease_expiry=policy, required_contracts=list(request.required_contracts), message=request.message)
        header = pb.Snapshot.FromString(signed.snapshot)
        if not request.staged:
            await self._target_fleet(header.revision)
        return pb.PublishSnapshotResponse(snapshot=header)

    async def list_snapshots(self, request: pb.ListSnapshotsRequest, call: CallContext) -> pb.ListSnapshotsResponse:
        latest = self.store.latest_revision()
        start = int(request.page.page_token) if request.page.page_token.isdigit() else latest
        size = request.page.page_size or 100
        revisions = [r for r in range(start, max(0, start - size), -1)]
        snapshots = [pb.Snapshot.FromString(self.store.snapshot(r).snapshot) for r in revisions]
        token = str(revisions[-1] - 1) if revisions and revisions[-1] > 1 else ""
        return pb.ListSnapshotsResponse(snapshots=snapshots, page=common_pb2.PageResponse(next_page_token=token))

    async def get_snapshot(self, request: pb.GetSnapshotRequest, call: CallContext) -> pb.GetSnapshotResponse:
        return pb.GetSnapshotResponse(snapshot=self.store.snapshot(request.revision))

    async def rollback_snapshot(self, request: pb.RollbackSnapshotRequest, call: CallContext) -> pb.RollbackSnapshotResponse:
        self._all_tenants(call, "a rollback")
        self.store.snapshot(request.to_revision)  # NotFound before anything is recorded
        self._can_publish(request.expected_revision)
        await self._record(call, ALL_TENANTS, "config.rolled_back", to_revision=request.to_revision,
                           revision=self.store.latest_revision() + 1, message=request.message)
        signed = self.store.rollback(self.key, request.to_revision, expected_revision=request.expected_revision,
                                     actor=call.identity.principal)
        header = pb.Snapshot.FromString(signed.snapshot)
        await self._target_fleet(header.revision)
        return pb.RollbackSnapshotResponse(snapshot=header)

    async def diff_snapshots(self, request: pb.DiffSnapshotsRequest, call: CallContext) -> pb.DiffSnapshotsResponse:
        def resources(revision: int) -> dict:
            if revision == 0:
                return {}
            content = pb.SnapshotContent.FromString(self.store.snapshot(revision).content)
            return {(r.kind, r.tenant, r.name): r for r in content.resources
                    if request.tenant in (ALL_TENANTS, r.tenant)}

        before, after = resources(request.from_revision), resources(request.to_revision)
        changes = []
        for key in sorted(set(before) | set(after)):
            old, new = before.get(key), after.get(key)
            if old is None:
                changes.append(pb.ResourceChange(change=pb.CHANGE_TYPE_ADDED, after=new))
            elif new is None:
                changes.append(pb.ResourceChange(change=pb.CHANGE_TYPE_REMOVED, before=old))
            elif old.spec_digest.value != new.spec_digest.value:
                changes.append(pb.ResourceChange(change=pb.CHANGE_TYPE_MODIFIED, before=old, after=new))
        return pb.DiffSnapshotsResponse(changes=changes)

    # -- distribution -------------------------------------------------------------------

    def _active_rollout(self) -> pb.Rollout | None:
        return next((r for r in self.rollouts.values() if r.state == pb.ROLLOUT_STATE_CANARY), None)

    def target_for(self, subscriber_id: str) -> int:
        rollout = self._active_rollout()
        if rollout is not None and subscriber_id in rollout.canary_subscribers:
            return rollout.revision
        return self._fleet_revision

    async def _target_fleet(self, revision: int) -> None:
        self.store.set_counter("fleet", revision)
        async with self._changed:
            self._fleet_revision = revision
            self._changed.notify_all()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _status(self, subscriber_id: str) -> pb.SubscriberStatus:
        if not subscriber_id:
            raise InvalidArgument("subscriber_id is required")
        return self.subscribers.setdefault(subscriber_id, pb.SubscriberStatus(subscriber_id=subscriber_id))

    async def watch_snapshots(self, request: pb.WatchSnapshotsRequest, call: CallContext) -> AsyncIterator[pb.WatchSnapshotsResponse]:
        status = self._status(request.subscriber_id)
        status.watching = True
        del status.contract_versions[:]
        status.contract_versions.extend(request.contract_versions)
        known = request.known_revision
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda known=known: self.target_for(request.subscriber_id) > known)
                    target = self.target_for(request.subscriber_id)
                status.target_revision = target
                yield self._push(target)
                known = target
        finally:
            status.watching = False

    def _push(self, revision: int) -> Encoded:
        message = self._pushes.get(revision)
        if message is None:
            message = Encoded(pb.WatchSnapshotsResponse(
                snapshot=self.store.snapshot(revision), target_revision=revision,
                sent_at=_stamp(self.clock())).SerializeToString())
            if len(self._pushes) >= 4:
                del self._pushes[min(self._pushes)]
            self._pushes[revision] = message
        return message

    async def report_status(self, request: pb.ReportStatusRequest, call: CallContext) -> pb.ReportStatusResponse:
        status = self._status(request.subscriber_id)
        status.applied_revision = request.applied_revision
        status.last_seen.CopyFrom(_stamp(self.clock()))
        status.health.CopyFrom(request.health)
        status.capacity.CopyFrom(request.capacity)
        if request.contract_versions:
            del status.contract_versions[:]
            status.contract_versions.extend(request.contract_versions)
        if request.outcome:
            status.last_outcome = request.outcome
            status.last_outcome_revision = request.revision
            status.nack_reason = request.nack_reason
            status.error = request.error[:500]
        rollout = self._active_rollout()
        if rollout is not None and request.subscriber_id in rollout.canary_subscribers:
            failed = ((request.outcome == pb.APPLY_OUTCOME_NACK and request.revision == rollout.revision)
                      or request.health.state == common_pb2.HealthSummary.STATE_UNHEALTHY)
            window_ends = rollout.started_at.seconds + rollout.window.seconds
            if failed and self.clock() <= window_ends:
                reason = (f"canary {request.subscriber_id} "
                          + (f"NACKed revision {rollout.revision}: {pb.NackReason.Name(request.nack_reason)}"
                             if request.outcome == pb.APPLY_OUTCOME_NACK else "reported unhealthy"))
                await self._roll_back(rollout, call, pb.ROLLOUT_STATE_ROLLED_BACK, reason)
        target = self.target_for(request.subscriber_id)
        status.target_revision = target
        return pb.ReportStatusResponse(target_revision=target)

    # -- rollouts -----------------------------------------------------------------

    async def get_rollout_status(self, request: pb.GetRolloutStatusRequest, call: CallContext) -> pb.GetRolloutStatusResponse:
        response = pb.GetRolloutStatusResponse(fleet_revision=self._fleet_revision)
        if request.rollout_id:
            if request.rollout_id not in self.rollouts:
                raise NotFound(f"rollout {request.rollout_id!r} not found")
            response.rollout.CopyFrom(self.rollouts[request.rollout_id])
        elif self._active_rollout() is not None:
            response.rollout.CopyFrom(self._active_rollout())
        response.subscribers.extend(self.subscribers[s] for s in sorted(self.subscribers))
        return response

    async def start_rollout(self, request: pb.StartRolloutRequest, call: CallContext) -> pb.StartRolloutResponse:
        self._all_tenants(call, "a rollout")
        if self._active_rollout() is not None:
            raise FailedPrecondition(f"rollout {self._active_rollout().rollout_id} is still in its canary stage; "
                                     "promote or abort it first")
        if request.revision <= self._fleet_revision:
            raise InvalidArgument(f"revision {request.revision} is not newer than the fleet's {self._fleet_revision}")
        self.store.snapshot(request.revision)
        cohort = request.cohort
        if cohort.subscriber_ids:
            canaries = sorted(set(cohort.subscriber_ids))
        elif 0 < cohort.fraction <= 1:
            known = sorted(self.subscribers)
            canaries = known[:max(1, math.ceil(cohort.fraction * len(known)))] if known else []
        else:
            raise InvalidArgument("a canary cohort needs subscriber_ids or a fraction in (0, 1]")
        if not canaries:
            raise FailedPrecondition("no subscribers to make canaries of")
        now = self.clock()
        rollout = pb.Rollout(rollout_id=os.urandom(8).hex(), revision=request.revision,
                             base_revision=self._fleet_revision, cohort=cohort, canary_subscribers=canaries,
                             window=duration_pb2.Duration(seconds=int(_duration(request.window, 300))),
                             state=pb.ROLLOUT_STATE_CANARY, started_at=_stamp(now), started_by=call.identity.principal,
                             updated_at=_stamp(now))
        await self._record(call, ALL_TENANTS, "rollout.started", rollout_id=rollout.rollout_id,
                           revision=request.revision, base_revision=rollout.base_revision,
                           canaries=",".join(canaries))
        self.rollouts[rollout.rollout_id] = rollout
        for subscriber in canaries:
            self._status(subscriber).canary = True
        await self._notify()
        return pb.StartRolloutResponse(rollout=rollout)

    def _rollout(self, rollout_id: str) -> pb.Rollout:
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise NotFound(f"rollout {rollout_id!r} not found")
        if rollout.state != pb.ROLLOUT_STATE_CANARY:
            raise FailedPrecondition(f"rollout {rollout_id} is {pb.RolloutState.Name(rollout.state)}, not in canary")
        return rollout

    async def promote_rollout(self, request: pb.PromoteRolloutRequest, call: CallContext) -> pb.PromoteRolloutResponse:
        self._all_tenants(call, "promoting")
        rollout = self._rollout(request.rollout_id)
        await self._record(call, ALL_TENANTS, "rollout.promoted", rollout_id=rollout.rollout_id,
                           revision=rollout.revision)
        rollout.state = pb.ROLLOUT_STATE_PROMOTED
        rollout.updated_at.CopyFrom(_stamp(self.clock()))
        self._clear_canaries(rollout)
        await self._target_fleet(rollout.revision)
        return pb.PromoteRolloutResponse(rollout=rollout)

    async def abort_rollout(self, request: pb.AbortRolloutRequest, call: CallContext) -> pb.AbortRolloutResponse:
        rollout = self._rollout(request.rollout_id)
        await self._roll_back(rollout, call, pb.ROLLOUT_STATE_ABORTED, request.reason or "aborted")
        return pb.AbortRolloutResponse(rollout=rollout)

    async def _roll_back(self, rollout: pb.Rollout, call: CallContext, state: int, reason: str) -> None:
        """Canaries may already run the new revision and refuse older ones: republish the base as a new one."""
        latest = self.store.latest_revision()
        await self._record(call, ALL_TENANTS, "rollout.rolled_back" if state == pb.ROLLOUT_STATE_ROLLED_BACK
                           else "rollout.aborted", rollout_id=rollout.rollout_id, revision=rollout.revision,
                           base_revision=rollout.base_revision, reason=reason)
        signed = self.store.rollback(self.key, rollout.base_revision, expected_revision=latest,
                                     actor=call.identity.principal)
        rollout.state = state
        rollout.reason = reason
        rollout.rollback_revision = pb.Snapshot.FromString(signed.snapshot).revision
        rollout.updated_at.CopyFrom(_stamp(self.clock()))
        self._clear_canaries(rollout)
        await self._target_fleet(rollout.rollback_revision)

    def _clear_canaries(self, rollout: pb.Rollout) -> None:
        for subscriber in rollout.canary_subscribers:
            if subscriber in self.subscribers:
                self.subscribers[subscriber].canary = False
