"""The evidence log: append-only, hash-chained, Merkle-checkpointed.

Each event becomes a leaf (:mod:`.leaf`); leaves are hashed and chained in
native code (``h_i = H(h_{i-1} || leaf_hash_i)``, RFC 6962 leaf hashes) and a
Merkle frontier gives each checkpoint's root in O(log n). Checkpoints are
signed with the evidence key every ``checkpoint_every`` events or
``checkpoint_seconds`` seconds. Corrections and redactions are events
themselves; the original leaf never changes.

Methods are synchronous. Everything that writes (appends, checkpoints,
corrections, redactions, retention) and everything that reads the writer's
state (``size``, ``head``, ``frontier``, the store's event-id index) runs on
the plugin's one log thread, so appends are serialized without locks. The
readers (:meth:`query`, :meth:`to_events`, :meth:`prove_inclusion_at`,
:meth:`prove_consistency`, :meth:`inclusion_proofs` and an export,
:mod:`.export`) may run on other threads at the same time: they read the
store through their own thread's SQLite connection and segment cache and the
segment file by ``pread``, never past a tree size a signed checkpoint fixed
when they started, and share only the proofs cache, which a lock guards.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import wait
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, LimitExceeded, NotFound,
                                  PermissionDenied, PlanesError)
from planes.kernel.identity import Identity
from planes.kernel.runtime import ProcessLocalWorker
from planes.kernel.tokens import SigningKey
from planes.native import eventbatch_py, load

from . import leaf as leaves
from .proofs import InclusionProofs
from .store import SqliteEvidenceStore, StoredEvent, StoredValue, u64_bytes

chain = load("chain")
eventbatch = load("eventbatch")

ZERO_HEAD = bytes(32)
#: Trees whose subtree roots stay cached for inclusion proofs (a 1M-leaf tree: 32 MB of leaf hashes).
CACHED_TREES = 2
#: Segments (at most 10,000 events each) one retention rule reads per prune, :meth:`EvidenceLog.prune`.
PRUNE_SEGMENTS = 8
CHECKPOINT_CONTEXT = b"planes.evidence.v1.Checkpoint\x00"
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")


@dataclass(frozen=True)
class Limits:
    events_per_batch: int = 10_000
    fields_per_event: int = 64
    field_value_bytes: int = 64 * 1024
    id_chars: int = 128


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A request through the native encoder (``batch`` None: the fast path refused it), and what it was
    encoded on: the log ending at ``first_sequence - 1``, with chain head ``head`` when the encoder
    chained the batch too (None: it is chained when stored)."""

    index: int | None
    tenant: str
    data: bytes
    appender: Identity
    first_sequence: int
    head: bytes | None
    batch: object
    events: list[pb.Event] | None

    def next_sequence(self) -> int:
        """Where the log goes on once this batch is stored whole: the next request is encoded on that."""
        return self.first_sequence + (len(self.batch) if self.batch is not None else 0)


class AppendPipeline:
    """One producer's batches, appended in order; :meth:`EvidenceLog.pipeline` makes one.

    :meth:`push` hands the next request to a worker thread, which encodes it
    (commitments, leaves, leaf hashes) as if the batch pushed before it were
    already stored, while this thread chains and stores that batch
    (fdatasync and index commit); it returns that batch's result, durable.
    (The encoder does not chain a batch encoded ahead: chaining behind its
    own helper thread, it would spin while the storing thread holds a core;
    measured, encoding ahead unchained ran 1.08-1.27x the chained variant.) :meth:`finish`
    stores the last one. Every batch is acknowledged only once durable, in
    order. Like every log method, push and finish run on the log's one
    thread; other operations may run between them: a batch encoded ahead on
    a log that has moved since (another append, or a batch before it that
    held replays) is encoded again when stored, so the pipeline only ever
    saves work. On an error nothing pushed after the last acknowledged batch
    is stored, and the pipeline is empty again.
    """

    def __init__(self, log: EvidenceLog, appender: Identity):
        self.log = log
        self.appender = appender
        self.pushed = 0
        self._pending: _Encoded | None = None

    def push(self, tenant: str, data: bytes) -> AppendResult | None:
        """Start appending a serialized ``AppendEventsRequest``; the result of the batch pushed before it."""
        log, index, pending = self.log, self.pushed, self._pending
        self.pushed += 1
        if pending is None:
            self._pending = log._encode_request(index, tenant, data, self.appender, log.size + 1, log.head)
            return None
        self._pending = None
        ahead = log._encoder.submit(log._encode_request, index, tenant, data, self.appender,
                                      pending.next_sequence(), None)
        try:
            result = log._settle(pending)
        except BaseException:
            wait([ahead])  # nothing of the next batch is stored; let its encoder finish first
            raise
        self._pending = ahead.result()
        return result

    def finish(self) -> AppendResult | None:
        """Store the batch pushed last; its result (None if there is none)."""
        pending, self._pending = self._pending, None
        return None if pending is None else self.log._settle(pending)


@dataclass(frozen=True)
class AppendResult:
    sequences: list[int]
    appended: int
    duplicates: int
    chain_head: bytes


#: The range of a stored time or sequence: SQLite keeps integers as signed 64 bits.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _ns(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def time_range(start: timestamp_pb2.Timestamp | None,
               end: timestamp_pb2.Timestamp | None) -> tuple[int | None, int | None]:
    """A half-open [start, end) of request timestamps as ns bounds a query can take (None: unbounded).

    A valid Timestamp reaches years 1 to 9999, past what int64 ns holds (1677 to 2262), and every stored
    time is within that: a bound beyond it on its open side is no bound, and one beyond it on its closed
    side selects nothing (an empty range), rather than a number SQLite cannot take.
    """
    start_ns = _ns(start) if start is not None else None
    end_ns = _ns(end) if end is not None else None
    if start_ns is not None and start_ns < INT64_MIN:
        start_ns = None
    if end_ns is not None and end_ns > INT64_MAX:
        end_ns = None
    if (start_ns is not None and start_ns > INT64_MAX) or (end_ns is not None and end_ns < INT64_MIN):
        return INT64_MAX, INT64_MAX  # after every stored time, or before: nothing
    return start_ns, end_ns


def checked_u64(name: str, value: int) -> int:
    """A uint64 request field that the log keeps as a signed 64-bit integer: InvalidArgument past that."""
    if value > INT64_MAX:
        raise InvalidArgument(f"{name} must be at most {INT64_MAX} (2^63-1), got {value}")
    return value


def _stamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def sign_checkpoint(key: SigningKey, body: bytes) -> bytes:
    return key.private_key.sign(CHECKPOINT_CONTEXT + body)


class _SaltPool:
    """Random salts for one batch, drawn with one system call."""

    __slots__ = ("_data", "_at")

    def __init__(self, count: int):
        self._data = os.urandom(leaves.SALT_BYTES * count)
        self._at = 0

    def take(self) -> bytes:
        at = self._at
        self._at = at + leaves.SALT_BYTES
        return self._data[at:self._at]


class EvidenceLog:
    def __init__(self, store: SqliteEvidenceStore, key: SigningKey, *, log_id: str,
                 checkpoint_every: int = 1000, checkpoint_seconds: float = 5.0,
                 limits: Limits | None = None, clock: Callable[[], float] = time.time, encode_threads: int = 2):
        self.store = store
        self.key = key
        self.log_id = log_id
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.limits = limits or Limits()
        # Two threads encode a large batch faster when the second core is free;
        # on this shared two-core box end-to-end appends measured 1.07-1.11x
        # (streaming: 1.09x median of 5, interleaved), the encoder alone 0.92-1.14x.
        self.encode_threads = encode_threads
        self.clock = clock
        self.size, head = store.head()
        self.head = head or ZERO_HEAD
        self.frontier = self._load_frontier()
        last = store.checkpoint()
        self._checkpointed_size = last[0] if last else 0
        self._valid_types: set[str] = set()
        self._proofs: OrderedDict[int, InclusionProofs] = OrderedDict()
        self._proofs_lock = threading.Lock()  # readers on other threads share the cache (module docstring)
        self._checkpointed_at = clock()
        self._encoder = ProcessLocalWorker("evidence-encode")  # encodes a pipelined batch ahead
        #: Segments one retention rule reads per prune (each tick): bounds how long a prune holds the log thread.
        self.prune_segments = PRUNE_SEGMENTS
        self._retention_scans: dict[str, _RetentionScan] = {}

    def _load_frontier(self):
        saved = self.store.meta("frontier")
        if saved is not None:
            try:
                frontier = chain.MerkleFrontier.from_bytes(saved)
            except ValueError:
                frontier = None
            if frontier is not None and frontier.size == self.size and self._agrees_with_checkpoint(frontier):
                return frontier
        frontier = chain.MerkleFrontier()  # rebuilt from the stored leaf hashes
        if self.size:
            frontier.append(self.store.leaf_hashes(self.size))
        return frontier

    def _agrees_with_checkpoint(self, frontier) -> bool:
        """False when the last checkpoint covers the frontier's size and signed another root (a damaged frontier:
        rebuilt from the leaves then, rather than signed into the next checkpoint)."""
        last = self.store.checkpoint()
        if last is None or last[0] != frontier.size:
            return True
        return pb.Checkpoint.FromString(last[1]).root_hash == frontier.root()

    # -- append ---------------------------------------------------------------

    def append(self, tenant: str, events: list[pb.Event], appender: Identity) -> AppendResult:
        """Validate, commit, chain and store a batch; durable when this returns.

        The whole batch is checked before anything is stored: one bad event
        refuses the batch, and nothing of it is kept. An event whose id the
        tenant has stored is a replay (a retry after a lost acknowledgement):
        acknowledged with the stored sequence when its client-supplied content
        is the stored event's, refused otherwise (``AlreadyExists``; see
        :meth:`_confirm_replays`), as is a batch holding one id twice with
        different content (``InvalidArgument``).
        """
        if len(events) > self.limits.events_per_batch:
            raise LimitExceeded("events_per_batch", self.limits.events_per_batch, len(events))
        return self._append(tenant, pb.AppendEventsRequest(events=events).SerializeToString(), appender, events)

    def append_encoded(self, tenant: str, data: bytes, appender: Identity) -> AppendResult:
        """:meth:`append` of a serialized ``AppendEventsRequest`` (or ``AppendEventStreamRequest``).

        The bytes go straight to the native batch encoder; only the events
        are read from them (the request's own tenant field is the caller's
        business, as it is for :meth:`append`).
        """
        return self._append(tenant, data, appender, None)

    def append_many(self, requests: Iterable[tuple[str, bytes]], appender: Identity) -> list[AppendResult]:
        """:meth:`append_encoded` of ``(tenant, request bytes)`` after another, pipelined (:meth:`pipeline`).

        On an error, the batches before the failing one are durable and the
        rest are not stored; the error says which batch failed (an index
        into ``requests``). Retrying the whole list is harmless: stored
        event ids make a replayed event a no-op (a replay with other content
        than the stored event's is refused, :meth:`append`).
        """
        pipeline = self.pipeline(appender)
        results = [result for tenant, data in requests if (result := pipeline.push(tenant, data)) is not None]
        last = pipeline.finish()
        return results if last is None else [*results, last]

    def pipeline(self, appender: Identity) -> AppendPipeline:
        """Appends of one producer's batches, each encoded while the one before it is stored."""
        return AppendPipeline(self, appender)

    def close(self) -> None:
        """Stop the encoder worker and close the store."""
        self._encoder.shutdown()
        self.store.close()

    def _append(self, tenant: str, data: bytes, appender: Identity, events: list[pb.Event] | None) -> AppendResult:
        return self._settle(self._encode_request(None, tenant, data, appender, self.size + 1, self.head, events))

    def _encode_request(self, index: int | None, tenant: str, data: bytes, appender: Identity, first_sequence: int,
                        head: bytes | None, events: list[pb.Event] | None = None) -> _Encoded:
        """Run the native encoder on a request as if the log ended at ``first_sequence - 1`` (with ``head``:
        chain it on that too); touches no state of the log, so it can run ahead on the worker."""
        limits = self.limits
        try:
            batch = eventbatch.encode_events(
                data, tenant, appender.principal, first_sequence, int(self.clock() * 1e9),
                max_events=limits.events_per_batch, max_fields=limits.fields_per_event,
                max_value_bytes=limits.field_value_bytes, max_id_chars=limits.id_chars, threads=self.encode_threads,
                previous_head=head)
        except eventbatch.BatchLimitError as exc:
            if exc.limit_name == "events_per_batch":
                where = "" if index is None else f"batch {index}: "
                raise LimitExceeded(exc.limit_name, exc.limit, exc.actual,
                                    message=f"{where}{exc.actual} events > {exc.limit}") from None
            batch = None
        except (eventbatch.BatchRuleError, eventbatch.BatchFormatError, eventbatch.NotCanonical):
            batch = None
        return _Encoded(index, tenant, data, appender, first_sequence, head, batch, events)

    def _settle(self, encoded: _Encoded) -> AppendResult:
        """Store an encoded request; durable when this returns."""
        batch = encoded.batch
        if batch is not None and (encoded.first_sequence != self.size + 1
                                  or (encoded.head is not None and encoded.head != self.head)):
            # Encoded ahead on a log the batch before did not leave there (it had replays): encode again.
            encoded = self._encode_request(encoded.index, encoded.tenant, encoded.data, encoded.appender,
                                           self.size + 1, self.head, encoded.events)
            batch = encoded.batch
        if batch is not None:
            count = len(batch)
            if not count:
                return AppendResult([], 0, 0, self.head)
            if self.store.ids_unknown(encoded.tenant, batch.id_hashes):
                self._commit_batch(encoded.tenant, batch)
                self._maybe_checkpoint()
                first = batch.first_sequence
                return AppendResult(list(range(first, first + count)), count, 0, self.head)
        # The rare path, and the authority on every refusal: replays and
        # duplicates, bad events, and encodings the native path leaves to
        # protobuf all go through the message-by-message append.
        events, limits = encoded.events, self.limits
        where = "" if encoded.index is None else f"batch {encoded.index}: "
        if events is None:
            try:
                events = list(pb.AppendEventsRequest.FromString(encoded.data).events)
            except DecodeError:
                raise InvalidArgument(f"{where}the append request is not a well-formed protobuf message") from None
            if len(events) > limits.events_per_batch:
                raise LimitExceeded("events_per_batch", limits.events_per_batch, len(events),
                                    message=f"{where}{len(events)} events > {limits.events_per_batch}")
        try:
            return self._append_messages(encoded.tenant, events, encoded.appender)
        except PlanesError as exc:
            if where:  # name the batch of the list that failed
                exc.message = where + exc.message
                exc.args = (exc.message,)
            raise

    def _append_messages(self, tenant: str, events: list[pb.Event], appender: Identity) -> AppendResult:
        known = self.store.known_event_ids(tenant, (e.event_id for e in events))
        sequences: list[int] = []
        seen: dict[str, int] = {}
        blobs: list[bytes] = []
        rows: list[tuple] = []
        values: list[tuple] = []
        new_ids: list[str] = []
        now_ns = int(self.clock() * 1e9)
        salts = _SaltPool(sum(len(e.fields) for e in events))
        replays: list[tuple[int, pb.Event, int]] = []
        for index, event in enumerate(events):
            event_id = event.event_id
            earlier = known.get(event_id) or seen.get(event_id)
            if earlier:
                self._check(index, event, tenant)
                sequences.append(earlier)
                replays.append((index, event, earlier))
                continue
            sequence = self.size + len(blobs) + 1
            blob, row = self._encode(index, sequence, event, tenant, appender, now_ns, salts, values)
            seen[event_id] = sequence
            sequences.append(sequence)
            blobs.append(blob)
            rows.append(row)
            new_ids.append(event_id)
        if replays:  # before anything of the batch is stored
            self._confirm_replays(replays, appender, blobs, values)
        duplicates = len(events) - len(blobs)
        if not blobs:
            return AppendResult(sequences, 0, duplicates, self.head)
        offsets = array("Q", [0])
        total = 0
        for blob in blobs:
            total += len(blob)
            offsets.append(total)
        runs: list[list] = []
        for row in rows:  # (sequence, event_id, tenant, correlation_id, event_type, time_ns)
            if runs and runs[-1][0] == row[3]:
                runs[-1][2] = row[0]
            else:
                runs.append([row[3], row[0], row[0]])
        keys = array("Q", [eventbatch_py.id_hash(event_id.encode()) for event_id in new_ids])
        times = [row[5] for row in rows]
        batch = eventbatch_py.EncodedBatch(rows[0][0], b"".join(blobs), offsets, eventbatch_py.pack_values(values),
                                           u64_bytes(keys), eventbatch_py.correlations(runs), min(times),
                                           max(times))
        self._commit_batch(tenant, batch, event_ids=new_ids)
        self._maybe_checkpoint()
        return AppendResult(sequences, len(blobs), duplicates, self.head)

    def _confirm_replays(self, replays: list[tuple[int, pb.Event, int]], appender: Identity, blobs: list[bytes],
                         values: list[tuple]) -> None:
        """Refuse the batch unless each replayed event (index, event, sequence of the event with its id) says
        what that event says.

        Only what the client supplies is compared: the event type, ids,
        correlation, actor (the appender when none is named, as when
        appending), config stamp, corrected id, a time it gave, and each
        field's name, classification, kind and value. Sequences, salts and the
        received time are the log's. A value is compared raw while the stored
        event still holds it; once redaction or retention removed it (with its
        salt, so the commitment cannot be brute-forced), only a replay that
        carries the salt can be checked against the commitment: any other
        replay of that field cannot be confirmed and is refused too.
        """
        first_new = self.size + 1
        kept = self.store.values(sorted({s for _, _, s in replays if s < first_new}))
        pending: dict[int, dict[str, StoredValue]] = {}
        for sequence, name, salt, value in values:  # the batch's own new events, not stored yet
            pending.setdefault(sequence, {})[name] = StoredValue(sequence, name, salt, value)
        for index, event, sequence in replays:
            if sequence >= first_new:
                original, raw = leaves.decode(blobs[sequence - first_new]), pending.get(sequence, {})
            else:
                original, raw = leaves.decode(self.store.event_at(sequence).leaf), kept.get(sequence, {})
            what, removed = _replay_difference(event, original, raw, appender)
            event_id = event.event_id
            metadata = {"event_id": event_id, "sequence": str(sequence)}
            if sequence >= first_new and (what or removed):
                what = what or f"field {removed!r}"
                raise InvalidArgument(f"event {index}: event id {event_id!r} appears earlier in this batch with "
                                      f"different content ({what}); nothing of the batch was appended",
                                      metadata=metadata)
            if what:
                raise AlreadyExists(f"event {index}: event id {event_id!r} was already appended (sequence "
                                    f"{sequence}) with different content ({what}); nothing of the batch was "
                                    "appended", metadata=metadata)
            if removed:
                raise FailedPrecondition(
                    f"event {index}: event id {event_id!r} was already appended (sequence {sequence}) and the raw "
                    f"value of its field {removed!r} is not stored (redacted, pruned or withheld at the source), "
                    "so this replay cannot be confirmed to carry the same content; nothing of the batch was "
                    "appended", metadata=metadata)

    def _check(self, index: int, event: pb.Event, tenant: str) -> None:
        """The event-level rules; field rules are checked while encoding."""
        event_type = event.event_type
        if event_type not in self._valid_types:
            if not EVENT_TYPE.fullmatch(event_type) or len(event_type) > self.limits.id_chars:
                raise InvalidArgument(f"event {index}: event_type must be a dotted lower-case name such as "
                                      f"'tool.invoked', got {event_type[:40]!r}")
            if len(self._valid_types) < 10_000:
                self._valid_types.add(event_type)
        event_id = event.event_id
        if not event_id:
            raise InvalidArgument(f"event {index}: event_id is required (it makes a replayed append harmless)")
        if len(event_id) > self.limits.id_chars:
            raise InvalidArgument(f"event {index}: event_id longer than {self.limits.id_chars} characters")
        if event.sequence:
            raise InvalidArgument(f"event {index}: sequence is assigned by the log; leave it 0")
        claimed = event.correlation.tenant
        if claimed and claimed != tenant:
            raise PermissionDenied(f"event {index}: correlation tenant {claimed!r} is not "
                                   f"the request's tenant {tenant!r}")
        if len(event.fields) > self.limits.fields_per_event:
            raise LimitExceeded("fields_per_event", self.limits.fields_per_event, len(event.fields),
                                message=f"event {index}: {len(event.fields)} fields > {self.limits.fields_per_event}")

    def _encode(self, index: int, sequence: int, event: pb.Event, tenant: str, appender: Identity, now_ns: int,
                salts: _SaltPool, values: list[tuple]) -> tuple[bytes, tuple]:
        """Check one event, commit its fields and encode its leaf (one pass)."""
        self._check(index, event, tenant)
        limits = self.limits
        time_ns = _ns(event.time) if event.HasField("time") else now_ns
        if not -2**63 <= time_ns < 2**63:
            raise InvalidArgument(f"event {index}: time is out of range")
        parts = []
        names = set()
        for field in event.fields:
            name = field.name
            if not name or len(name) > limits.id_chars:
                raise InvalidArgument(f"event {index}: field names must be 1 to {limits.id_chars} characters")
            if name in names:
                raise InvalidArgument(f"event {index}: field {name!r} appears twice")
            names.add(name)
            if not 0 <= field.classification <= 255:
                raise InvalidArgument(f"event {index}: field {name!r}: classification {field.classification} "
                                      "is out of range")
            which = field.WhichOneof("value")
            if which is None:  # withheld at the source: only a commitment travels
                committed = field.commitment.value
                if len(committed) != 32:
                    raise InvalidArgument(f"event {index}: field {name!r} has neither a value nor a 32-byte "
                                          "commitment")
                parts.append(leaves.encode_field(name, field.classification, leaves.KIND_BYTES, committed))
                continue
            if which == "string_value":
                kind, value = leaves.KIND_STRING, field.string_value.encode()
            else:
                kind, value = leaves.KIND_BYTES, field.bytes_value
            if len(value) > limits.field_value_bytes:
                raise LimitExceeded("field_value_bytes", limits.field_value_bytes, len(value),
                                    message=f"event {index}: field {name!r} holds {len(value)} bytes > "
                                            f"{limits.field_value_bytes}")
            salt = field.salt or salts.take()
            digest = leaves.commitment(salt, name, kind, value)
            sent = field.commitment.value
            if sent and sent != digest:
                raise InvalidArgument(f"event {index}: field {name!r}: the commitment sent does not match its "
                                      "value and salt")
            parts.append(leaves.encode_field(name, field.classification, kind, digest))
            values.append((sequence, name, salt, value))
        correlation = event.correlation
        header = leaves.encode_header(
            sequence, event.event_id, tenant, correlation.correlation_id, correlation.request_id,
            correlation.trace_id, correlation.span_id, correlation.actor or appender.principal, time_ns,
            event.event_type, event.config.revision, event.config.digest, event.corrects_event_id, len(parts))
        return header + b"".join(parts), (sequence, event.event_id, tenant, correlation.correlation_id,
                                          event.event_type, time_ns)

    def _commit_batch(self, tenant: str, batch, *, event_ids: list[str] | None = None) -> None:
        """Hash, chain and store an encoded batch as one segment; durable when this returns."""
        hashes = batch.leaf_hashes or chain.leaf_hashes(batch.leaves, batch.offsets)
        heads = batch.heads if batch.heads is not None else chain.chain(self.head, hashes)
        frontier = chain.MerkleFrontier.from_bytes(self.frontier.to_bytes())

        def grown_frontier() -> dict[str, bytes]:  # runs while the segment is being synced
            frontier.append(hashes)
            return {"frontier": frontier.to_bytes()}

        self.store.append(tenant, batch, hashes, heads, grown_frontier, event_ids=event_ids)
        self.frontier = frontier
        self.size += len(batch)
        self.head = heads[-32:]

    # -- checkpoints --------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        due = (self.size - self._checkpointed_size >= self.checkpoint_every
               or self.clock() - self._checkpointed_at >= self.checkpoint_seconds)
        if due and self.size > self._checkpointed_size:
            self.checkpoint_now()

    def tick(self) -> None:
        """Make a checkpoint if one is due by time (the plugin calls this periodically)."""
        self._maybe_checkpoint()

    def checkpoint_now(self) -> pb.SignedCheckpoint:
        """Sign a checkpoint at the current size (idempotent per size)."""
        existing = self.store.checkpoint(self.size) if self.size else None
        if existing is not None:
            return _signed(existing)
        body = pb.Checkpoint(log_id=self.log_id, tree_size=self.size, root_hash=self.frontier.root(),
                             chain_head=self.head, time=_stamp(int(self.clock() * 1e9)),
                             key_id=self.key.kid).SerializeToString(deterministic=True)
        signature = sign_checkpoint(self.key, body)
        self.store.put_checkpoint(self.size, body, signature, self.key.kid)
        self._checkpointed_size = self.size
        self._checkpointed_at = self.clock()
        return pb.SignedCheckpoint(checkpoint=body, signature=signature, key_id=self.key.kid)

    def checkpoint(self, tree_size: int = 0) -> pb.SignedCheckpoint:
        """The signed checkpoint at ``tree_size`` (0: the latest, signed now when there is none: log thread)."""
        row = self.store.checkpoint(tree_size)
        if row is None:
            if tree_size:
                raise NotFound(f"no checkpoint at tree size {tree_size}")
            if not self.size:
                raise FailedPrecondition("the evidence log is empty: no checkpoint yet")
            return self.checkpoint_now()
        return _signed(row)

    def _covering_checkpoint(self, sequence: int, tree_size: int) -> tuple[int, pb.SignedCheckpoint]:
        """A checkpoint that includes ``sequence``: at ``tree_size``, or the first at or after it."""
        if tree_size:
            return tree_size, self.checkpoint(tree_size)
        row = self.store.checkpoint_at_or_after(sequence)
        if row is None:
            signed = self.checkpoint_now()
            return self.size, signed
        return row[0], _signed(row)

    # -- proofs -----------------------------------------------------------------

    def prove_inclusion(self, tenant: str, event_id: str, tree_size: int = 0) -> pb.ProveInclusionResponse:
        return self.prove_inclusion_at(*self.inclusion_target(tenant, event_id, tree_size))

    def inclusion_target(self, tenant: str, event_id: str,
                         tree_size: int = 0) -> tuple[StoredEvent, int, pb.SignedCheckpoint]:
        """The event and the signed checkpoint a proof of its inclusion is against (log thread: it reads the
        event-id index, and signs a checkpoint when none covers the event yet)."""
        stored = self._own_event(tenant, event_id)
        size, signed = self._covering_checkpoint(stored.sequence, tree_size)
        if stored.sequence > size:
            raise FailedPrecondition(f"event {event_id} is not in the tree of size {size}")
        return stored, size, signed

    def prove_inclusion_at(self, stored: StoredEvent, size: int,
                           signed: pb.SignedCheckpoint) -> pb.ProveInclusionResponse:
        """The audit path of ``stored`` in the tree of ``size`` (any thread: the first proof against a tree
        reads and hashes all of its leaves)."""
        index = stored.sequence - 1
        path = self.inclusion_proofs(size).path(index)
        return pb.ProveInclusionResponse(leaf_index=index, leaf_hash=stored.leaf_hash, audit_path=path,
                                         checkpoint=signed)

    def inclusion_proofs(self, size: int) -> InclusionProofs:
        """Audit paths in the tree of ``size`` leaves, sharing subtree roots between calls.

        A tree of a given size never changes, so the leaf hashes are read and
        each subtree root computed once for the last few sizes asked about:
        the first proof against a checkpoint costs about n hashes, the next
        ones about log2(n) lookups.
        """
        with self._proofs_lock:
            proofs = self._proofs.get(size)
            if proofs is not None:
                self._proofs.move_to_end(size)
                return proofs
        # Read outside the lock: two threads asking for a new size at once each read it (the same tree), rather
        # than one waiting on the other's read of every leaf hash. Subtree roots are memoized per tree in a
        # plain dict: a race there computes a root twice, the same root.
        made = InclusionProofs(self.store.leaf_hashes(size), size)
        with self._proofs_lock:
            proofs = self._proofs.setdefault(size, made)
            self._proofs.move_to_end(size)
            while len(self._proofs) > CACHED_TREES:
                self._proofs.popitem(last=False)
        return proofs

    def prove_consistency(self, first: int, second: int = 0) -> pb.ProveConsistencyResponse:
        """Any thread: both sizes must have signed checkpoints already, so this only reads. ``second`` 0 is the
        latest checkpoint's size (none is signed here: this may run off the log thread)."""
        if not second:
            latest = self.store.checkpoint()
            if latest is None:
                raise FailedPrecondition("the evidence log has no checkpoint yet")
            second = latest[0]
        if not 0 < first <= second:
            raise InvalidArgument(f"need 0 < first_tree_size <= second_tree_size, got {first} and {second}")
        first_checkpoint, second_checkpoint = self.checkpoint(first), self.checkpoint(second)
        proof = chain.consistency_proof(self.store.leaf_hashes(second), first, second)
        return pb.ProveConsistencyResponse(proof=proof, first=first_checkpoint, second=second_checkpoint)

    # -- reads ----------------------------------------------------------------

    def _own_event(self, tenant: str, event_id: str) -> StoredEvent:
        stored = self.store.event(tenant, event_id)
        if stored is None:  # another tenant's event with this id is not this tenant's: missing, like any other
            raise NotFound(f"event {event_id!r} not found in tenant {tenant!r}")
        return stored

    def query(self, tenant: str, *, correlation_id: str = "", event_types: tuple[str, ...] = (),
              start_ns: int | None = None, end_ns: int | None = None, after_sequence: int = 0,
              limit: int = 1000) -> list[pb.Event]:
        rows = self.store.query(tenant, correlation_id=correlation_id, event_types=event_types, start_ns=start_ns,
                                end_ns=end_ns, after_sequence=after_sequence, limit=limit)
        return self.to_events(rows)

    def to_events(self, rows: list[StoredEvent]) -> list[pb.Event]:
        values = self.store.values([row.sequence for row in rows])
        return [to_event(leaves.decode(row.leaf), values.get(row.sequence, {})) for row in rows]

    # -- corrections and redactions ------------------------------------------

    def correct(self, tenant: str, event_id: str, fields: list[pb.EventField], reason: str,
                actor: Identity) -> pb.Event:
        original = self._own_event(tenant, event_id)
        if not reason:
            raise InvalidArgument("a correction needs a reason")
        correction = pb.Event(event_id=f"correction:{event_id}:{int(self.clock() * 1e6)}",
                              event_type="correction", corrects_event_id=event_id,
                              correlation=common_pb2.Correlation(correlation_id=original.correlation_id,
                                                                 tenant=tenant, actor=actor.principal))
        correction.fields.extend(fields)
        correction.fields.add(name="reason", string_value=reason)
        result = self.append(tenant, [correction], actor)
        return self.to_events([self.store.event_at(result.sequences[0])])[0]

    def redact(self, tenant: str, event_id: str, field_name: str, reason: str,
               actor: Identity) -> tuple[pb.Event, pb.Event]:
        target = self._own_event(tenant, event_id)
        if not reason:
            raise InvalidArgument("a redaction needs a reason")
        if leaves.decode(target.leaf).field(field_name) is None:
            raise NotFound(f"event {event_id!r} has no field {field_name!r}")
        redaction = pb.Event(event_id=f"redaction:{event_id}:{field_name}:{int(self.clock() * 1e6)}",
                             event_type="redaction", corrects_event_id=event_id,
                             correlation=common_pb2.Correlation(correlation_id=target.correlation_id,
                                                                tenant=tenant, actor=actor.principal))
        redaction.fields.add(name="field", string_value=field_name)
        redaction.fields.add(name="reason", string_value=reason)
        # Record first, then delete: a crash in between leaves the value and a
        # redaction event that says it should be gone, never a silent deletion.
        result = self.append(tenant, [redaction], actor)
        self.store.delete_values(target.sequence, [field_name])
        recorded = self.to_events([self.store.event_at(result.sequences[0])])[0]
        return recorded, self.to_events([target])[0]


    # -- retention -------------------------------------------------------------

    def prune(self, rules: dict[str, float], *, max_segments: int | None = None) -> list[pb.Event]:
        """Delete raw values of events older than their type's retention period, a bounded step at a time.

        ``rules`` maps an event type to a period in seconds. Each tenant whose
        values were pruned gets a ``retention.pruned`` event saying which type,
        up to when and how many events; leaves and proofs are untouched.

        This runs on the log thread every tick, so each rule reads at most
        ``max_segments`` (default :attr:`prune_segments`) segments a call and
        goes on from there at the next; a segment without the type costs a
        read and no decoding (:meth:`~.store.SqliteEvidenceStore.expired_values`).
        Once a pass over the log ends, the next only reads segments appended
        since and those holding events the moving cutoff has newly passed, so
        a rule that matches nothing costs next to nothing.
        """
        recorded = []
        now = self.clock()
        limit = max_segments or self.prune_segments
        for event_type, period in sorted(rules.items()):
            before_ns = min(int((now - period) * 1e9), INT64_MAX)
            scan = self._retention_scans.setdefault(event_type, _RetentionScan())
            if scan.cutoff is None:  # a new pass
                scan.cutoff, scan.position = before_ns, 0
            scan.cutoff = min(scan.cutoff, before_ns)  # what the whole pass is sure to have pruned
            firsts = self.store.retention_candidates(before_ns, after=scan.position,
                                                     settled_before=scan.settled_before,
                                                     settled_through=scan.settled_through, limit=limit)
            if firsts:
                scan.position = firsts[-1]
            if len(firsts) < limit:  # the pass is over: what it settled holds until the cutoff moves past it
                scan.settled_before, scan.settled_through = scan.cutoff, self.store.last_segment()
                scan.cutoff = None
            for tenant, sequences in sorted(self.store.expired_values(event_type, before_ns, firsts).items()):
                notice = pb.Event(event_id=f"retention:{tenant}:{event_type}:{before_ns}:{sequences[0]}",
                                  event_type="retention.pruned",
                                  correlation=common_pb2.Correlation(tenant=tenant, actor="evidence-retention"))
                notice.fields.add(name="event_type", string_value=event_type)
                notice.fields.add(name="before_ns", string_value=str(before_ns))
                notice.fields.add(name="events", string_value=str(len(sequences)))
                notice.fields.add(name="first_sequence", string_value=str(sequences[0]))
                notice.fields.add(name="last_sequence", string_value=str(sequences[-1]))
                # As with redaction: record first, then delete.
                result = self.append(tenant, [notice], Identity("evidence-retention", tenant, frozenset()))
                self.store.delete_all_values(sequences)
                recorded.append(self.to_events([self.store.event_at(result.sequences[0])])[0])
        return recorded


@dataclass
class _RetentionScan:
    """Where one retention rule's pass over the segments is (:meth:`EvidenceLog.prune`)."""

    #: The pass under way: its lowest cutoff, and the last segment it read (None: no pass under way).
    cutoff: int | None = None
    position: int = 0
    #: The last finished pass: no value of the type older than ``settled_before`` is left in the segments up
    #: to ``settled_through``.
    settled_before: int = INT64_MIN
    settled_through: int = 0


def _replay_difference(event: pb.Event, original: leaves.Leaf, raw: dict[str, StoredValue],
                       appender: Identity) -> tuple[str, str]:
    """What of a replayed event's client-supplied content differs from the ``original`` leaf (``raw``: the
    values it still holds), and the first field whose removed value leaves it unconfirmed; "" for none.
    Says which part differs, never a value."""
    correlation, config = event.correlation, event.config
    for what, sent, stored in (
            ("event_type", event.event_type, original.event_type),
            ("correlation_id", correlation.correlation_id, original.correlation_id),
            ("request_id", correlation.request_id, original.request_id),
            ("trace_id", correlation.trace_id, original.trace_id),
            ("span_id", correlation.span_id, original.span_id),
            ("actor", correlation.actor or appender.principal, original.actor),
            ("config", (config.revision, config.digest), (original.config_revision, original.config_digest)),
            ("corrects_event_id", event.corrects_event_id, original.corrects_event_id)):
        if sent != stored:
            return what, ""
    if event.HasField("time") and _ns(event.time) != original.time_ns:
        return "time", ""
    committed = {field.name: field for field in original.fields}
    if len(event.fields) != len(committed) or len({field.name for field in event.fields}) != len(committed):
        return "field names", ""
    unconfirmed = ""
    for field in event.fields:
        name = field.name
        stored = committed.get(name)
        if stored is None:
            return "field names", ""
        sent_commitment = field.commitment.value
        which = field.WhichOneof("value")
        if which is None:  # withheld at the source: the commitment is the content
            kind, same = leaves.KIND_BYTES, sent_commitment == stored.commitment
        else:
            if which == "string_value":
                kind, value = leaves.KIND_STRING, field.string_value.encode()
            else:
                kind, value = leaves.KIND_BYTES, field.bytes_value
            same = not sent_commitment or sent_commitment == stored.commitment
            kept = raw.get(name)
            if kept is not None:
                same = same and kept.value == value
            elif kind == stored.kind and same and not (
                    field.salt and leaves.commitment(field.salt, name, kind, value) == stored.commitment):
                unconfirmed = unconfirmed or name
        if not same or kind != stored.kind or field.classification != stored.classification:
            return f"field {name!r}", ""
    return "", unconfirmed


def to_event(leaf: leaves.Leaf, values: dict[str, StoredValue]) -> pb.Event:
    event = pb.Event(
        event_id=leaf.event_id, sequence=leaf.sequence, event_type=leaf.event_type, time=_stamp(leaf.time_ns),
        correlation=common_pb2.Correlation(correlation_id=leaf.correlation_id, request_id=leaf.request_id,
                                           trace_id=leaf.trace_id, span_id=leaf.span_id, tenant=leaf.tenant,
                                           actor=leaf.actor),
        config=common_pb2.ConfigStamp(revision=leaf.config_revision, digest=leaf.config_digest),
        corrects_event_id=leaf.corrects_event_id,
    )
    for committed in leaf.fields:
        field = event.fields.add(name=committed.name, classification=committed.classification,
                                 commitment=common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256,
                                                              value=committed.commitment))
        stored = values.get(committed.name)
        if stored is None:
            field.redacted = True
        elif committed.kind == leaves.KIND_STRING:
            field.string_value, field.salt = stored.value.decode(), stored.salt
        else:
            field.bytes_value, field.salt = stored.value, stored.salt
    return event


def _signed(row: tuple[int, bytes, bytes, str]) -> pb.SignedCheckpoint:
    _, body, signature, _column = row
    # The key id the signature covers, not the index column beside it (which nothing signs).
    return pb.SignedCheckpoint(checkpoint=body, signature=signature, key_id=pb.Checkpoint.FromString(body).key_id)
