"""The evidence plane: an append-only, verifiable record of what happened.

Events with stable correlation ids are hash-chained and checkpointed as an
RFC 6962 Merkle tree under signed checkpoints, so one event's inclusion is
provable in O(log n). Fields are committed by salted digests, so raw values
can be redacted or expire while the log still verifies; corrections and
redactions are events themselves.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from planes.evidence.v1 import evidence_service_pb2 as pb

from ..call import CallContext
from ..contract import ContractVersion, PlaneContract

__all__ = ["EvidencePlane", "pb"]


class EvidencePlane(PlaneContract):
    """Contract of ``planes.evidence.v1.EvidenceService``.

    Nothing appended ever changes. Reads are tenant-scoped, and an admin
    identity alone reads no evidence contents.
    """

    plane = "evidence"
    service = "planes.evidence.v1.EvidenceService"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def append_events(self, request: pb.AppendEventsRequest, call: CallContext) -> pb.AppendEventsResponse:
        """Append a batch of events and acknowledge it once durable.

        Called by services, workers and the other planes' evidence writers.
        Assigns sequences in order, computes missing salts and commitments,
        extends the chain, and answers only after the batch is durable. An
        event whose id is already in the log with the same content keeps its
        sequence and is not appended again, so replaying a batch is safe. The
        batch is appended whole or not at all.

        Raises:
            InvalidArgument: an event without an id or type, a tenant in an
                event's correlation other than the request's, a commitment
                that does not match its value, or one id twice in the batch
                with different content.
            AlreadyExists: an event id already in the log with different
                content (the error names the id and what differs, never a value).
            FailedPrecondition: a replay of an event whose raw value was
                redacted or pruned, which cannot be confirmed without the salt
                it was first sent with.
            LimitExceeded: too many events or bytes in one batch.
            Unavailable: the store cannot make the batch durable.
        """

    @abc.abstractmethod
    async def append_event_stream(
        self, requests: AsyncIterator[pb.AppendEventStreamRequest], call: CallContext
    ) -> pb.AppendEventStreamResponse:
        """Append a stream of batches; acknowledge them all once durable.

        Called by high-rate writers. Each batch behaves as in
        :meth:`append_events`; the response comes after the last batch is
        durable. If the stream fails, batches already durable stay appended,
        and replaying them is safe.

        Raises:
            InvalidArgument: as for :meth:`append_events`.
            LimitExceeded: a batch too large.
            Unavailable: the store cannot make a batch durable.
        """

    @abc.abstractmethod
    def query_events(
        self, request: pb.QueryEventsRequest, call: CallContext
    ) -> AsyncIterator[pb.QueryEventsResponse]:
        """Stream a tenant's matching events in sequence order, in batches.

        Called by reviewers and operators. Redacted fields come without value
        or salt; no other tenant's event is ever yielded.

        Raises:
            InvalidArgument: a time range that ends before it starts.
        """

    @abc.abstractmethod
    async def get_checkpoint(self, request: pb.GetCheckpointRequest, call: CallContext) -> pb.GetCheckpointResponse:
        """Return the latest signed checkpoint, or the one at a tree size.

        Called by verifiers and the other planes. The checkpoint bytes are
        those that were signed, never re-serialized.

        Raises:
            NotFound: no checkpoint was made at that size (or none yet).
        """

    @abc.abstractmethod
    async def prove_inclusion(
        self, request: pb.ProveInclusionRequest, call: CallContext
    ) -> pb.ProveInclusionResponse:
        """Prove that one of the tenant's events is in a checkpoint's tree.

        Called by verifiers. Returns the RFC 6962 audit path from the event's
        leaf to the root of the requested (or latest) signed checkpoint.

        Raises:
            NotFound: no such event in the tenant, or no checkpoint at that
                size.
            FailedPrecondition: the event is not yet covered by the
                checkpoint.
        """

    @abc.abstractmethod
    async def prove_consistency(
        self, request: pb.ProveConsistencyRequest, call: CallContext
    ) -> pb.ProveConsistencyResponse:
        """Prove that one checkpoint's tree is a prefix of another's.

        Called by verifiers holding an older checkpoint. Returns the RFC 6962
        consistency proof and both signed checkpoints.

        Raises:
            NotFound: no checkpoint at one of the sizes.
            InvalidArgument: the first size is larger than the second.
        """

    @abc.abstractmethod
    async def correct_event(self, request: pb.CorrectEventRequest, call: CallContext) -> pb.CorrectEventResponse:
        """Append a correction linked to the original event.

        Called by services and reviewers. The original never changes; the
        correction is a new ``correction`` event naming it, with the corrected
        fields, the reason and the caller, durable before the response.

        Raises:
            NotFound: no such event in the tenant.
            InvalidArgument: no fields, or no reason.
        """

    @abc.abstractmethod
    async def redact_field(self, request: pb.RedactFieldRequest, call: CallContext) -> pb.RedactFieldResponse:
        """Remove one field's raw value and salt, keeping its commitment.

        Called by reviewers. Appends a ``redaction`` event recording who (the
        caller) and why before removing the value, so the chain and every
        proof still verify. Redacting a redacted field returns the earlier
        redaction.

        Raises:
            NotFound: no such event in the tenant, or no such field.
            InvalidArgument: no reason.
        """

    @abc.abstractmethod
    def export_bundle(
        self, request: pb.ExportBundleRequest, call: CallContext
    ) -> AsyncIterator[pb.ExportBundleResponse]:
        """Stream a self-contained, offline-verifiable bundle in chunks.

        Called by reviewers (``planes evidence export``). The bundle holds the
        tenant's selected events with redactions applied, their inclusion
        proofs against one signed checkpoint, that checkpoint and the public
        key; ``planes evidence verify`` checks it with no server. The last
        message carries the summary and the bundle's digest.

        Raises:
            InvalidArgument: neither a correlation id nor a time range.
            NotFound: no checkpoint at the requested size.
        """
