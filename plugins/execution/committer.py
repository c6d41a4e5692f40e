"""Group commit: many requests, one transaction, one evidence append, one fsync.

Every operation of the execution plane is a function of a :class:`Tx`, queued
from the event loop and run on one thread against the store. Operations that
arrive while a batch commits form the next batch, so under load the cost of a
commit (an fsync) and of an evidence append is shared by the whole batch,
while an idle plane still answers one request at once.

Each operation runs inside a savepoint: one that raises is undone alone and
its caller gets the error. The batch's evidence events are recorded before
its transaction commits, and a caller is answered only after both:

* events of evidence-required tasks go through a writer that never spools.
  If the evidence plane cannot take them, the transaction is rolled back and
  replayed without those operations, which fail with
  :class:`~planes.plugins.evidence.writer.EvidenceUnavailable`: nothing they
  describe happened (fail closed). A transaction carries such events for one
  tenant only (one append, all or nothing): with several, the operations of
  the others go to the next batch. Otherwise one tenant's failure, after
  another's events were recorded, would roll back effects that evidence
  already names, and since event ids name the task version, the real
  transition made later would be taken for a replay of them;
* other events go through a writer that spools them, encrypted and bounded,
  during an outage (with a gap event for any that do not fit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.kernel.errors import Internal, PlanesError

from .store import TERMINAL_STATES, TaskStore

log = logging.getLogger("planes.execution.committer")


class BatchWrites:
    """The tasks and transitions a batch changed, written once when the batch ends.

    Operations see each other's changes through it (a task changed by an
    earlier operation of the batch is read from here, not from the store),
    and the store gets one multi-row write per table instead of one
    statement per change.
    """

    def __init__(self, store: TaskStore):
        self.store = store
        self.tasks: dict[str, Any] = {}
        self.new: dict[str, bytes] = {}
        self.keys: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.enqueued: dict[str, int] = {}
        self.transitions: list[tuple] = []
        #: tenant -> tasks this batch inserted that are not yet ended: the
        #: store cannot count them before the batch is written.
        self.unfinished: dict[str, int] = defaultdict(int)
        self._order = 0

    def merge(self, tx: Tx) -> None:
        for task_id, digest, tenant, key in tx.inserted:
            self.new[task_id] = digest
            if key:
                self.keys[(tenant, key)] = (task_id, digest)
        for tenant, count in tx.unfinished_inserts().items():
            self.unfinished[tenant] += count
        for task_id, (task, enqueue) in tx.dirty.items():
            self.tasks[task_id] = task
            if enqueue:
                self._order += 1
                self.enqueued[task_id] = self._order
        self.transitions.extend(tx.transitions)

    def write(self) -> None:
        if not self.tasks and not self.transitions:
            return
        inserts, updates = [], []
        for task_id, task in self.tasks.items():
            enqueue = self.enqueued.get(task_id)
            if task_id in self.new:
                inserts.append((task, self.new[task_id], enqueue))
            else:
                updates.append((task, enqueue))
        # Queue order follows the order of enqueueing inside the batch.
        inserts.sort(key=lambda item: item[2] or 0)
        updates.sort(key=lambda item: item[1] or 0)
        self.store.write_tasks(inserts, updates, self.transitions)


class Tx:
    """What one operation sees: the batch's view of the store, the time, and where its effects go."""

    __slots__ = ("batch", "store", "now", "events", "after", "dirty", "inserted", "transitions", "_stamp")

    def __init__(self, batch: BatchWrites, now: float):
        self.batch = batch
        self.store = batch.store
        self.now = now
        #: (tenant, event, evidence_required)
        self.events: list[tuple[str, epb.Event, bool]] = []
        #: Called on the event loop once the batch is committed.
        self.after: list[Callable[[], None]] = []
        #: task_id -> (task, enqueue): this operation's changes.
        self.dirty: dict[str, tuple[Any, bool]] = {}
        self.inserted: list[tuple[str, bytes, str, str]] = []
        self.transitions: list[tuple] = []
        self._stamp = None

    def stamp(self):
        """``now`` as a protobuf Timestamp, made once per operation."""
        if self._stamp is None:
            from google.protobuf import timestamp_pb2
            self._stamp = timestamp_pb2.Timestamp()
            self._stamp.FromNanoseconds(int(self.now * 1e9))
        return self._stamp

    def emit(self, tenant: str, event: epb.Event, required: bool) -> None:
        self.events.append((tenant, event, required))

    # -- reads through the batch --------------------------------------------------

    def task(self, task_id: str):
        """The task as the batch has it so far: a copy the operation may change."""
        known = self.dirty.get(task_id)
        if known is not None:
            return known[0]
        cached = self.batch.tasks.get(task_id)
        if cached is None:
            return self.store.task(task_id)
        copy = type(cached)()
        copy.CopyFrom(cached)
        return copy

    def by_idempotency_key(self, tenant: str, key: str) -> tuple[str, bytes] | None:
        for task_id, digest, owner, used in self.inserted:
            if (owner, used) == (tenant, key):
                return task_id, digest
        return self.batch.keys.get((tenant, key)) or self.store.by_idempotency_key(tenant, key)

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's tasks not yet ended, counting those inserted earlier in the batch and by this operation.

        (A task that ends within the batch it was inserted in still counts
        until the batch is written: the error is on the safe side.)
        """
        return (self.store.count_unfinished(tenant) + self.batch.unfinished.get(tenant, 0)
                + self.unfinished_inserts().get(tenant, 0))

    def unfinished_inserts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for task_id, _, tenant, _ in self.inserted:
            if self.dirty[task_id][0].state not in TERMINAL_STATES:
                counts[tenant] += 1
        return counts

    def queued(self, tenant: str | None, limit: int) -> list:
        # Tasks this batch already changed are skipped (those it queued are
        # leased by the next batch).
        exclude = self.batch.tasks.keys() | self.dirty.keys() if self.batch.tasks or self.dirty else frozenset()
        return self.store.queued(tenant, limit, exclude)

    def expired_leases(self, limit: int) -> list:
        return [task for task in self.store.expired_leases(self.now, limit)
                if task.task_id not in self.batch.tasks and task.task_id not in self.dirty]

    # -- writes, deferred to the end of the batch ---------------------------------------

    def insert_task(self, task, spec_digest: bytes) -> None:
        self.inserted.append((task.task_id, spec_digest, task.tenant, task.spec.idempotency_key))
        self.dirty[task.task_id] = (task, False)

    def add_transition(self, task_id: str, version: int, previous_state: int, reason: str, body: bytes) -> None:
        self.transitions.append((task_id, version, previous_state, reason, body))


@dataclass(eq=False)
class _Op:
    function: Callable[[Tx], Any]
    future: asyncio.Future
    result: Any = None
    error: BaseException | None = None
    events: list = field(default_factory=list)
    after: list = field(default_factory=list)

    @property
    def required(self) -> bool:
        return any(required for _, _, required in self.events)

    @property
    def strict_tenants(self) -> set[str]:
        """The tenants this operation records evidence-required events for."""
        return {tenant for tenant, _, required in self.events if required}


class Committer:
    """Runs operations in batched transactions with their evidence; see the module docstring."""

    def __init__(self, store: TaskStore, strict_writer, buffered_writer, *, max_batch: int = 1024,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.strict = strict_writer
        self.buffered = buffered_writer
        self.max_batch = max_batch
        self.clock = clock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="execution-store")
        self._pending: list[_Op] = []
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        #: Batches committed and operations in them, for the benchmark's report.
        self.batches = 0
        self.operations = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        for op in self._pending:
            if not op.future.done():
                op.future.set_exception(Internal("execution plane stopping"))
        self._thread.shutdown(wait=True)

    async def run(self, function: Callable[[Tx], Any]) -> Any:
        """Run ``function(tx)`` in the next batch; its result once durable and in evidence."""
        if self._wake is None:
            raise Internal("execution committer not started")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(function, future))
        self._wake.set()
        return await future

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                try:
                    await self._commit(batch)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # never leave a caller waiting, nor a transaction open
                    log.exception("execution batch failed")
                    try:
                        await self._in_thread(self.store.rollback)
                    except Exception:
                        log.exception("rollback after a failed batch failed")
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(exc if isinstance(exc, PlanesError)
                                                    else Internal("execution store failure"))

    def _apply(self, batch: list[_Op]) -> None:
        store = self.store
        now = self.clock()
        store.begin()
        writes = BatchWrites(store)
        for op in batch:
            if op.error is not None:
                continue
            tx = Tx(writes, now)
            store.savepoint()
            try:
                op.result = op.function(tx)
            except Exception as exc:
                store.undo()
                op.error = exc
                op.events, op.after = [], []
                continue
            store.release()
            writes.merge(tx)
            op.events, op.after = tx.events, tx.after
        writes.write()

    async def _commit(self, batch: list[_Op]) -> None:
        from planes.plugins.evidence.writer import EvidenceUnavailable

        refused: list[_Op] = []  # answered with an error, not run again
        later: list[_Op] = []  # for the next batch
        while True:
            for op in batch:
                op.error, op.result = None, None
            await self._in_thread(self._apply, batch)
            live = [op for op in batch if op.error is None]
            tenants = list(dict.fromkeys(tenant for op in live for tenant in op.strict_tenants))
            if len(tenants) > 1:
                # Evidence-required events of one tenant per transaction: if
                # a second tenant's evidence failed after the first's was
                # recorded, the first's could not be taken back, and would
                # name effects the rollback undid (and, by their ids, make the
                # real ones look like replays). The others wait for the next batch.
                await self._in_thread(self.store.rollback)
                for op in live:
                    if len(op.strict_tenants) > 1:
                        log.error("an execution operation wrote evidence-required events of %d tenants",
                                  len(op.strict_tenants))
                        op.error = Internal("one operation may record evidence-required events of one tenant only")
                        refused.append(op)
                    elif op.strict_tenants and tenants[0] not in op.strict_tenants:
                        later.append(op)
                out = set(refused) | set(later)
                batch = [op for op in batch if op not in out]
                continue
            strict_tenant = tenants[0] if tenants else None
            if strict_tenant is not None:
                events = [event for op in live if op.strict_tenants
                          for tenant, event, _ in op.events if tenant == strict_tenant]
                try:
                    await self.strict.record(strict_tenant, events)
                except EvidenceUnavailable as exc:
                    # Nothing was recorded: undo everything and run the batch
                    # again without the operations that needed it.
                    await self._in_thread(self.store.rollback)
                    failed = [op for op in live if op.strict_tenants]
                    for op in failed:
                        op.error = exc
                    refused += failed
                    failed_set = set(failed)
                    batch = [op for op in batch if op not in failed_set]
                    continue
            break
        # Everything else, spooled during an outage: other operations'
        # events, and events of other tenants that evidence-required ones made.
        buffered: dict[str, list[epb.Event]] = defaultdict(list)
        for op in batch:
            if op.error is None:
                for tenant, event, _ in op.events:
                    if not (op.strict_tenants and tenant == strict_tenant):
                        buffered[tenant].append(event)
        for tenant, events in buffered.items():
            try:
                await self.buffered.record(tenant, events)
            except PlanesError:
                log.exception("evidence writer refused %d events of tenant %s", len(events), tenant)
        await self._in_thread(self.store.commit)
        self._pending[:0] = later
        self.batches += 1
        self.operations += len(batch) + len(refused)
        for op in refused + batch:
            if op.future.done():
                continue
            if op.error is not None:
                op.future.set_exception(op.error)
                continue
            for hook in op.after:
                hook()
            op.future.set_result(op.result)
