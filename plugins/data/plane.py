"""The data plane: puts and gets of classified payloads, egress decisions and quarantine.

Put runs as a pipeline: the event loop reads a chunk message, checks it with
the native codec (limits before anything is allocated; the data stays a
zero-copy slice of the received bytes) and hands it to the stream's two
lanes, threads that take every chunk in order: one hashes it, the other
encrypts it when the class asks for it and writes it to disk, while the loop
reads the next one. Memory stays bounded twice over: at most
``stream_inflight_bytes`` per stream and ``tenant_inflight_bytes`` per
tenant are received and not yet through both lanes; beyond that the loop
stops reading, so gRPC flow control makes the producer wait.

Puts in progress are bounded too (settings in :mod:`.limits`): at most
``max_concurrent_puts`` (16) per tenant and ``max_concurrent_puts_total``
(256) in the process; one more is refused after its header, before it has a
file or a thread, with ``LimitExceeded`` (RESOURCE_EXHAUSTED, retry after
1 s). The lanes start with the first chunk, so a put stalled after its header
holds no thread; and a producer that sends nothing for ``put_idle_seconds``
(30) while the plane waits on it, header included, is aborted with
``DeadlineExceeded`` naming the payload and the idle time (time the plane
spends waiting on its own budgets does not count).

Quarantine is for bytes that arrived and do not match what was declared. A
put that ends with nothing to keep is *abandoned* instead: idle past
``put_idle_seconds``, cancelled by its client, or ended before any chunk of a
non-empty payload. Its partial file is removed, its budgets and slot come
back, no payload row is made, and a ``data.abandoned`` evidence event
(payload id, declared size, bytes and chunks received, reason) records the
attempt. A cancelled put whose request stream merely ends (gRPC often reports
a cancellation that way) after some chunks is abandoned too when the
cancellation arrives before its bytes are all stored; if it arrives only
after, the put cannot be told from a short one and is quarantined as a size
mismatch.

Where the digest is computed, and why: once, at ingest, on the hashing lane
(it releases the GIL, so it runs beside the receiving loop and the storing
lane); the result is stored in the payload's info. The content digest is
BLAKE3 by default (``DataClient``), SHA-256 on request: on this machine's CPU
(no SHA extensions) SHA-256 runs at 0.39 GB/s, a third of what loopback gRPC
carries, while BLAKE3 runs at 4.6 GB/s on one core, so only BLAKE3 lets a put
check its digest at close to stream speed (bench/RESULTS.md). Get does not hash: the info carries the content digest for a reader that
wants to check it (``DataClient.get(verify=True)``), chunk digests are sent
only on request, and the transport protects the stream (TLS off loopback). An
encrypted payload is authenticated on every read by its AES-GCM tags.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable


from google.protobuf.timestamp_pb2 import Timestamp

from planes.common.v1 import common_pb2
from planes.kernel import errors
from planes.kernel.call import CallContext
from planes.kernel.contract import Encoded
from planes.kernel.contracts.data import DataPlane, pb
from planes.kernel.digests import HASHES, NAMES, SHA256
from planes.kernel.identity import ALL_TENANTS
from planes.native import load
from planes.plugins.evidence.writer import call_event

from .limits import DESTINATION_KINDS, ENCRYPTED, ByteBudget, DataSettings, classification_name
from .store import ObjectWriter, PayloadStore, StoredPayload

__all__ = ["Data"]

log = logging.getLogger("planes.plugins.data")

#: The compiled codec, or its pure-Python twin under ``PLANES_NO_EXTENSIONS``.
codec = load("codec")

_ID = re.compile(r"pl_[0-9a-f]{32}")
_HEADER_TAG, _CHUNK_TAG, _TRAILER_TAG = 0x0A, 0x12, 0x1A
#: The latest expiry the catalogue holds: nanoseconds in a signed 64-bit column (2262-04-11).
_LAST_EXPIRY_NS = (1 << 63) - 1


def _timestamp(ns: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _short(digest: bytes) -> str:
    return digest.hex()[:16] if digest else "none"


class _Lane(threading.Thread):
    """One thread taking a put's chunks in order and doing one half of the writer's work on each.

    Chunks come through a ``SimpleQueue`` (no future or callback per chunk,
    as ``run_in_executor`` makes); ``done`` counts the bytes finished, and the
    lane tells the loop through ``progressed``, which coalesces. Calls queued
    behind the chunks (finish, commit, discard) run in order after them.
    """

    def __init__(self, name: str, work: Callable, progressed: Callable[[], None],
                 loop: asyncio.AbstractEventLoop):
        super().__init__(name=name, daemon=True)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.done = 0
        self.failure: BaseException | None = None
        self.bad_chunk: int | None = None
        #: Set when the put is abandoned: chunks still queued are dropped, not written.
        self.skip = False
        self._work, self._progressed, self._loop = work, progressed, loop

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if len(item) == 4:
                data, digest, size, index = item
                if self.failure is None and not self.skip:
                    try:
                        if self._work(data, digest) is False and self.bad_chunk is None:
                            self.bad_chunk = index
                    except BaseException as exc:  # handed to the loop, which raises it
                        self.failure = exc
                del data, item
                self.done += size
                self._progressed()
                continue
            function, args, future = item
            try:
                result, failure = function(*args), None
            except BaseException as exc:
                result, failure = None, exc
            self._loop.call_soon_threadsafe(_resolve, future, result, failure)


def _resolve(future: asyncio.Future, result, failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


class _Ingest:
    """One put's state: offsets and counts checked on the loop, bytes hashed and written on two threads.

    Hashing (BLAKE3, about 60 ms per 256 MiB here) and staging for direct
    I/O (about 50 ms) each run on a lane of their own, so with the event
    loop waiting they use both cores instead of one; each chunk is handed
    to both, and counts as settled (its bytes released from the stream's
    and the tenant's budgets) once both are done with it.
    """

    def __init__(self, plane: Data, header: pb.PayloadHeader, writer: ObjectWriter):
        self.plane = plane
        self.header = header
        self.writer = writer
        self.received = 0
        self.chunks = 0
        self.trailer_digest: common_pb2.Digest | None = None
        self._loop = asyncio.get_running_loop()
        self._budget = plane.tenant_budget(header.tenant)
        #: (bytes queued up to the end of a chunk, bytes granted by the tenant budget for it)
        self._grants: deque[tuple[int, int]] = deque()
        self._waiter: asyncio.Future | None = None
        self._notified = False
        self._hashing = _Lane("data-put-hash", writer.update_digest, self._progressed, self._loop)
        self._storing = _Lane("data-put-store", _appender(writer), self._progressed, self._loop)
        self._lanes = (self._hashing, self._storing)
        #: The lanes start with the first chunk: a put that stalls after its header holds no thread.
        self._started = False

    def _start(self) -> None:
        self._started = True
        for lane in self._lanes:
            lane.start()

    @property
    def bad_chunk(self) -> int | None:
        return self._hashing.bad_chunk

    def _settled(self) -> int:
        return min(self._hashing.done, self._storing.done)

    def _progressed(self) -> None:
        """On a lane's thread, after each chunk: wake the loop, once per batch of chunks."""
        if not self._notified:
            self._notified = True
            self._loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        self._notified = False  # before reading the counts: a later chunk notifies again
        settled = self._settled()
        while self._grants and self._grants[0][0] <= settled:
            self._budget.release(self._grants.popleft()[1])
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _raise_failure(self) -> None:
        for lane in self._lanes:
            if lane.failure is not None:
                raise lane.failure

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        self._raise_failure()

    async def chunk(self, offset: int, data, digest: bytes) -> None:
        settings = self.plane.settings
        size = len(data)
        index = self.chunks
        if self.trailer_digest is not None:
            raise errors.InvalidArgument(f"chunk {index} arrived after the trailer")
        if index + 1 > settings.max_chunks:
            raise errors.LimitExceeded("chunk count", settings.max_chunks, index + 1)
        if size > settings.max_chunk_bytes:
            raise errors.LimitExceeded("chunk size", settings.max_chunk_bytes, size)
        if offset != self.received:
            problem = "overlaps" if offset < self.received else "leaves a gap after"
            raise errors.InvalidArgument(f"chunk {index} at offset {offset} {problem} the {self.received} bytes "
                                         "already received")
        if self.received + size > self.header.declared_size:
            raise errors.LimitExceeded("payload size", self.header.declared_size, self.received + size,
                                       message=f"chunk {index} runs past the declared size: "
                                               f"{self.received + size} > {self.header.declared_size}")
        self._raise_failure()
        # Per stream: wait for older chunks while this stream holds too much.
        while self.received > self._settled() and \
                self.received - self._settled() + size > settings.stream_inflight_bytes:
            await self._wait()
        granted = await self._budget.acquire(size)
        if not self._started:
            self._start()
        self.received += size
        self.chunks += 1
        self._grants.append((self.received, granted))
        self._hashing.queue.put((data, digest, size, index))
        self._storing.queue.put((data, b"", size, index))
        if self._settled() >= self._grants[0][0]:
            self._collect()  # the lanes were quick: release without waiting for their notice

    async def call(self, function: Callable, *args):
        """``function(*args)`` on the storing lane, after every chunk queued so far is stored."""
        if not self._started:  # no chunk queued: nothing to wait for, and no lane to start for it
            # Shielded as a lane's work is: a cancelled caller must not cancel a discard not yet begun.
            return await asyncio.shield(self._loop.run_in_executor(None, function, *args))
        future = self._loop.create_future()
        self._storing.queue.put((function, args, future))
        return await future

    async def finish(self) -> bytes:
        while self._settled() < self.received:
            await self._wait()
        self._raise_failure()
        return await self.call(self.writer.finish)

    async def abandon(self) -> None:
        for lane in self._lanes:
            lane.skip = True
        await self.call(self.writer.discard)
        self._collect()

    def close(self) -> None:
        if self._started:
            for lane in self._lanes:
                lane.queue.put(None)
        # Bytes never settled (an abandoned put) go back to the tenant's budget.
        while self._grants:
            self._budget.release(self._grants.popleft()[1])


def _appender(writer: ObjectWriter) -> Callable:
    def append(data, _digest) -> None:
        writer.append(data)
    return append


class _Abandoned(Exception):
    """A put given up with nothing to keep: why (for its ``data.abandoned`` event) and the caller's error."""

    def __init__(self, reason: str, error: errors.PlanesError):
        super().__init__(reason)
        self.reason, self.error = reason, error


class _Idle(Exception):
    """A put's producer sent nothing for ``put_idle_seconds``."""


class _IdleWatch:
    """Aborts a put whose producer stays silent for ``seconds`` while the plane waits for its next message.

    One timer per stream, re-armed only when it fires: a read costs a clock
    reading, not a timer made and cancelled per chunk as ``asyncio.timeout``
    around each read would. Time the plane spends waiting on its own budgets
    and disk does not count: only time spent waiting on the producer.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        #: When the read in progress began; None while the plane is not waiting on the producer.
        self._since: float | None = None
        self._fired = False
        self._timer = self._loop.call_later(seconds, self._check)

    async def read(self, stream):
        """The stream's next message; raises ``_Idle`` when none came in time."""
        self._since = self._loop.time()
        try:
            return await stream.__anext__()
        except asyncio.CancelledError:
            # Ours, and no one else's cancellation (the client's, the deadline's) pending: idle.
            if self._fired and self._task.uncancel() == 0:
                raise _Idle from None
            raise
        finally:
            self._since = None

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        if since is not None and now - since >= self.seconds:
            self._fired = True
            self._task.cancel()
            return
        self._timer = self._loop.call_at((now if since is None else since) + self.seconds, self._check)

    def close(self) -> None:
        self._timer.cancel()


class Data(DataPlane):
    """The data plane over a :class:`~.store.PayloadStore`."""

    wire_requests = frozenset({"put_payload"})

    def __init__(self, store: PayloadStore, settings: DataSettings, record: Callable, *,
                 clock: Callable[[], int] = time.time_ns, credential_keys: dict | None = None):
        """``credential_keys``: key id -> Ed25519 public key of the execution hosts whose task
        credentials workers present (see :meth:`_worker_scope`)."""
        self.store = store
        self.credential_keys = dict(credential_keys or {})
        #: Egress allowances from the control plane (set by the plugin when it follows one), beside the settings.
        self.control_egress = None
        self.settings = settings
        self._record_events = record
        self.clock = clock
        self._budgets: dict[str, ByteBudget] = {}
        #: Bytes declared by puts in progress, per tenant (counted against the quota).
        self._reserved: dict[str, int] = {}
        #: Puts in progress, per tenant and in all (bounded: each may hold two threads and a file).
        self._puts: dict[str, int] = {}
        self._puts_total = 0

    def tenant_budget(self, tenant: str) -> ByteBudget:
        budget = self._budgets.get(tenant)
        if budget is None:
            budget = self._budgets[tenant] = ByteBudget(self.settings.tenant_inflight_bytes)
        return budget

    async def _record(self, call: CallContext, tenant: str, event_type: str, **fields) -> None:
        await self._record_events(tenant, [call_event("data", call, tenant, event_type, **fields)])

    def _worker_scope(self, call: CallContext, tenant: str, credential: str, payload_id: str | None = None,
                      *, trusted: frozenset[str] = frozenset({"service"})) -> None:
        """A caller acting only as a worker must show its attempt's task credential.

        The credential (signed by the execution host that leased the task)
        must be for ``tenant`` and, for a read, list ``payload_id``: a worker
        reaches the payloads of the task it runs, nothing else, and nothing
        once its lease has expired.
        """
        roles = call.identity.roles
        if not roles.isdisjoint(trusted) or "worker" not in roles:
            return
        if not credential:
            raise errors.PermissionDenied("a worker reaches payloads only with its task credential (from its lease)")
        from planes.plugins.execution.credentials import verify_credential

        scope = verify_credential(credential, self.credential_keys, payload_id=payload_id,
                                  now=self.clock() / 1e9)
        if scope.tenant != tenant:
            raise errors.PermissionDenied(f"task credential of {scope.task_id} is for another tenant")

    # -- put ---------------------------------------------------------------------

    @staticmethod
    def _part(message) -> tuple[str, object]:
        """``(kind, value)`` of a request: ``chunk`` -> (offset, data, digest) decoded zero-copy."""
        if type(message) is Encoded:
            raw = message.data
            tag = raw[0] if raw else None
            if tag == _CHUNK_TAG:
                return "chunk", raw
            if tag in (_HEADER_TAG, _TRAILER_TAG):
                try:
                    message = pb.PutPayloadRequest.FromString(raw)
                except Exception:
                    raise errors.InvalidArgument("a PutPayload message is not valid protobuf") from None
            else:
                raise errors.InvalidArgument("a PutPayload message carries no header, chunk or trailer")
        which = message.WhichOneof("part")
        if which is None:
            raise errors.InvalidArgument("a PutPayload message carries no header, chunk or trailer")
        return which, getattr(message, which)

    def _decode(self, raw) -> tuple[int, object, bytes]:
        try:
            if isinstance(raw, bytes):
                return codec.decode_chunk(raw, max_chunk_bytes=self.settings.max_chunk_bytes)
            return raw.offset, raw.data, raw.digest
        except codec.ChunkLimitError as exc:
            raise errors.LimitExceeded(exc.name, exc.limit, exc.actual) from None
        except codec.ChunkFormatError as exc:
            raise errors.InvalidArgument(f"malformed chunk: {exc}") from None

    def _admit_header(self, header: pb.PayloadHeader, call: CallContext) -> None:
        if not header.tenant:
            raise errors.InvalidArgument("the payload header names no tenant")
        if not call.identity.may_act_for(header.tenant):
            raise errors.PermissionDenied(f"{call.identity.principal} may not store payloads for tenant "
                                          f"{header.tenant}")
        self._worker_scope(call, header.tenant, header.task_credential)
        if header.classification not in (1, 2, 3, 4):
            raise errors.InvalidArgument("the payload header needs a classification: public, internal, "
                                         "confidential or restricted")
        if header.kind == pb.CONTENT_KIND_UNSPECIFIED:
            raise errors.InvalidArgument("the payload header needs a kind: blob, file, tensor or arrow_ipc")
        if header.kind == pb.CONTENT_KIND_TENSOR:
            _check_tensor(header)
        ttl = header.ttl.ToNanoseconds()
        if ttl < 0:
            raise errors.InvalidArgument(f"the payload header's ttl is {ttl / 1e9:.3f} s; it must be positive, "
                                         "or 0 for the tenant's default")
        if ttl and self.clock() + ttl > _LAST_EXPIRY_NS:
            raise errors.InvalidArgument(f"the payload header's ttl of {ttl // 10**9} s would expire after "
                                         "2262-04-11, past what the catalogue holds; leave it 0 for the tenant's "
                                         "default")
        if header.HasField("declared_digest"):
            _check_digest(header.declared_digest, "declared_digest", value_optional=True)
        name, limit = self.settings.payload_limit(header.tenant, header.classification)
        if header.declared_size > limit:
            raise errors.LimitExceeded(name, limit, header.declared_size)
        if header.declared_chunk_count > self.settings.max_chunks:
            raise errors.LimitExceeded("chunk count", self.settings.max_chunks, header.declared_chunk_count)
        now = self.clock()
        quota = self.settings.quota(header.tenant)
        held = self.store.held_bytes(header.tenant, now) + self._reserved.get(header.tenant, 0)
        if held + header.declared_size > quota:
            expiry = self.store.next_expiry(header.tenant, now)
            retry = (expiry - now) / 1e9 if expiry else (1.0 if self._reserved.get(header.tenant) else 60.0)
            raise errors.LimitExceeded(
                "tenant byte quota", quota, held + header.declared_size, retry_after=max(retry, 0.001),
                message=f"tenant {header.tenant} would hold {held + header.declared_size} bytes, over its quota "
                        f"of {quota}; retry after {retry:.0f} s or delete payloads")

    def _take_put_slot(self, tenant: str) -> None:
        """Count one more put in progress for ``tenant``, or refuse it over either limit."""
        settings = self.settings
        retry = min(1.0, settings.put_idle_seconds)
        held = self._puts.get(tenant, 0)
        if held + 1 > settings.max_concurrent_puts:
            raise errors.LimitExceeded(
                "tenant concurrent puts", settings.max_concurrent_puts, held + 1, retry_after=retry,
                message=f"tenant {tenant} has {held} puts in progress, the most it may have at once; retry "
                        f"after {retry:g} s, once one ends")
        if self._puts_total + 1 > settings.max_concurrent_puts_total:
            raise errors.LimitExceeded(
                "concurrent puts", settings.max_concurrent_puts_total, self._puts_total + 1, retry_after=retry,
                message=f"the data plane has {self._puts_total} puts in progress, the most it takes at once; "
                        f"retry after {retry:g} s, once one ends")
        self._puts[tenant] = held + 1
        self._puts_total += 1

    def _give_put_slot(self, tenant: str) -> None:
        self._puts_total -= 1
        if self._puts[tenant] == 1:
            del self._puts[tenant]
        else:
            self._puts[tenant] -= 1

    async def put_payload(self, requests: AsyncIterator, call: CallContext) -> pb.PutPayloadResponse:
        idle = _IdleWatch(self.settings.put_idle_seconds)
        try:
            return await self._put(requests.__aiter__(), idle, call)
        finally:
            idle.close()

    async def _put(self, stream, idle: _IdleWatch, call: CallContext) -> pb.PutPayloadResponse:
        try:
            first = await idle.read(stream)
        except StopAsyncIteration:
            raise errors.InvalidArgument("PutPayload ended before its header") from None
        except _Idle:
            raise errors.DeadlineExceeded(f"PutPayload sent no header in {idle.seconds:g} s") from None
        payload_id = f"pl_{os.urandom(16).hex()}"
        # Every refusal before the ingest owns the stream settles it, whatever
        # raised: an error that skipped this could reach the producer as a reset.
        slot = None
        try:
            kind, header = self._part(first)
            if kind != "header":
                raise errors.InvalidArgument(f"PutPayload must start with a header, not a {kind}")
            self._admit_header(header, call)
            self._take_put_slot(header.tenant)
            slot = header.tenant
            algorithm = _algorithm(header)
            writer, wrapped = self._begin(payload_id, header, algorithm)
        except Exception:
            if slot is not None:
                self._give_put_slot(slot)
            await _settle(stream)
            raise
        tenant = header.tenant
        ingest = _Ingest(self, header, writer)
        self._reserved[tenant] = self._reserved.get(tenant, 0) + header.declared_size
        committed = False
        abandoned = None  # why, when the put is given up before anything was kept
        try:
            try:
                digest, declared = await self._receive(stream, idle, ingest, header, payload_id, algorithm)
            except _Abandoned as given_up:
                abandoned = given_up.reason
                raise given_up.error from None
            except asyncio.CancelledError:
                # The client went away before everything it sent was stored: whether its stream
                # ended first (gRPC often reports a cancellation so) or not, nothing is kept.
                abandoned = "the call was cancelled"
                raise
            record = await self._conclude(call, header, payload_id, ingest, common_pb2.Digest(
                algorithm=algorithm, value=digest), declared, wrapped)
            committed = True
        finally:
            self._reserved[tenant] -= header.declared_size
            try:
                if not committed:
                    await ingest.abandon()
            finally:
                ingest.close()
                self._give_put_slot(tenant)
                if abandoned is not None:  # even when the discard's wait was cancelled: the discard goes on
                    await self._record_abandoned(call, header, payload_id, ingest, abandoned)
        if record.state == pb.PAYLOAD_STATE_QUARANTINED:
            entry = record.quarantine
            raise errors.InvalidArgument(
                f"payload {payload_id} quarantined: {entry.detail}",
                metadata={"payload_id": payload_id,
                          "quarantine_reason": pb.QuarantineReason.Name(entry.reason)})
        return pb.PutPayloadResponse(payload=record.info)

    async def _receive(self, stream, idle: _IdleWatch, ingest: _Ingest, header: pb.PayloadHeader, payload_id: str,
                       algorithm: int) -> tuple[bytes, bytes]:
        """Read a put's chunks and trailer into ``ingest`` until its stream ends; the content digest of what
        was stored, and the one declared. A put given up with nothing to keep raises :class:`_Abandoned`."""
        while True:
            try:
                message = await idle.read(stream)
            except StopAsyncIteration:
                break
            except _Idle:
                raise _Abandoned(f"the producer sent nothing for {idle.seconds:g} s", errors.DeadlineExceeded(
                    f"payload {payload_id} abandoned: PutPayload sent nothing for {idle.seconds:g} s "
                    f"({ingest.received} of {header.declared_size} bytes received); nothing was kept",
                    metadata={"payload_id": payload_id})) from None
            kind, value = self._part(message)
            if kind == "chunk":
                await ingest.chunk(*self._decode(value))
            elif kind == "trailer":
                if ingest.trailer_digest is not None:
                    raise errors.InvalidArgument("PutPayload carries a second trailer")
                ingest.trailer_digest = _check_digest(value.declared_digest, "trailer declared_digest")
                if ingest.trailer_digest.algorithm != algorithm:
                    raise errors.InvalidArgument(
                        f"the trailer's digest is {NAMES[ingest.trailer_digest.algorithm]}, but the "
                        f"header announced {NAMES[algorithm]}")
            else:
                raise errors.InvalidArgument("PutPayload carries a second header")
        if ingest.chunks == 0 and header.declared_size > 0:
            # Nothing arrived to review: no quarantine entry, only the attempt on record.
            # (A cancelled call often ends its request stream this way, not with a cancellation.)
            raise _Abandoned("the stream ended before any chunk", errors.InvalidArgument(
                f"payload {payload_id} abandoned: PutPayload ended after its header, before any of its "
                f"{header.declared_size} declared bytes; nothing was kept", metadata={"payload_id": payload_id}))
        try:
            declared = _declared_digest(header, ingest.trailer_digest)
        except errors.InvalidArgument as refused:  # as a cancelled put's stream often ends: recorded, not kept
            raise _Abandoned(f"the stream ended without a declared content digest, after {ingest.received} of "
                             f"{header.declared_size} bytes", refused) from None
        return await ingest.finish(), declared

    async def _record_abandoned(self, call: CallContext, header: pb.PayloadHeader, payload_id: str,
                                ingest: _Ingest, reason: str) -> None:
        """Evidence of a put given up before it had anything to keep; its bytes are already discarded."""
        log.info("payload %s abandoned after %d of %d bytes: %s", payload_id, ingest.received,
                 header.declared_size, reason)
        try:
            # Shielded: a put cancelled by its client is cancelled again when the call ends.
            await asyncio.shield(self._record(
                call, header.tenant, "data.abandoned", payload_id=payload_id, declared_size=header.declared_size,
                received=ingest.received, chunks=ingest.chunks,
                classification=classification_name(header.classification), reason=reason))
        except asyncio.CancelledError:
            pass  # cancelled again while waiting: the shielded record goes on without us
        except Exception:
            log.exception("could not record the abandoned put of payload %s", payload_id)

    def _begin(self, payload_id: str, header: pb.PayloadHeader, algorithm: int) -> tuple[ObjectWriter, bytes | None]:
        try:
            return self.store.begin(payload_id, encrypted=header.classification in ENCRYPTED,
                                    content_hash=HASHES[algorithm](), expected_size=header.declared_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise errors.Unavailable(f"the data store has no room for {header.declared_size} bytes",
                                         retry_after=60.0) from None
            raise

    async def _conclude(self, call: CallContext, header: pb.PayloadHeader, payload_id: str, ingest: _Ingest,
                        content: common_pb2.Digest, declared: bytes, wrapped: bytes | None) -> StoredPayload:
        digest = content.value
        now = self.clock()
        # A ttl of 0 (or none) is the default, as the proto says; a negative one was refused at admission.
        ttl = header.ttl.ToNanoseconds() or int(self.settings.default_ttl_seconds * 1e9)
        info = pb.PayloadInfo(
            ref=common_pb2.PayloadRef(payload_id=payload_id, size=ingest.received, digest=content,
                                      classification=header.classification, tenant=header.tenant),
            state=pb.PAYLOAD_STATE_AVAILABLE, correlation=header.correlation, kind=header.kind,
            tensor=header.tensor, media_type=header.media_type, name=header.name, chunk_count=ingest.chunks,
            created_at=_timestamp(now), encrypted_at_rest=wrapped is not None)
        if ttl > 0:
            info.expires_at.CopyFrom(_timestamp(now + ttl))
        if not info.correlation.correlation_id:
            info.correlation.correlation_id = call.correlation_id
        quarantine = self._mismatch(header, ingest, digest, declared)
        if quarantine is not None:
            info.state = pb.PAYLOAD_STATE_QUARANTINED
            quarantine.payload_id, quarantine.tenant = payload_id, header.tenant
            quarantine.declared.CopyFrom(header)
            # The operator reviewing the quarantine must not receive the worker's
            # bearer credential, and the catalogue must not keep it.
            quarantine.declared.ClearField("task_credential")
            quarantine.received_size, quarantine.received_chunk_count = ingest.received, ingest.chunks
            quarantine.received_digest.CopyFrom(info.ref.digest)
            quarantine.quarantined_at.CopyFrom(info.created_at)
        # The rename, directory sync and catalogue commit wait on the disk: off the loop.
        record = await ingest.call(self.store.commit, ingest.writer, info, wrapped, quarantine)
        fields = {"payload_id": payload_id, "size": ingest.received, "digest": digest.hex(),
                  "digest_algorithm": NAMES[content.algorithm],
                  "classification": classification_name(header.classification),
                  "encrypted_at_rest": wrapped is not None}
        if quarantine is not None:
            log.warning("payload %s quarantined (%s): %s", payload_id, pb.QuarantineReason.Name(quarantine.reason),
                        quarantine.detail)
            await self._record(call, header.tenant, "data.quarantined", **fields,
                               reason=pb.QuarantineReason.Name(quarantine.reason), detail=quarantine.detail)
        else:
            await self._record(call, header.tenant, "data.stored", **fields)
        return record

    @staticmethod
    def _mismatch(header: pb.PayloadHeader, ingest: _Ingest, digest: bytes,
                  declared: bytes) -> pb.QuarantinedPayload | None:
        entry = pb.QuarantinedPayload
        if ingest.bad_chunk is not None:
            return entry(reason=pb.QUARANTINE_REASON_CHUNK_DIGEST_MISMATCH,
                         detail=f"chunk {ingest.bad_chunk}'s digest does not match its bytes")
        if ingest.received != header.declared_size:
            return entry(reason=pb.QUARANTINE_REASON_SIZE_MISMATCH,
                         detail=f"declared {header.declared_size} bytes, received {ingest.received}")
        if header.declared_chunk_count and ingest.chunks != header.declared_chunk_count:
            return entry(reason=pb.QUARANTINE_REASON_CHUNK_COUNT_MISMATCH,
                         detail=f"declared {header.declared_chunk_count} chunks, received {ingest.chunks}")
        if digest != declared:
            return entry(reason=pb.QUARANTINE_REASON_DIGEST_MISMATCH,
                         detail=f"declared digest {_short(declared)}..., received {_short(digest)}...")
        return None

    # -- get, stat, delete -------------------------------------------------------------

    def _find(self, tenant: str, payload_id: str) -> StoredPayload:
        if not _ID.fullmatch(payload_id):
            raise errors.InvalidArgument("a payload id is 'pl_' and 32 hex digits")
        record = self.store.get(payload_id)
        if record is None or record.tenant != tenant:
            raise errors.NotFound(f"payload {payload_id} not found in tenant {tenant}",
                                  metadata={"payload_id": payload_id})
        if record.state in (pb.PAYLOAD_STATE_AVAILABLE, pb.PAYLOAD_STATE_QUARANTINED) and \
                record.expired(self.clock()):
            record.state = record.info.state = pb.PAYLOAD_STATE_EXPIRED
        return record

    def _readable(self, tenant: str, payload_id: str) -> StoredPayload:
        record = self._find(tenant, payload_id)
        if record.state == pb.PAYLOAD_STATE_DELETED:
            raise errors.NotFound(f"payload {payload_id} was deleted", metadata={"payload_id": payload_id})
        if record.state == pb.PAYLOAD_STATE_EXPIRED:
            raise errors.NotFound(f"payload {payload_id} expired at {record.info.expires_at.ToJsonString()}",
                                  metadata={"payload_id": payload_id})
        if record.state == pb.PAYLOAD_STATE_QUARANTINED:
            raise errors.FailedPrecondition(f"payload {payload_id} is quarantined: {record.quarantine.detail}",
                                            metadata={"payload_id": payload_id})
        return record

    async def get_payload(self, request: pb.GetPayloadRequest, call: CallContext):
        self._worker_scope(call, request.tenant, request.task_credential, request.payload_id)
        record = self._readable(request.tenant, request.payload_id)
        if request.HasField("max_age") and request.max_age.ToNanoseconds() > 0:
            age = self.clock() - record.created_ns
            if age > request.max_age.ToNanoseconds():
                raise errors.FailedPrecondition(
                    f"payload {request.payload_id} is {age / 1e9:.3f} s old, older than the "
                    f"{request.max_age.ToNanoseconds() / 1e9:.3f} s required", metadata={"payload_id": record.payload_id})
        if request.HasField("expected_digest"):
            if request.expected_digest.value != record.info.ref.digest.value or \
                    request.expected_digest.algorithm != record.info.ref.digest.algorithm:
                raise errors.FailedPrecondition(
                    f"payload {request.payload_id} has digest {_short(record.info.ref.digest.value)}..., not the "
                    f"expected {_short(request.expected_digest.value)}... (a stale reference)",
                    metadata={"payload_id": record.payload_id})
        chunk = min(request.chunk_size or self.settings.get_chunk_bytes, self.settings.max_chunk_bytes)
        digests = request.chunk_digests
        yield Encoded(pb.GetPayloadResponse(header=record.info).SerializeToString())
        if record.wrapped_key is None:
            buffer = self.store.mapped(record)
            for offset in range(0, record.size, chunk):
                piece = buffer.slice(offset, min(chunk, record.size - offset))
                yield Encoded(codec.encode_chunk(piece, offset, digest=digests))
            return
        # Sealed segments re-cut into chunks of the size asked for; a chunk that
        # straddles two segments is gathered in ``carry`` (one extra copy of it).
        offset = 0
        carry = bytearray()
        loop = asyncio.get_running_loop()
        segments = self.store.segments(record)
        while True:
            # Reading and opening a sealed segment (about a millisecond per MiB) runs off the loop.
            plain = await loop.run_in_executor(None, next, segments, None)
            if plain is None:
                break
            view = memoryview(plain)
            if carry:
                take = min(chunk - len(carry), len(view))
                carry += view[:take]
                view = view[take:]
                if len(carry) < chunk:
                    continue
                yield Encoded(codec.encode_chunk(carry, offset, digest=digests))
                offset += len(carry)
                carry = bytearray()
            whole = len(view) - len(view) % chunk
            for start in range(0, whole, chunk):
                yield Encoded(codec.encode_chunk(view[start:start + chunk], offset, digest=digests))
                offset += chunk
            carry += view[whole:]
        if carry:
            yield Encoded(codec.encode_chunk(carry, offset, digest=digests))

    async def stat_payload(self, request: pb.StatPayloadRequest, call: CallContext) -> pb.StatPayloadResponse:
        self._worker_scope(call, request.tenant, request.task_credential, request.payload_id,
                           trusted=frozenset({"service", "operator"}))
        return pb.StatPayloadResponse(payload=self._find(request.tenant, request.payload_id).info)

    async def delete_payload(self, request: pb.DeletePayloadRequest, call: CallContext) -> pb.DeletePayloadResponse:
        record = self._find(request.tenant, request.payload_id)
        if record.state == pb.PAYLOAD_STATE_DELETED:
            return pb.DeletePayloadResponse(payload=record.info)
        await self._retire(record, call, "data.deleted", request.reason)
        return pb.DeletePayloadResponse(payload=record.info)

    async def _retire(self, record: StoredPayload, call: CallContext | None, event_type: str, reason: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.store.remove_bytes, record)
        record.state = record.info.state = (pb.PAYLOAD_STATE_EXPIRED if event_type == "data.expired"
                                            else pb.PAYLOAD_STATE_DELETED)
        record.quarantine = None
        self.store.update(record)
        if call is not None:
            await self._record(call, record.tenant, event_type, payload_id=record.payload_id, size=record.size,
                               digest=record.info.ref.digest.value.hex(), reason=reason)

    async def sweep(self, call: CallContext) -> int:
        """Remove the bytes of every payload past its expiry; returns how many."""
        done = 0
        while batch := self.store.due_for_expiry(self.clock()):
            for record in batch:
                await self._retire(record, call, "data.expired", "time to live elapsed")
                done += 1
        return done

    # -- egress ------------------------------------------------------------------

    async def transfer_payload(self, request: pb.TransferPayloadRequest,
                               call: CallContext) -> pb.TransferPayloadResponse:
        self._worker_scope(call, request.tenant, request.task_credential, request.payload_id)
        kind = DESTINATION_KINDS.get(request.destination.kind)
        if kind is None or not request.destination.name:
            raise errors.InvalidArgument("a transfer needs a destination: a tool, model route or sink, by name")
        record = self._readable(request.tenant, request.payload_id)
        classification = record.info.ref.classification
        rule = self.settings.egress.decide(classification, kind, request.destination.name)
        if rule is None and self.control_egress is not None:
            rule = self.control_egress.decide(record.tenant, classification, kind, request.destination.name)
        transfer_id = f"tr_{os.urandom(12).hex()}"
        fields = {"payload_id": record.payload_id, "transfer_id": transfer_id, "destination": f"{kind}:"
                  f"{request.destination.name}", "classification": classification_name(classification),
                  "size": record.size, "digest": record.info.ref.digest.value.hex()}
        if rule is None:
            reason = (f"{classification_name(classification)} data may not go to {kind} "
                      f"{request.destination.name!r}: no egress rule allows it (neither [plugin.data.egress] in "
                      f"the kernel's settings nor an egress_rule resource of tenant {record.tenant!r} in force "
                      f"listing '{kind}:{request.destination.name}' for {classification_name(classification)})")
            await self._record(call, record.tenant, "data.denied", **fields, reason=reason)
            return pb.TransferPayloadResponse(allowed=False, refusal_reason=reason, payload=record.info.ref,
                                              transfer_id=transfer_id)
        await self._record(call, record.tenant, "data.transferred", **fields, rule=rule)
        return pb.TransferPayloadResponse(allowed=True, rule=rule, payload=record.info.ref, transfer_id=transfer_id)

    # -- quarantine ----------------------------------------------------------------

    async def list_quarantine(self, request: pb.ListQuarantineRequest,
                              call: CallContext) -> pb.ListQuarantineResponse:
        size = min(request.page.page_size or 100, 1000)
        after = request.page.page_token
        if after and not _ID.fullmatch(after):
            raise errors.InvalidArgument("malformed page token")
        records = self.store.quarantined(None if request.tenant == ALL_TENANTS else request.tenant, after, size + 1)
        response = pb.ListQuarantineResponse(payloads=[r.quarantine for r in records[:size]])
        if len(records) > size:
            response.page.next_page_token = records[size - 1].payload_id
        return response

    def _quarantined(self, tenant: str, payload_id: str) -> StoredPayload:
        record = self._find(tenant, payload_id)
        if record.state != pb.PAYLOAD_STATE_QUARANTINED:
            raise errors.NotFound(f"payload {payload_id} is not in quarantine", metadata={"payload_id": payload_id})
        return record

    async def release_quarantine(self, request: pb.ReleaseQuarantineRequest,
                                 call: CallContext) -> pb.ReleaseQuarantineResponse:
        record = self._quarantined(request.tenant, request.payload_id)
        if record.info.kind == pb.CONTENT_KIND_TENSOR:
            _check_stored_tensor(record)
        reason = pb.QuarantineReason.Name(record.quarantine.reason)
        await self._record(call, record.tenant, "data.released", payload_id=record.payload_id, size=record.size,
                           digest=record.info.ref.digest.value.hex(), quarantine_reason=reason,
                           reason=request.reason)
        record.state = record.info.state = pb.PAYLOAD_STATE_AVAILABLE
        record.quarantine = None
        self.store.update(record)
        return pb.ReleaseQuarantineResponse(payload=record.info)

    async def delete_quarantined(self, request: pb.DeleteQuarantinedRequest,
                                 call: CallContext) -> pb.DeleteQuarantinedResponse:
        record = self._quarantined(request.tenant, request.payload_id)
        entry = record.quarantine
        await self._retire(record, call, "data.deleted", request.reason or "deleted from quarantine")
        return pb.DeleteQuarantinedResponse(payload=entry)


async def _settle(stream, *, messages: int = 4, seconds: float = 0.05) -> None:
    """Read a few more of a refused stream's messages, briefly, before answering.

    A small put arrives whole at once; refusing it after its header while its
    chunks are still in flight can reach the producer as a reset stream
    (INTERNAL) instead of the refusal. Bounded, so a refused producer cannot
    make the plane read its payload.
    """
    try:
        async with asyncio.timeout(seconds):
            for _ in range(messages):
                await stream.__anext__()
    except Exception:  # the end of the stream, the time bound, or a producer gone: all the same here
        pass


def _check_digest(digest: common_pb2.Digest, where: str, *, value_optional: bool = False) -> common_pb2.Digest:
    if digest.algorithm not in HASHES:
        raise errors.InvalidArgument(f"{where}: the algorithm must be DIGEST_ALGORITHM_SHA256 or "
                                     "DIGEST_ALGORITHM_BLAKE3")
    if len(digest.value) != 32 and not (value_optional and not digest.value):
        raise errors.InvalidArgument(f"{where}: a {NAMES[digest.algorithm]} digest is 32 bytes, not "
                                     f"{len(digest.value)}")
    return digest


def _algorithm(header: pb.PayloadHeader) -> int:
    return header.declared_digest.algorithm if header.HasField("declared_digest") else SHA256


def _declared_digest(header: pb.PayloadHeader, trailer: common_pb2.Digest | None) -> bytes:
    in_header = header.declared_digest.value if header.HasField("declared_digest") else None
    in_header = in_header or None
    in_trailer = trailer.value if trailer is not None else None
    if in_header is None and in_trailer is None:
        raise errors.InvalidArgument("the content digest must be declared, in the header or in a trailer")
    if in_header is not None and in_trailer is not None and in_header != in_trailer:
        raise errors.InvalidArgument("the header and the trailer declare different content digests")
    return in_header if in_header is not None else in_trailer


def _check_tensor(header: pb.PayloadHeader) -> None:
    """Refuse a tensor header whose dtype, shape and strides do not fit its declared size (see :mod:`.tensors`)."""
    from .tensors import TensorLayoutError, check_layout  # numpy, only once a tensor arrives

    try:
        check_layout(header.tensor, header.declared_size, what="the declared")
    except TensorLayoutError as exc:
        raise errors.InvalidArgument(f"header.tensor: {exc}") from None


def _check_stored_tensor(record: StoredPayload) -> None:
    """Refuse to release a tensor whose header does not fit the bytes that arrived.

    Admission checked the header against the declared size; a payload
    quarantined for a size mismatch holds fewer (or more) bytes than that, and
    readers would view them through the declared shape and strides.
    """
    from .tensors import TensorLayoutError, check_layout

    try:
        check_layout(record.info.tensor, record.size, what="the stored")
    except TensorLayoutError as exc:
        raise errors.FailedPrecondition(
            f"payload {record.payload_id} cannot be released as a tensor: {exc}; delete it instead",
            metadata={"payload_id": record.payload_id}) from None
