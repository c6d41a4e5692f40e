"""The control plane: desired state, signed snapshots and staged rollouts.

Admins edit resources under optimistic concurrency; publishing cuts an
immutable, signed snapshot of all of them under a monotonic revision.
Execution hosts and workers watch snapshots, verify and apply them, and report
ACK or NACK with health and capacity; rollouts stage a revision through a
canary cohort before the whole fleet.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from planes.control.v1 import control_service_pb2 as pb

from ..call import CallContext
from ..contract import ContractVersion, PlaneContract

__all__ = ["ControlPlane", "pb"]


class ControlPlane(PlaneContract):
    """Contract of ``planes.control.v1.ControlService``.

    Every mutation (resource writes, publishes, rollbacks, rollout steps) is
    recorded as an evidence event naming who did it and the digests before and
    after. While the store is read-only or the signing key is unavailable,
    mutations raise :class:`~planes.kernel.errors.Unavailable` and reads keep
    working.
    """

    plane = "control"
    service = "planes.control.v1.ControlService"
    version = ContractVersion(1, 0)

    # -- resources -----------------------------------------------------------

    @abc.abstractmethod
    async def put_resource(self, request: pb.PutResourceRequest, call: CallContext) -> pb.PutResourceResponse:
        """Create or replace one resource, conditional on its expected version.

        Called by admins (``planes config apply``). Validates the spec against
        its kind's schema, writes it with a resource version one higher than
        before, and records the mutation in evidence before answering. The
        kernel keeps a tenant admin inside its tenant; global resources
        (tenant ``"*"``) thus need an identity acting for every tenant.

        Raises:
            InvalidArgument: the spec fails its kind's schema; the message
                names the field and what is expected.
            AlreadyExists: ``expected_resource_version`` is 0 and the resource
                exists.
            Conflict: ``expected_resource_version`` is not the current one.
            Unavailable: the store is read-only or the signing key missing.
        """

    @abc.abstractmethod
    async def get_resource(self, request: pb.GetResourceRequest, call: CallContext) -> pb.GetResourceResponse:
        """Return one resource of the current, unpublished desired state.

        Called by admins and the CLI before a conditional write.

        Raises:
            NotFound: no resource with this kind, tenant and name.
        """

    @abc.abstractmethod
    async def list_resources(
        self, request: pb.ListResourcesRequest, call: CallContext
    ) -> pb.ListResourcesResponse:
        """List resources of the current desired state, one page at a time.

        Called by admins (``planes config list``). Resources come ordered by
        kind, tenant and name; tenant ``"*"`` lists every tenant's.

        Raises:
            InvalidArgument: a malformed page token.
        """

    @abc.abstractmethod
    async def delete_resource(
        self, request: pb.DeleteResourceRequest, call: CallContext
    ) -> pb.DeleteResourceResponse:
        """Delete one resource, conditional on its expected version.

        Called by admins. Returns the resource as it was, and records the
        deletion in evidence before answering. Published snapshots that hold
        the resource are unchanged.

        Raises:
            NotFound: no such resource.
            Conflict: ``expected_resource_version`` is not the current one.
            FailedPrecondition: other resources still refer to it.
            Unavailable: the store is read-only or the signing key missing.
        """

    # -- snapshots -----------------------------------------------------------

    @abc.abstractmethod
    async def publish_snapshot(
        self, request: pb.PublishSnapshotRequest, call: CallContext
    ) -> pb.PublishSnapshotResponse:
        """Cut a signed snapshot of all resources under the next revision.

        Called by an admin acting for every tenant (``planes config publish``).
        Serializes the content once, signs the header with Ed25519, stores
        both immutably, and, unless ``staged``, targets every subscriber at
        the new revision, which watchers receive at once. The revision never
        repeats or goes back.

        Raises:
            Conflict: ``expected_revision`` is not the latest published one.
            InvalidArgument: a validity window or lease that is empty or
                negative.
            PermissionDenied: the caller acts for one tenant only.
            Unavailable: the store is read-only or the signing key missing.
        """

    @abc.abstractmethod
    async def list_snapshots(
        self, request: pb.ListSnapshotsRequest, call: CallContext
    ) -> pb.ListSnapshotsResponse:
        """List published snapshot headers, newest first.

        Called by admins and operators (``planes config history``). Headers
        only, never content.

        Raises:
            InvalidArgument: a malformed page token.
        """

    @abc.abstractmethod
    async def get_snapshot(self, request: pb.GetSnapshotRequest, call: CallContext) -> pb.GetSnapshotResponse:
        """Return one signed snapshot with its content, exactly as published.

        Called by subscribers fetching a revision outside a watch (at start-up)
        and by admins. The bytes are those that were signed, never
        re-serialized.

        Raises:
            NotFound: no snapshot has this revision (or none is published).
        """

    @abc.abstractmethod
    async def rollback_snapshot(
        self, request: pb.RollbackSnapshotRequest, call: CallContext
    ) -> pb.RollbackSnapshotResponse:
        """Publish a new revision whose content is that of an older one.

        Called by an admin acting for every tenant (``planes config
        rollback``). The new snapshot records ``source_revision`` and targets
        every subscriber; subscribers accept it because its revision is newer.

        Raises:
            NotFound: ``to_revision`` was never published.
            Conflict: ``expected_revision`` is not the latest published one.
            PermissionDenied: the caller acts for one tenant only.
            Unavailable: the store is read-only or the signing key missing.
        """

    @abc.abstractmethod
    async def diff_snapshots(
        self, request: pb.DiffSnapshotsRequest, call: CallContext
    ) -> pb.DiffSnapshotsResponse:
        """Compare the resources of two revisions, or a revision and the draft.

        Called by admins and operators (``planes config diff``), typically
        before publishing. Only resources of the requested tenant are compared.

        Raises:
            NotFound: a revision that was never published.
        """

    # -- distribution --------------------------------------------------------

    @abc.abstractmethod
    def watch_snapshots(
        self, request: pb.WatchSnapshotsRequest, call: CallContext
    ) -> AsyncIterator[pb.WatchSnapshotsResponse]:
        """Stream the snapshots a subscriber should run, then keepalives.

        Called by each execution host and worker for as long as it runs.
        Yields the subscriber's target snapshot first when it is newer than
        ``known_revision``, then every new target as it is published or
        rolled out, and keepalives in between so the subscriber can tell the
        control plane is reachable. Never yields a revision older than one
        already sent on the stream.

        Raises:
            InvalidArgument: an empty subscriber id.
        """

    @abc.abstractmethod
    async def report_status(
        self, request: pb.ReportStatusRequest, call: CallContext
    ) -> pb.ReportStatusResponse:
        """Record a subscriber's ACK, NACK or periodic health report.

        Called by subscribers after each verification and periodically.
        Updates the status view; a NACK or an unhealthy report from a canary
        within its rollout window rolls the rollout back before answering.
        ACKs and NACKs are recorded in evidence.

        Raises:
            InvalidArgument: an empty subscriber id, or an ACK or NACK
                without its revision.
        """

    # -- rollouts ------------------------------------------------------------

    @abc.abstractmethod
    async def get_rollout_status(
        self, request: pb.GetRolloutStatusRequest, call: CallContext
    ) -> pb.GetRolloutStatusResponse:
        """Show a rollout and which subscriber runs which revision.

        Called by operators and admins; the status view of every subscriber
        known to the control plane comes with it.

        Raises:
            NotFound: ``rollout_id`` names no rollout.
        """

    @abc.abstractmethod
    async def start_rollout(self, request: pb.StartRolloutRequest, call: CallContext) -> pb.StartRolloutResponse:
        """Target a published revision at a canary cohort for a window.

        Called by an admin acting for every tenant, usually after a staged
        publish. Resolves a fractional cohort to named subscribers among those
        watching, retargets only them, and records the step in evidence.

        Raises:
            NotFound: the revision was never published.
            InvalidArgument: a cohort with neither or both of names and a
                fraction, a fraction outside (0, 1], or a non-positive window.
            FailedPrecondition: another rollout is in progress, or the
                revision is not newer than the fleet's.
            Unavailable: the store is read-only.
        """

    @abc.abstractmethod
    async def promote_rollout(
        self, request: pb.PromoteRolloutRequest, call: CallContext
    ) -> pb.PromoteRolloutResponse:
        """Target every subscriber at the rollout's revision.

        Called by an admin once the canaries look healthy. Records the step
        in evidence.

        Raises:
            NotFound: no such rollout.
            FailedPrecondition: the rollout is not in its canary state.
            Unavailable: the store is read-only.
        """

    @abc.abstractmethod
    async def abort_rollout(self, request: pb.AbortRolloutRequest, call: CallContext) -> pb.AbortRolloutResponse:
        """Stop a rollout and return its cohort to the base revision's content.

        Called by admins and operators. Since subscribers refuse older
        revisions, publishes a new revision carrying the base content and
        targets the cohort with it; records the step and the reason in
        evidence.

        Raises:
            NotFound: no such rollout.
            FailedPrecondition: the rollout already ended.
            Unavailable: the store is read-only or the signing key missing.
        """
