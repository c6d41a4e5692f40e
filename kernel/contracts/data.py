"""The data plane: classified payloads streamed in chunks, with egress control.

Payloads (tensors, Arrow IPC, files, blobs) are put and got as chunk streams
whose sizes, offsets and digests are checked as they arrive; each carries
classification, tenant and correlation metadata. Egress to tools, model routes
and sinks follows the classification's rules, and a payload that does not
match its declaration is quarantined, never served.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from planes.data.v1 import data_service_pb2 as pb

from ..call import CallContext
from ..contract import ContractVersion, PlaneContract

__all__ = ["DataPlane", "pb"]


class DataPlane(PlaneContract):
    """Contract of ``planes.data.v1.DataService``.

    Errors, logs and evidence name payloads by id, size and digest, never by
    their bytes. Reads are authorized per tenant, independently of control-plane
    administration: an admin identity alone reads nothing.
    """

    plane = "data"
    service = "planes.data.v1.DataService"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def put_payload(
        self, requests: AsyncIterator[pb.PutPayloadRequest], call: CallContext
    ) -> pb.PutPayloadResponse:
        """Store a payload from a header followed by its chunks.

        Called by services and workers. The tenant sits in the header, not at
        the top of each message, so the kernel cannot scope this stream: the
        plane checks ``header.tenant`` against the caller itself. Limits (chunk
        size, declared size against the tenant's and the classification's
        limit, chunk count) are checked before anything is allocated, and
        offsets must be contiguous. When the stream ends, a size, chunk count
        or digest that differs from the declaration quarantines the payload
        and raises; otherwise the payload is durable (encrypted at rest when
        confidential or restricted) before the response. A producer faster
        than storage waits; in-flight bytes stay bounded per stream and
        tenant.

        Raises:
            InvalidArgument: no header first, a second header, a gap, overlap
                or overrun in offsets, or a mismatch with the declaration (the
                message names the quarantined payload id).
            PermissionDenied: ``header.tenant`` is not the caller's.
            LimitExceeded: a chunk, the declared size or the chunk count over
                its limit, or the tenant's byte quota (with a retry delay).
        """

    @abc.abstractmethod
    def get_payload(self, request: pb.GetPayloadRequest, call: CallContext) -> AsyncIterator[pb.GetPayloadResponse]:
        """Stream a payload: its info first, then its chunks in order.

        Called by services and workers. Every check happens before the first
        message: a payload is served whole or not at all, never partially and
        never invented.

        Raises:
            NotFound: the payload is missing, deleted or expired (the message
                names the reference).
            FailedPrecondition: the payload is older than ``max_age``, its
                digest is not ``expected_digest``, or it is quarantined.
            PermissionDenied: a worker credential not scoped to this payload.
        """

    @abc.abstractmethod
    async def stat_payload(self, request: pb.StatPayloadRequest, call: CallContext) -> pb.StatPayloadResponse:
        """Return a payload's metadata, never its bytes.

        Called by services, workers and operators. Also answers for
        quarantined, deleted and expired payloads the plane still remembers,
        with their state.

        Raises:
            NotFound: no such payload in the tenant.
        """

    @abc.abstractmethod
    async def delete_payload(self, request: pb.DeletePayloadRequest, call: CallContext) -> pb.DeletePayloadResponse:
        """Delete a payload; later reads fail with NotFound naming it.

        Called by services and operators. The bytes (and, for encrypted
        payloads, the data key) are gone before the response; the deletion is
        recorded in evidence. Deleting a deleted payload returns it unchanged.

        Raises:
            NotFound: no such payload in the tenant.
        """

    @abc.abstractmethod
    async def transfer_payload(
        self, request: pb.TransferPayloadRequest, call: CallContext
    ) -> pb.TransferPayloadResponse:
        """Decide whether a payload may go to a destination, and record it.

        Called by services and workers before handing a payload to a tool, a
        model route or a sink. Checks the classification egress rules (from
        the control plane's snapshot, or settings until it provides them) and
        records ``data.transferred`` or ``data.denied``. A denial is returned
        with its reason, not raised: the caller hands the payload over only
        when ``allowed`` is true.

        Raises:
            NotFound: no such payload, or an unknown destination.
            FailedPrecondition: the payload is quarantined.
            Unavailable: the egress rules cannot be read (the plane denies
                rather than guesses).
        """

    @abc.abstractmethod
    async def list_quarantine(
        self, request: pb.ListQuarantineRequest, call: CallContext
    ) -> pb.ListQuarantineResponse:
        """List quarantined payloads with what was declared and what arrived.

        Called by operators. Metadata only; tenant ``"*"`` lists every
        tenant's.

        Raises:
            InvalidArgument: a malformed page token.
        """

    @abc.abstractmethod
    async def release_quarantine(
        self, request: pb.ReleaseQuarantineRequest, call: CallContext
    ) -> pb.ReleaseQuarantineResponse:
        """Release a quarantined payload with the size and digest that arrived.

        Called by operators who judged the payload sound. Recorded in evidence
        with the reason.

        Raises:
            NotFound: no such payload in quarantine.
        """

    @abc.abstractmethod
    async def delete_quarantined(
        self, request: pb.DeleteQuarantinedRequest, call: CallContext
    ) -> pb.DeleteQuarantinedResponse:
        """Delete a quarantined payload for good.

        Called by operators. Recorded in evidence with the reason.

        Raises:
            NotFound: no such payload in quarantine.
        """
