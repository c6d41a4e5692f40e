"""The control plane's servicer: desired state, snapshots, distribution, staged rollouts.

Every mutation is authorized by the kernel (admin role; tenant scope), then
recorded in evidence BEFORE it is committed (who, what, digests before and
after): when evidence cannot be written the mutation is refused, so there is
never a change without its record. A commit that fails after its record (the
store full or read-only) is recorded too, as ``config.commit.failed`` pointing
at the record, so evidence never shows as done a change that did not happen;
the caller gets the store's reason (UNAVAILABLE). Subscribers watch the fleet's target
revision (or the rollout's, for canaries) and report ACK/NACK with health and
capacity; a canary that NACKs or reports unhealthy inside the rollout window
rolls the rollout back automatically, by publishing a new revision with the
base content (subscribers never accept an older revision). So does a canary
that has not confirmed the revision when the window ends.

Rollouts and the subscribers' last reports are kept in the store, so a
restarted control plane resumes a canary where it was: :meth:`Control.start`
rolls back what failed (or ran out of window) while it was down, and arms the
deadline of the rollout still running. A publish, the fleet's new target and
a rollout's new state commit together, in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from google.protobuf import duration_pb2, timestamp_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.kernel.call import CallContext
from planes.kernel.contract import Encoded
from planes.kernel.contracts.control import ControlPlane
from planes.kernel.errors import (Conflict, FailedPrecondition, InvalidArgument, LimitExceeded, NotFound,
                                  PermissionDenied, PlanesError, Unavailable)
from planes.kernel.identity import ALL_TENANTS, Identity
from planes.kernel.tokens import SigningKey
from planes.plugins.evidence.writer import call_event

from .delta import element_bounds, make_runs
from .schema import kind_name, validate
from .store import DesiredStateStore, canonical_spec, digest_of

log = logging.getLogger(__name__)

DEFAULT_VALIDITY = 86_400.0
DEFAULT_LEASE = 300.0
#: Subscribers kept (statuses and owners) before a new subscriber id is refused: every id is a
#: stored row, and a fraction cohort picks its canaries among them.
DEFAULT_MAX_SUBSCRIBERS = 10_000
#: A subscriber silent this long (not watching, no report) gives its place up to a new one when the limit is
#: reached: a worker's default id carries its pid, so every restart registers a new id.
DEFAULT_SUBSCRIBER_IDLE_SECONDS = 24 * 3600.0
MAX_SUBSCRIBER_ID = 256
#: Recorded when a change recorded in evidence then failed to commit (see :meth:`Control._committing`).
COMMIT_FAILED = "config.commit.failed"
#: Who automatic steps (a rollback at the window's end or after a restart) are recorded as.
CONTROL_IDENTITY = Identity(principal="control", tenant=ALL_TENANTS, roles=frozenset({"service"}), source="kernel")


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _duration(message: duration_pb2.Duration, default: float) -> float:
    value = message.seconds + message.nanos / 1e9
    return value if value > 0 else default


def _remember(cache: dict, key, value, keep: int = 4) -> None:
    """Keep ``value`` under ``key``, dropping the oldest entries beyond ``keep``."""
    while len(cache) >= keep and key not in cache:
        del cache[next(iter(cache))]
    cache[key] = value


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


class Control(ControlPlane):
    def __init__(self, store: DesiredStateStore, key: SigningKey | None, record: Callable, *,
                 clock: Callable[[], float] = time.time, key_problem: str = "", keepalive: float = 15.0,
                 deltas: bool = True, max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
                 subscriber_idle_seconds: float = DEFAULT_SUBSCRIBER_IDLE_SECONDS):
        self.store = store
        self.max_subscribers = max_subscribers
        self.subscriber_idle_seconds = subscriber_idle_seconds
        #: Push a revision as a delta to the one a watcher runs, when that is under half the size.
        self.deltas = deltas
        #: Seconds of silence on a watch stream before a keepalive (no snapshot) is sent.
        self.keepalive = keepalive
        self.key = key
        #: Why the signing key is unavailable (never the key's bytes), for the refusal.
        self.key_problem = key_problem
        self._record_events = record
        self.clock = clock
        self.subscribers: dict[str, pb.SubscriberStatus] = {}
        for status in store.subscribers():
            status.watching = False  # streams did not survive the restart
            self.subscribers[status.subscriber_id] = status
        #: The principal each subscriber id belongs to (see :meth:`_subscriber`).
        self._owners: dict[str, str] = store.subscriber_owners()
        self.rollouts: dict[str, pb.Rollout] = {r.rollout_id: r for r in store.rollouts()}
        #: The rollout in canary, if any (promoting or rolling back changes its state in place).
        self._active = next((r for r in self.rollouts.values() if r.state == pb.ROLLOUT_STATE_CANARY), None)
        self._changed = asyncio.Condition()
        #: One publish (or rollback, or rollout step) at a time: between the
        #: evidence record and the commit nothing else may take the revision.
        self._publishing = asyncio.Lock()
        #: One resource write at a time, for the same reason: the version check, the evidence
        #: record and the write happen with no other write between, so a write that loses a race
        #: is refused before its record, and evidence never shows a change that did not happen.
        #: Apart from ``_publishing``: a publish cuts its content in one read, before its record,
        #: so a write landing meanwhile goes into the next revision and need not wait for it.
        #: In-process only: control planes of several hosts sharing one store still refuse the
        #: loser in the store's transaction, but after its record.
        self._writing = asyncio.Lock()
        #: The store's refusal of a watch's bookkeeping, warned about once (see :meth:`_keep`).
        self._bookkeeping_problem = ""
        self._deadline: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task] = set()
        self._checkpointing: asyncio.Task | None = None
        self._small_commits = 0
        #: Open watch streams per subscriber.
        self._streams: dict[str, int] = {}
        #: Keepalive periods so far; at each, every stream with nothing new sends a keepalive.
        self._ticks = 0
        self._ticker: asyncio.Task | None = None
        #: The content digest of the revision pushed last, for the next publish's evidence record.
        self._content_digests: dict[int, str] = {}
        if hasattr(store, "defer_checkpoints"):
            store.defer_checkpoints()
        # The revision everyone runs, kept on disk: after a restart the fleet
        # must not jump to a staged (canary) revision just because it is the
        # latest published one.
        self._fleet_revision = store.counter("fleet")
        #: The push message of recent revisions: a publish reaches every
        #: watcher, and reading and parsing a large snapshot once per watcher
        #: was most of the distribution time.
        self._pushes: dict[int, Encoded] = {}
        #: Recent revisions' signed snapshots and content element bounds, to build deltas from.
        self._snapshots: dict[int, tuple[pb.SignedSnapshot, list[int]]] = {}
        #: Delta pushes by (base, target); None where the full snapshot is the smaller push.
        self._delta_pushes: dict[tuple[int, int], Encoded | None] = {}

    # -- evidence ---------------------------------------------------------------

    async def _record(self, call: CallContext, tenant: str, event_type: str, **fields: str) -> epb.Event:
        event = call_event("control", call, tenant, event_type, **fields)
        await self._record_events(tenant, [event])
        return event

    @asynccontextmanager
    async def _committing(self, call: CallContext, tenant: str, intent: epb.Event) -> AsyncIterator[None]:
        """Around the commit of a change already recorded as ``intent``: if the commit fails, say so.

        The record comes first (no change without it: evidence down refuses
        the change), so a commit that then fails (disk full, a read-only
        file, a writer on another host that got there first) would leave a
        record of something that never happened. A ``config.commit.failed``
        event, in the same correlation and pointing at the intent
        (``corrects_event_id``), records that it did not, and why: the error's
        class and message, never the values being written.
        """
        try:
            yield
        except Exception as exc:
            fields = {"intent_event_id": intent.event_id, "intent_event_type": intent.event_type,
                      "error": type(exc).__name__}
            if isinstance(exc, PlanesError):
                fields["reason"] = exc.message[:500]
                if "store_error" in exc.metadata:
                    fields["store_error"] = exc.metadata["store_error"]
            failed = call_event("control", call, tenant, COMMIT_FAILED, **fields)
            failed.corrects_event_id = intent.event_id
            try:
                await self._record_events(tenant, [failed])
            except Exception as record_exc:
                log.warning("control: %s (event %s) was recorded but not committed (%s), and recording that "
                            "failed too: %s", intent.event_type, intent.event_id, type(exc).__name__,
                            getattr(record_exc, "message", None) or record_exc)
            raise

    # -- resources ----------------------------------------------------------------

    async def put_resource(self, request: pb.PutResourceRequest, call: CallContext) -> pb.PutResourceResponse:
        self._writable("writing a resource")
        validate(request.kind, request.tenant, request.name, request.spec)
        async with self._writing:
            # Refuse early what the store would refuse, so a refused write leaves no record; under
            # the lock, so no other write can take the version while this one's record is written.
            current = self.store.check_version(request.kind, request.tenant, request.name,
                                               request.expected_resource_version)
            intent = await self._record(
                call, request.tenant, "config.resource.put", kind=kind_name(request.kind), name=request.name,
                version_before=current.resource_version if current else 0,
                digest_before=current.spec_digest.value.hex() if current else "",
                digest_after=digest_of(canonical_spec(request.spec)).value.hex())
            async with self._committing(call, request.tenant, intent):
                _, after = self.store.put(request.kind, request.tenant, request.name, request.spec,
                                          request.expected_resource_version, call.identity.principal)
        self._checkpoint_soon(small=True)
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
        self._writable("deleting a resource")
        async with self._writing:  # as in put_resource: check, record and delete with no write between
            current = self.store.get(request.kind, request.tenant, request.name)
            self.store.check_version(request.kind, request.tenant, request.name, request.expected_resource_version)
            intent = await self._record(call, request.tenant, "config.resource.deleted",
                                        kind=kind_name(request.kind), name=request.name,
                                        version_before=current.resource_version,
                                        digest_before=current.spec_digest.value.hex())
            async with self._committing(call, request.tenant, intent):
                before = self.store.delete(request.kind, request.tenant, request.name,
                                           request.expected_resource_version, call.identity.principal)
        self._checkpoint_soon(small=True)
        return pb.DeleteResourceResponse(resource=before)

    # -- snapshots ------------------------------------------------------------------

    def _all_tenants(self, call: CallContext, what: str) -> None:
        if call.identity.tenant != ALL_TENANTS:
            raise FailedPrecondition(f"{what} affects every tenant: it needs an identity acting for all ('*')")

    def _writable(self, what: str) -> None:
        """Privileged changes wait while the plane is degraded: store read-only or signing key unavailable."""
        self.store._writable(what)
        if self.key is None:
            raise FailedPrecondition(f"{what} refused: the control plane's signing key is unavailable"
                                     + (f" ({self.key_problem})" if self.key_problem else "")
                                     + "; reads still work")

    def _can_publish(self, expected_revision: int) -> None:
        """Refuse early what publishing would refuse, so a refused publish leaves no record."""
        self._writable("publishing")
        latest = self.store.latest_revision()
        if expected_revision != latest:
            raise Conflict(f"expected revision {expected_revision}, latest is {latest}; someone published meanwhile")

    def _no_canary(self, what: str, instead: str) -> None:
        """Refuse to move the fleet while a rollout is in canary.

        The canaries run the rollout's revision and the rest of the fleet its
        base; moving the fleet to a newer revision meanwhile would leave the
        rollout behind it, and promoting it would then take the fleet back to
        older content. So the rollout is settled first (promoted or aborted),
        or the new revision is published staged, for a rollout of its own.
        """
        rollout = self._active_rollout()
        if rollout is not None:
            raise FailedPrecondition(
                f"{what} refused: rollout {rollout.rollout_id} has revision {rollout.revision} in canary "
                f"(the fleet runs {self._fleet_revision}); promote or abort it first, {instead}")

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
        async with self._publishing:
            self._can_publish(request.expected_revision)
            if not request.staged:
                self._no_canary("a publish to the whole fleet", "or publish it staged")
            # Cut and signed before the record, so evidence names the exact content published.
            signed = self.store.prepare_snapshot(
                self.key, expected_revision=request.expected_revision, actor=call.identity.principal,
                validity=_duration(request.validity, float(profile.get("validity_seconds", DEFAULT_VALIDITY))),
                lease=_duration(request.lease, float(profile.get("lease_seconds", DEFAULT_LEASE))),
                on_lease_expiry=policy, required_contracts=list(request.required_contracts),
                message=request.message)
            revision = request.expected_revision + 1
            intent = await self._record(call, ALL_TENANTS, "config.published", revision=revision,
                                        staged=request.staged, message=request.message,
                                        **self._digests(request.expected_revision, signed))
            async with self._committing(call, ALL_TENANTS, intent):
                with self.store.transaction():
                    self.store.commit_snapshot(signed)
                    if not request.staged:
                        self.store.set_counter("fleet", revision)
            self._encode_push(revision, signed)
            if not request.staged:
                await self._target_fleet(revision)
            self._checkpoint_soon()
        return pb.PublishSnapshotResponse(snapshot=pb.Snapshot.FromString(signed.snapshot))

    def _digests(self, previous: int, signed: pb.SignedSnapshot) -> dict[str, str]:
        """Evidence fields: the content digest of the latest revision and of the one about to be published."""
        after = pb.Snapshot.FromString(signed.snapshot).content_digest.value.hex()
        before = self._content_digests.get(previous, "")
        if previous and not before:
            before = pb.Snapshot.FromString(self.store.snapshot(previous).snapshot).content_digest.value.hex()
        return {"digest_before": before, "digest_after": after}

    async def list_snapshots(self, request: pb.ListSnapshotsRequest, call: CallContext) -> pb.ListSnapshotsResponse:
        latest = self.store.latest_revision()
        start = int(request.page.page_token) if request.page.page_token.isdigit() else latest
        size = request.page.page_size or 100
        revisions = [r for r in range(start, max(0, start - size), -1)]
        snapshots = [pb.Snapshot.FromString(self.store.snapshot(r).snapshot) for r in revisions]
        token = str(revisions[-1] - 1) if revisions and revisions[-1] > 1 else ""
        return pb.ListSnapshotsResponse(snapshots=snapshots, page=common_pb2.PageResponse(next_page_token=token))

    async def get_snapshot(self, request: pb.GetSnapshotRequest, call: CallContext) -> pb.GetSnapshotResponse:
        identity = call.identity
        if identity.tenant != ALL_TENANTS:
            # A snapshot is every tenant's desired state: one tenant's service or operator reads its own
            # resources with ListResources and DiffSnapshots, which are tenant-scoped.
            raise PermissionDenied(
                f"{identity.principal!r} acts for tenant {identity.tenant!r}: a snapshot holds every tenant's "
                "configuration, so it needs an identity acting for every tenant ('*')")
        return pb.GetSnapshotResponse(snapshot=self.store.snapshot(request.revision))

    async def rollback_snapshot(self, request: pb.RollbackSnapshotRequest, call: CallContext) -> pb.RollbackSnapshotResponse:
        self._all_tenants(call, "a rollback")
        if request.to_revision < 1:
            # The store reads revision 0 as "the latest": republishing it would record a rollback that undoes nothing.
            raise InvalidArgument(f"to_revision must name a published revision (1 or more), "
                                  f"got {request.to_revision}")
        self.store.snapshot(request.to_revision)  # NotFound before anything is recorded
        async with self._publishing:
            self._can_publish(request.expected_revision)
            self._no_canary("a rollback of the whole fleet", "(aborting rolls the canaries back)")
            signed = self.store.prepare_rollback(self.key, request.to_revision,
                                                 expected_revision=request.expected_revision,
                                                 actor=call.identity.principal,
                                                 **({"message": request.message} if request.message else {}))
            revision = request.expected_revision + 1
            intent = await self._record(call, ALL_TENANTS, "config.rolled_back", to_revision=request.to_revision,
                                        revision=revision, message=request.message,
                                        **self._digests(request.expected_revision, signed))
            async with self._committing(call, ALL_TENANTS, intent):
                with self.store.transaction():
                    self.store.commit_snapshot(signed)
                    self.store.set_counter("fleet", revision)
            self._encode_push(revision, signed)
            await self._target_fleet(revision)
            self._checkpoint_soon()
        return pb.RollbackSnapshotResponse(snapshot=pb.Snapshot.FromString(signed.snapshot))

    async def diff_snapshots(self, request: pb.DiffSnapshotsRequest, call: CallContext) -> pb.DiffSnapshotsResponse:
        """Compare two revisions; ``to_revision`` 0 is the current, unpublished desired state (what the
        next publish would cut), so an admin sees what publishing would change. ``from_revision`` 0 is
        "nothing published": everything shows as added."""
        def keyed(found) -> dict:
            return {(r.kind, r.tenant, r.name): r for r in found if request.tenant in (ALL_TENANTS, r.tenant)}

        def published(revision: int) -> dict:
            if revision == 0:
                return {}
            return keyed(pb.SnapshotContent.FromString(self.store.snapshot(revision).content).resources)

        before = published(request.from_revision)
        after = published(request.to_revision) if request.to_revision else keyed(self.store.list())
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
        # Looked up for every push: kept, not searched for among every rollout ever run.
        active = self._active
        return active if active is not None and active.state == pb.ROLLOUT_STATE_CANARY else None

    def target_for(self, subscriber_id: str) -> int:
        rollout = self._active_rollout()
        if rollout is not None and subscriber_id in rollout.canary_subscribers:
            return rollout.revision
        return self._fleet_revision

    def _checkpoint_soon(self, *, small: bool = False) -> None:
        """Fold the WAL into the database off the event loop, one checkpoint at a time.

        After every publish (hundreds of KiB of snapshot), and after every
        200th small commit (a resource, a subscriber's report).
        """
        if small:
            self._small_commits += 1
            if self._small_commits < 200:
                return
        if not hasattr(self.store, "checkpoint") or (self._checkpointing and not self._checkpointing.done()):
            return
        self._small_commits = 0
        self._checkpointing = asyncio.get_running_loop().create_task(asyncio.to_thread(self.store.checkpoint))
        self._checkpointing.add_done_callback(self._checkpoint_done)

    @staticmethod
    def _checkpoint_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("control store checkpoint failed (retried after the next publish): %s", task.exception())

    async def _target_fleet(self, revision: int) -> None:
        """Wake the watchers; the store already holds ``revision`` as the fleet's target."""
        async with self._changed:
            self._fleet_revision = revision
            self._changed.notify_all()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _subscriber(self, call: CallContext, subscriber_id: str, *, bookkeeping: bool = False) -> pb.SubscriberStatus:
        """The status of the subscriber a caller watches or reports as, once it may act as it.

        ``bookkeeping``: a store that cannot write the owner is warned about
        (see :meth:`_keep`), not an error; a watch must not fail on it.

        A subscriber's reports steer the whole fleet (a canary's NACK rolls a
        rollout back) and its watch gets every tenant's desired state, so:

        - only an identity acting for every tenant ('*') may be a subscriber;
        - a subscriber id belongs to the principal that first watched or
          reported as it (kept in the store), and another principal may not
          act as it unless it holds the admin role (an admin claims no id). Ids are the hosts' own
          names ("execution@host:port", "worker:name"), not principals, so
          several hosts may share one principal; a host whose principal
          changes takes a new id;
        - at most ``max_subscribers`` ids are kept: a new one beyond that
          takes the place of the one silent longest (not watching, not a
          canary, no report for ``subscriber_idle_seconds``), whose status
          and owner are forgotten, and is refused if there is none.

        Refusals name the caller and the id, never the owner or its status.
        """
        if not subscriber_id:
            raise InvalidArgument("subscriber_id is required")
        if len(subscriber_id) > MAX_SUBSCRIBER_ID:
            raise InvalidArgument(f"subscriber_id is {len(subscriber_id)} characters; at most "
                                  f"{MAX_SUBSCRIBER_ID} are allowed")
        identity = call.identity
        if identity.tenant != ALL_TENANTS:
            raise PermissionDenied(
                f"{identity.principal!r} acts for tenant {identity.tenant!r} and may not be subscriber "
                f"{subscriber_id!r}: subscribers act for the whole fleet, so they need an identity acting "
                f"for every tenant ('*')")
        owner = self._owners.get(subscriber_id)
        if owner is not None and owner != identity.principal and "admin" not in identity.roles:
            raise PermissionDenied(
                f"subscriber {subscriber_id!r} belongs to another principal; {identity.principal!r} may "
                "watch and report only as subscribers it registered (use an id of its own)")
        if (subscriber_id not in self.subscribers and len(self.subscribers) >= self.max_subscribers
                and not self._forget_idle_subscriber()):
            raise LimitExceeded("subscribers", self.max_subscribers, len(self.subscribers) + 1,
                                message=f"subscriber {subscriber_id!r} refused: the control plane keeps at most "
                                        f"{self.max_subscribers} subscribers and knows {len(self.subscribers)}")
        if owner is None and "admin" not in identity.roles:  # an admin acting as a host claims nothing
            if not self.store.read_only:
                if bookkeeping:
                    self._keep("binding subscriber", self.store.bind_subscriber, subscriber_id, identity.principal)
                else:
                    self.store.bind_subscriber(subscriber_id, identity.principal)
            self._owners[subscriber_id] = identity.principal
        return self._status(subscriber_id)

    def _forget_idle_subscriber(self) -> bool:
        """Forget the subscriber silent longest, if one has been for ``subscriber_idle_seconds``; True if one was."""
        idle = [status for status in self.subscribers.values() if not status.watching and not status.canary
                and self.clock() - _seconds(status.last_seen) >= self.subscriber_idle_seconds]
        if not idle or self.store.read_only:
            return False
        oldest = min(idle, key=lambda status: (_seconds(status.last_seen), status.subscriber_id))
        self.store.forget_subscriber(oldest.subscriber_id)
        del self.subscribers[oldest.subscriber_id]
        self._owners.pop(oldest.subscriber_id, None)
        log.info("control: forgot subscriber %r, silent for %.0f s, to make room for a new one",
                 oldest.subscriber_id, self.clock() - _seconds(oldest.last_seen))
        return True

    def _status(self, subscriber_id: str) -> pb.SubscriberStatus:
        if not subscriber_id:
            raise InvalidArgument("subscriber_id is required")
        return self.subscribers.setdefault(subscriber_id, pb.SubscriberStatus(subscriber_id=subscriber_id))

    def _save_status(self, status: pb.SubscriberStatus, *, bookkeeping: bool = False) -> None:
        """Keep the status view across restarts; a read-only store keeps it in memory only.

        ``bookkeeping``: a failed write is warned about, not raised (see :meth:`_keep`).
        """
        if self.store.read_only:
            return
        if bookkeeping:
            if not self._keep("recording subscriber status", self.store.save_subscriber, status):
                return
        else:
            self.store.save_subscriber(status)
        self._checkpoint_soon(small=True)

    def _keep(self, what: str, write: Callable, *args) -> bool:
        """A watch's bookkeeping write; True if it was stored.

        A watch needs nothing from the store but the snapshots it reads, so
        a store that stops taking writes (disk full, a file made read-only
        while serving) must not fail every subscriber's watch: the status
        stays in memory, and one warning says so until a write works again.
        """
        try:
            write(*args)
        except Unavailable as exc:
            if self._bookkeeping_problem != exc.message:
                self._bookkeeping_problem = exc.message
                log.warning("control: %s not kept across restarts (kept in memory): %s", what, exc.message)
            return False
        if self._bookkeeping_problem:
            log.info("control: the store takes subscriber bookkeeping again")
            self._bookkeeping_problem = ""
        return True

    async def watch_snapshots(self, request: pb.WatchSnapshotsRequest, call: CallContext) -> AsyncIterator[pb.WatchSnapshotsResponse]:
        status = self._subscriber(call, request.subscriber_id, bookkeeping=True)
        status.watching = True
        if request.contract_versions:
            del status.contract_versions[:]
            status.contract_versions.extend(request.contract_versions)
        self._save_status(status, bookkeeping=True)
        known = request.known_revision
        self._streams[request.subscriber_id] = self._streams.get(request.subscriber_id, 0) + 1
        self._start_ticking()
        try:
            while True:
                tick = self._ticks
                async with self._changed:
                    await self._changed.wait_for(
                        lambda known=known, tick=tick: self.target_for(request.subscriber_id) > known
                        or self._ticks != tick)
                    target = self.target_for(request.subscriber_id)
                if target <= known:
                    # Nothing new: say so, so the subscriber's lease runs on while the plane is reachable.
                    yield pb.WatchSnapshotsResponse(target_revision=target, sent_at=_stamp(self.clock()))
                    continue
                status.target_revision = target
                yield self._push(target, known)
                known = target
        finally:
            # A reconnecting subscriber may open its new stream before the old one ends.
            self._streams[request.subscriber_id] -= 1
            if not self._streams[request.subscriber_id]:
                del self._streams[request.subscriber_id]
                status.watching = False

    def _start_ticking(self) -> None:
        """One timer for every stream's keepalive, instead of a timeout around every wait."""
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            if not self._streams:
                return  # the next stream starts it again
            async with self._changed:
                self._ticks += 1
                self._changed.notify_all()

    def _push(self, revision: int, base: int = 0) -> Encoded:
        """The push of ``revision`` to a watcher running ``base`` (0: none): a delta when worth it."""
        if base and self.deltas:
            delta = self._delta_push(base, revision)
            if delta is not None:
                return delta
        message = self._pushes.get(revision)
        if message is None:
            message = self._encode_push(revision, self.store.snapshot(revision))
        return message

    def _encode_push(self, revision: int, signed: pb.SignedSnapshot) -> Encoded:
        """Encode a revision's push once, for every watcher (and before they wake, right after a publish)."""
        message = Encoded(pb.WatchSnapshotsResponse(snapshot=signed, target_revision=revision,
                                                    sent_at=_stamp(self.clock())).SerializeToString())
        self._content_digests = {revision: pb.Snapshot.FromString(signed.snapshot).content_digest.value.hex()}
        _remember(self._pushes, revision, message)
        return message

    def _snapshot(self, revision: int) -> tuple[pb.SignedSnapshot, list[int]] | None:
        """A recent revision's snapshot and element bounds; None if the store does not have it."""
        known = self._snapshots.get(revision)
        if known is None:
            try:
                signed = self.store.snapshot(revision)
                known = (signed, element_bounds(signed.content))
            except (PlanesError, ValueError):
                return None
            _remember(self._snapshots, revision, known)
        return known

    def _delta_push(self, base: int, revision: int) -> Encoded | None:
        """``revision`` as runs over ``base``'s content, built once per pair; None when not worth it."""
        key = (base, revision)
        if key in self._delta_pushes:
            return self._delta_pushes[key]
        message = None
        old, new = self._snapshot(base), self._snapshot(revision)
        if old is not None and new is not None:
            (base_signed, base_bounds), (signed, bounds) = old, new
            header = pb.SignedSnapshot(snapshot=signed.snapshot, signature=signed.signature, key_id=signed.key_id)
            delta = pb.SnapshotDelta(base_revision=base, snapshot=header,
                                     runs=make_runs(base_signed.content, base_bounds, signed.content, bounds))
            encoded = pb.WatchSnapshotsResponse(delta=delta, target_revision=revision,
                                                sent_at=_stamp(self.clock())).SerializeToString()
            if 2 * len(encoded) < len(signed.content):
                message = Encoded(encoded)
        _remember(self._delta_pushes, key, message, keep=16)
        return message

    async def report_status(self, request: pb.ReportStatusRequest, call: CallContext) -> pb.ReportStatusResponse:
        status = self._subscriber(call, request.subscriber_id)
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
        status.target_revision = self.target_for(request.subscriber_id)
        # Kept before the rollout reacts: a restart then still sees this report.
        self._save_status(status)
        rollout = self._active_rollout()
        if rollout is not None and request.subscriber_id in rollout.canary_subscribers:
            reason = self._canary_failure(rollout, status)
            if reason and self.clock() <= self._window_ends(rollout):
                await self._roll_back_safely(rollout, call, pb.ROLLOUT_STATE_ROLLED_BACK, reason)
        target = self.target_for(request.subscriber_id)
        status.target_revision = target
        return pb.ReportStatusResponse(target_revision=target)

    @staticmethod
    def _canary_failure(rollout: pb.Rollout, status: pb.SubscriberStatus) -> str:
        """Why this canary's last report fails the rollout, or ""."""
        if status.last_outcome == pb.APPLY_OUTCOME_NACK and status.last_outcome_revision == rollout.revision:
            return (f"canary {status.subscriber_id} NACKed revision {rollout.revision}: "
                    f"{pb.NackReason.Name(status.nack_reason)}")
        if (status.health.state == common_pb2.HealthSummary.STATE_UNHEALTHY
                and _seconds(status.last_seen) >= _seconds(rollout.started_at)):
            return f"canary {status.subscriber_id} reported unhealthy"
        return ""

    @staticmethod
    def _window_ends(rollout: pb.Rollout) -> float:
        return _seconds(rollout.started_at) + _seconds(rollout.window)

    # -- rollouts -----------------------------------------------------------------

    async def get_rollout_status(self, request: pb.GetRolloutStatusRequest, call: CallContext) -> pb.GetRolloutStatusResponse:
        response = pb.GetRolloutStatusResponse(fleet_revision=self._fleet_revision)
        if request.rollout_id:
            if request.rollout_id not in self.rollouts:
                raise NotFound(f"rollout {request.rollout_id!r} not found")
            response.rollout.CopyFrom(self.rollouts[request.rollout_id])
        elif self.rollouts:
            latest = self._active_rollout() or max(self.rollouts.values(), key=lambda r: _seconds(r.started_at))
            response.rollout.CopyFrom(latest)
        response.subscribers.extend(self.subscribers[s] for s in sorted(self.subscribers))
        return response

    async def start_rollout(self, request: pb.StartRolloutRequest, call: CallContext) -> pb.StartRolloutResponse:
        self._all_tenants(call, "a rollout")
        async with self._publishing:
            if self._active_rollout() is not None:
                raise FailedPrecondition(f"rollout {self._active_rollout().rollout_id} is still in its canary "
                                         "stage; promote or abort it first")
            if request.revision <= self._fleet_revision:
                raise InvalidArgument(f"revision {request.revision} is not newer than the fleet's "
                                      f"{self._fleet_revision}")
            self.store.snapshot(request.revision)
            cohort = request.cohort
            if cohort.subscriber_ids:
                canaries = sorted(set(cohort.subscriber_ids))
            elif 0 < cohort.fraction <= 1:
                # Those watching now (a host known only from before a restart may be gone), hosts that run
                # tasks first: a canary should exercise what the configuration is mostly about.
                def runs_tasks_first(subscriber: str) -> tuple[bool, str]:
                    reported = self.subscribers[subscriber].contract_versions
                    return (not any(c.plane == "execution" for c in reported), subscriber)

                known = sorted((s for s, status in self.subscribers.items() if status.watching),
                               key=runs_tasks_first) or sorted(self.subscribers, key=runs_tasks_first)
                canaries = known[:max(1, math.ceil(cohort.fraction * len(known)))] if known else []
            else:
                raise InvalidArgument("a canary cohort needs subscriber_ids or a fraction in (0, 1]")
            if not canaries:
                raise FailedPrecondition("no subscribers to make canaries of")
            now = self.clock()
            rollout = pb.Rollout(rollout_id=os.urandom(8).hex(), revision=request.revision,
                                 base_revision=self._fleet_revision, cohort=cohort, canary_subscribers=canaries,
                                 window=duration_pb2.Duration(seconds=int(_duration(request.window, 300))),
                                 state=pb.ROLLOUT_STATE_CANARY, started_at=_stamp(now),
                                 started_by=call.identity.principal, updated_at=_stamp(now))
            self._writable("starting a rollout")
            intent = await self._record(call, ALL_TENANTS, "rollout.started", rollout_id=rollout.rollout_id,
                                        revision=request.revision, base_revision=rollout.base_revision,
                                        canaries=",".join(canaries))
            marked = []
            for subscriber in canaries:
                status = pb.SubscriberStatus()
                status.CopyFrom(self._status(subscriber))
                status.canary = True
                marked.append(status)
            async with self._committing(call, ALL_TENANTS, intent):
                with self.store.transaction():
                    self.store.save_rollout(rollout)
                    for status in marked:
                        self._save_status(status)
            for status in marked:  # in memory only once stored
                self.subscribers[status.subscriber_id].canary = True
            self.rollouts[rollout.rollout_id] = rollout
            self._active = rollout
            self._arm_deadline()
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
        async with self._publishing:
            rollout = self._rollout(request.rollout_id)
            if rollout.revision <= self._fleet_revision:
                # The fleet never goes back to older content. Only a store written before publishes
                # were refused during a canary holds such a rollout; aborting it keeps the fleet's.
                raise FailedPrecondition(
                    f"promoting rollout {rollout.rollout_id} would move the fleet from revision "
                    f"{self._fleet_revision} back to {rollout.revision}; abort the rollout instead")
            self._writable("promoting")
            intent = await self._record(call, ALL_TENANTS, "rollout.promoted", rollout_id=rollout.rollout_id,
                                        revision=rollout.revision)
            promoted = pb.Rollout()
            promoted.CopyFrom(rollout)
            promoted.state = pb.ROLLOUT_STATE_PROMOTED
            promoted.updated_at.CopyFrom(_stamp(self.clock()))
            async with self._committing(call, ALL_TENANTS, intent):
                with self.store.transaction():
                    self.store.save_rollout(promoted)
                    self.store.set_counter("fleet", promoted.revision)
                    cleared = self._clear_canaries(promoted)
            self._cleared(cleared)
            rollout.CopyFrom(promoted)
            self._arm_deadline()
            await self._target_fleet(rollout.revision)
        return pb.PromoteRolloutResponse(rollout=rollout)

    async def abort_rollout(self, request: pb.AbortRolloutRequest, call: CallContext) -> pb.AbortRolloutResponse:
        self._all_tenants(call, "aborting a rollout")
        rollout = self._rollout(request.rollout_id)
        await self._roll_back(rollout, call, pb.ROLLOUT_STATE_ABORTED, request.reason or "aborted")
        return pb.AbortRolloutResponse(rollout=rollout)

    async def _roll_back(self, rollout: pb.Rollout, call: CallContext, state: int, reason: str) -> None:
        """Canaries may already run the new revision and refuse older ones: republish the base as a new one.

        The new revision, the fleet's target and the rollout's state commit
        together, after the evidence record.
        """
        async with self._publishing:
            if rollout.state != pb.ROLLOUT_STATE_CANARY:
                return  # another report (or the deadline) got there first
            latest = self.store.latest_revision()
            self._can_publish(latest)
            # What the fleet runs: the base, unless a store written before publishes were refused
            # during a canary moved the fleet past it; the canaries must not go back further.
            source = max(rollout.base_revision, self._fleet_revision)
            if source:
                signed = self.store.prepare_rollback(self.key, source, expected_revision=latest,
                                                     actor=call.identity.principal,
                                                     message=f"rollout {rollout.rollout_id}: back to the content "
                                                             f"of revision {source}")
            else:  # the fleet ran nothing before the canary: back to no configuration at all
                signed = self.store.prepare_snapshot(self.key, expected_revision=latest,
                                                     actor=call.identity.principal, content=b"",
                                                     message=f"rollout {rollout.rollout_id}: back to no "
                                                             "configuration (the fleet ran none before)")
            intent = await self._record(call, ALL_TENANTS, "rollout.rolled_back"
                                        if state == pb.ROLLOUT_STATE_ROLLED_BACK else "rollout.aborted", rollout_id=rollout.rollout_id, revision=rollout.revision,
                               base_revision=rollout.base_revision, rollback_revision=latest + 1, reason=reason,
                               **self._digests(latest, signed))
            ended = pb.Rollout()
            ended.CopyFrom(rollout)
            ended.state = state
            ended.reason = reason
            ended.rollback_revision = latest + 1
            ended.updated_at.CopyFrom(_stamp(self.clock()))
            async with self._committing(call, ALL_TENANTS, intent):
                with self.store.transaction():
                    self.store.commit_snapshot(signed)
                    self.store.set_counter("fleet", ended.rollback_revision)
                    self.store.save_rollout(ended)
                    cleared = self._clear_canaries(ended)
            self._cleared(cleared)
            rollout.CopyFrom(ended)
            self._encode_push(ended.rollback_revision, signed)
            self._arm_deadline()
            await self._target_fleet(ended.rollback_revision)
            self._checkpoint_soon()

    async def _roll_back_safely(self, rollout: pb.Rollout, call: CallContext, state: int, reason: str) -> bool:
        """An automatic rollback: when it cannot happen now (evidence down, store read-only, no key)
        the rollout stays in canary and the report that triggered it still succeeds; the window's
        deadline, the next failing report or the next start tries again."""
        try:
            await self._roll_back(rollout, call, state, reason)
            return True
        except PlanesError as exc:
            log.warning("automatic rollback of rollout %s deferred: %s", rollout.rollout_id, exc.message)
            return False

    def _clear_canaries(self, rollout: pb.Rollout) -> list[pb.SubscriberStatus]:
        """Store the canaries' statuses as no longer canaries; the caller applies them in memory once
        committed (:meth:`_cleared`), so a commit that fails leaves the canaries shown as they are."""
        cleared = []
        for subscriber in rollout.canary_subscribers:
            if subscriber in self.subscribers:
                status = pb.SubscriberStatus()
                status.CopyFrom(self.subscribers[subscriber])
                status.canary = False
                self._save_status(status)
                cleared.append(status)
        return cleared

    def _cleared(self, cleared: list[pb.SubscriberStatus]) -> None:
        for status in cleared:
            if status.subscriber_id in self.subscribers:
                self.subscribers[status.subscriber_id].canary = False

    # -- resuming and the window's deadline ------------------------------------------------

    async def start(self) -> None:
        """Resume the rollout in canary, if any: judge what happened while the plane was down."""
        await self._check_rollout()

    async def stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)

    def _arm_deadline(self, now: float | None = None) -> None:
        """Wake up when the canary window of the rollout in progress ends (``now``: as judged by the caller)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        rollout = self._active_rollout()
        if rollout is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet: start() arms it
        delay = self._window_ends(rollout) - (self.clock() if now is None else now)
        if delay > 0:  # past the window, _check_rollout has judged it: it waits for a person to promote
            self._deadline = loop.call_later(delay, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        task = asyncio.get_running_loop().create_task(self._check_rollout())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check_rollout(self) -> None:
        """Roll the canary rollout back if a canary failed in the window, or, once the window has
        ended, if a canary has not confirmed (ACKed, healthy) the revision; else wait for the deadline."""
        rollout = self._active_rollout()
        if rollout is None:
            return
        window_ends = self._window_ends(rollout)
        # One reading of the clock: judged "not yet" must also be armed as "not yet".
        now = self.clock()
        reason = ""
        for subscriber in rollout.canary_subscribers:
            status = self.subscribers.get(subscriber, pb.SubscriberStatus(subscriber_id=subscriber))
            failure = self._canary_failure(rollout, status)
            if failure and _seconds(status.last_seen) <= window_ends:
                reason = failure
                break
            if now >= window_ends and not (
                    status.applied_revision >= rollout.revision
                    and status.health.state != common_pb2.HealthSummary.STATE_UNHEALTHY):
                reason = (f"canary {subscriber} did not confirm revision {rollout.revision} "
                          f"within the {_seconds(rollout.window):g} s window")
                break
        call = CallContext(CONTROL_IDENTITY)
        if reason and not await self._roll_back_safely(rollout, call, pb.ROLLOUT_STATE_ROLLED_BACK, reason):
            # Try again shortly: the rollout must not stay on a failed canary.
            self._deadline = asyncio.get_running_loop().call_later(5.0, self._deadline_passed)
            return
        if not reason:
            self._arm_deadline(now)
