"""The evidence plane's servicer: thin, over :class:`~.log.EvidenceLog`.

Every write (append, checkpoint, correction, redaction) runs on one
dedicated log thread, so SQLite commits never block the event loop and
appends are serialized without locks. Long reads must never hold that
thread, or one tenant's reviewer stalls every tenant's appends (four
exports of 278 MB once held an append for 31 s): query pages and proofs run
on a small reader pool, and exports on their own pool (one thread per
export allowed at once, :mod:`.export`). A reader only does the log's
any-thread reads (:mod:`.log`): anything that needs the log thread (picking
or signing a checkpoint, looking an event up by id) is a short step there
first, and the reader goes on from the tree size it fixed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.call import CallContext
from planes.kernel.contract import Encoded, wire_tenant
from planes.kernel.contracts.evidence import EvidencePlane

from . import export
from .export import ExportLimits, ExportSlots
from .log import EvidenceLog, checked_u64, time_range

PAGE = 500
EXPORT_CHUNK = 1024 * 1024
#: Threads for query pages and proofs (exports have their own, ExportLimits.process of them).
READ_THREADS = 2


def _tenant_and_bytes(request) -> tuple[str, bytes]:
    """An append request's tenant and its wire bytes, whichever form it came in."""
    if type(request) is Encoded:
        return wire_tenant(request.data), request.data
    return request.tenant, request.SerializeToString()


class _StreamTotals:
    """What a streamed append acknowledges, summed batch by batch (a stream's sequences are not kept)."""

    def __init__(self):
        self.appended = self.duplicates = self.last = 0
        self.head = b""

    def add(self, result) -> None:
        if result is not None and result.sequences:
            self.appended += result.appended
            self.duplicates += result.duplicates
            self.last = max(self.last, *result.sequences)
            self.head = result.chain_head

    def response(self) -> pb.AppendEventStreamResponse:
        return pb.AppendEventStreamResponse(appended=self.appended, duplicates=self.duplicates,
                                            last_sequence=self.last, chain_head=self.head)


class Evidence(EvidencePlane):
    #: Appends reach the native batch encoder as the bytes that arrived: no
    #: protobuf parse and re-serialization of a batch on the way. The kernel
    #: has checked (or filled) their tenant field already.
    wire_requests = frozenset({"append_events", "append_event_stream"})

    def __init__(self, log: EvidenceLog, export_limits: ExportLimits | None = None):
        self.log = log
        self.export_limits = export_limits or ExportLimits()
        self._exports = ExportSlots(self.export_limits)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evidence-log")
        self._readers = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="evidence-read")
        self._exporters = ThreadPoolExecutor(max_workers=self.export_limits.process,
                                             thread_name_prefix="evidence-export")

    async def _run(self, function, *args):
        """On the log thread: writes, and reads of the writer's state."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _read(self, function, *args):
        """On a reader thread: only the log's any-thread reads (:mod:`.log`)."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, function, *args)

    def close(self) -> None:
        """Wait for every thread; before the log is closed (it closes every reader's connection)."""
        self._exporters.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._thread.shutdown(wait=True)

    async def append_events(self, request: pb.AppendEventsRequest, call: CallContext) -> pb.AppendEventsResponse:
        result = await self._run(self.log.append_encoded, *_tenant_and_bytes(request), call.identity)
        return pb.AppendEventsResponse(sequences=result.sequences, chain_head=result.chain_head)

    async def append_event_stream(self, requests: AsyncIterator[pb.AppendEventStreamRequest],
                                  call: CallContext) -> pb.AppendEventStreamResponse:
        """Each batch is encoded while the one before it is stored (:class:`~.log.AppendPipeline`); the
        reply comes once every batch is durable. A failed stream leaves the batches before the failing
        one stored; the client resends the stream (stored event ids make the replays no-ops)."""
        pipeline = self.log.pipeline(call.identity)
        totals = _StreamTotals()
        async for request in requests:
            if type(request) is not Encoded and not request.events:
                continue
            totals.add(await self._run(pipeline.push, *_tenant_and_bytes(request)))
        totals.add(await self._run(pipeline.finish))
        return totals.response()

    async def query_events(self, request: pb.QueryEventsRequest, call: CallContext) -> AsyncIterator[pb.QueryEventsResponse]:
        remaining = request.limit or None
        after = checked_u64("after_sequence", request.after_sequence)
        start, end = time_range(request.start_time if request.HasField("start_time") else None,
                                request.end_time if request.HasField("end_time") else None)
        while remaining is None or remaining > 0:
            page = PAGE if remaining is None else min(PAGE, remaining)
            events = await self._read(partial(
                self.log.query, request.tenant, correlation_id=request.correlation_id,
                event_types=tuple(request.event_types), start_ns=start, end_ns=end, after_sequence=after, limit=page))
            if not events:
                return
            yield pb.QueryEventsResponse(events=events)
            after = events[-1].sequence
            if remaining is not None:
                remaining -= len(events)
            if len(events) < page:
                return

    async def get_checkpoint(self, request: pb.GetCheckpointRequest, call: CallContext) -> pb.GetCheckpointResponse:
        return pb.GetCheckpointResponse(checkpoint=await self._run(self.log.checkpoint, request.tree_size))

    async def prove_inclusion(self, request: pb.ProveInclusionRequest, call: CallContext) -> pb.ProveInclusionResponse:
        # The lookup by id and any checkpoint to sign on the log thread; the path (the first proof against a tree
        # reads and hashes every leaf) on a reader.
        target = await self._run(self.log.inclusion_target, request.tenant, request.event_id, request.tree_size)
        return await self._read(self.log.prove_inclusion_at, *target)

    async def prove_consistency(self, request: pb.ProveConsistencyRequest,
                                call: CallContext) -> pb.ProveConsistencyResponse:
        return await self._read(self.log.prove_consistency, request.first_tree_size, request.second_tree_size)

    async def correct_event(self, request: pb.CorrectEventRequest, call: CallContext) -> pb.CorrectEventResponse:
        correction = await self._run(self.log.correct, request.tenant, request.event_id, list(request.fields),
                                     request.reason, call.identity)
        return pb.CorrectEventResponse(correction=correction)

    async def redact_field(self, request: pb.RedactFieldRequest, call: CallContext) -> pb.RedactFieldResponse:
        redaction, event = await self._run(self.log.redact, request.tenant, request.event_id, request.field_name,
                                           request.reason, call.identity)
        return pb.RedactFieldResponse(redaction=redaction, event=event)

    async def export_bundle(self, request: pb.ExportBundleRequest, call: CallContext) -> AsyncIterator[pb.ExportBundleResponse]:
        """Admitted under the export caps, for as long as it is built and streamed (its memory is held that
        long); the checkpoint is picked on the log thread, the bundle built on an export thread."""
        chosen = export.selection(request)
        slot = self._exports.slot(request.tenant)
        slot.__enter__()  # LimitExceeded over the caps
        released = False

        def release(build: asyncio.Future | None = None) -> None:
            nonlocal released
            if build is not None and not build.cancelled():
                build.exception()  # a build nobody awaits any more: its error is read, not warned about
            if not released:
                released = True
                slot.__exit__(None, None, None)

        building = None
        try:
            signed = await self._run(export.choose_checkpoint, self.log, request.tree_size)
            building = asyncio.get_running_loop().run_in_executor(
                self._exporters, export.build, self.log, request.tenant, chosen, signed, self.export_limits)
            data, count, size = await asyncio.shield(building)
            for offset in range(0, len(data), EXPORT_CHUNK):
                yield pb.ExportBundleResponse(offset=offset, data=data[offset:offset + EXPORT_CHUNK])
            yield pb.ExportBundleResponse(offset=len(data), summary=pb.BundleSummary(
                event_count=count, tree_size=size,
                digest=common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256,
                                         value=hashlib.sha256(data).digest())))
        finally:
            if building is not None and not building.done():
                # The caller left mid-build, but a thread cannot be stopped: the slot stays taken until the
                # build ends, or a caller cancelling and retrying would pile builds up past the caps.
                building.add_done_callback(release)
            else:
                release()

    def _export(self, request: pb.ExportBundleRequest) -> tuple[bytes, int, int]:
        """An export on the calling thread, without admission (in-process use and tests)."""
        chosen = export.selection(request)
        signed = export.choose_checkpoint(self.log, request.tree_size)
        return export.build(self.log, request.tenant, chosen, signed, self.export_limits)
