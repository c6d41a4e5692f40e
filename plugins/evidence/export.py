"""Export bundles, bounded: how many events and bytes one holds, and how many are built at once.

An export is built on a reader thread, not the log's (:mod:`.plane`): the
log thread only picks the signed checkpoint (signing one at the current size
when none is asked for), and the reader selects, reads and proves the events
against that checkpoint's tree size, so what is appended meanwhile is neither
read nor waited for. The bundle is built whole in memory and then streamed
in chunks, so its size is what bounds an export's memory: a selection over
``max_events`` events or ``max_bytes`` stored bytes (leaves, raw values and
their salts; the bundle carries them in base64, about 4/3 of that, plus the
proofs) is refused with :class:`~planes.kernel.errors.LimitExceeded` before
any value is copied. At most ``per_tenant`` exports of one tenant and
``process`` exports in all are built or streamed at once; over that, the
caller is told to retry after ``retry_after`` seconds.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.errors import InvalidArgument, LimitExceeded

from . import bundle
from .log import EvidenceLog, time_range


@dataclass(frozen=True)
class ExportLimits:
    """``[plugin.evidence]`` ``export_max_events``, ``export_max_bytes``, ``export_max_per_tenant``,
    ``export_max_concurrent``."""

    max_events: int = 100_000
    #: Stored bytes (leaves, values, salts): a 32 MiB selection is a bundle of about 43 MB. A bundle is
    #: built whole, so an export holds some 3-4 times this while it runs; with ``process`` exports at
    #: once, the default bounds them near 0.5 GB together.
    max_bytes: int = 32 << 20
    per_tenant: int = 2
    process: int = 4
    #: What a caller over the concurrency caps is told to wait before retrying, in seconds.
    retry_after: float = 5.0

    @classmethod
    def from_settings(cls, settings: dict) -> ExportLimits:
        defaults = cls()
        limits = cls(max_events=int(settings.get("export_max_events", defaults.max_events)),
                     max_bytes=int(settings.get("export_max_bytes", defaults.max_bytes)),
                     per_tenant=int(settings.get("export_max_per_tenant", defaults.per_tenant)),
                     process=int(settings.get("export_max_concurrent", defaults.process)))
        for name, value in (("export_max_events", limits.max_events), ("export_max_bytes", limits.max_bytes),
                            ("export_max_per_tenant", limits.per_tenant),
                            ("export_max_concurrent", limits.process)):
            if value < 1:
                raise InvalidArgument(f"[plugin.evidence] {name} must be at least 1, got {value}")
        return limits


class ExportSlots:
    """Admission of exports: at most ``per_tenant`` per tenant and ``process`` in all at once.

    Taken and released on the event loop's thread only (the servicer), so
    the counts need no lock.
    """

    def __init__(self, limits: ExportLimits):
        self.limits = limits
        self.running: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        limits, running = self.limits, self.running
        total = sum(running.values())
        if running[tenant] >= limits.per_tenant:
            raise LimitExceeded("export_max_per_tenant", limits.per_tenant, running[tenant] + 1,
                                retry_after=limits.retry_after,
                                message=f"tenant {tenant!r} has {running[tenant]} exports in progress, the most "
                                        f"allowed at once; retry when one has finished")
        if total >= limits.process:
            raise LimitExceeded("export_max_concurrent", limits.process, total + 1, retry_after=limits.retry_after,
                                message=f"{total} exports are in progress, the most this host builds at once; "
                                        "retry shortly")
        running[tenant] += 1
        try:
            yield
        finally:
            running[tenant] -= 1
            if not running[tenant]:
                del running[tenant]


def selection(request: pb.ExportBundleRequest) -> dict:
    """What an export request selects (refused without a correlation id or a time range)."""
    if not request.correlation_id and not request.HasField("start_time") and not request.HasField("end_time"):
        raise InvalidArgument("export needs a correlation_id or a time range")
    start_ns, end_ns = time_range(request.start_time if request.HasField("start_time") else None,
                                  request.end_time if request.HasField("end_time") else None)
    return {"correlation_id": request.correlation_id, "start_ns": start_ns, "end_ns": end_ns}


def choose_checkpoint(log: EvidenceLog, tree_size: int) -> pb.SignedCheckpoint:
    """The checkpoint an export proves against: at ``tree_size``, else one signed now (log thread)."""
    return log.checkpoint(tree_size) if tree_size else log.checkpoint_now()


def build(log: EvidenceLog, tenant: str, chosen: dict, signed: pb.SignedCheckpoint,
          limits: ExportLimits) -> tuple[bytes, int, int]:
    """The bundle of ``tenant``'s events ``chosen`` (:func:`selection`) in the tree ``signed`` covers:
    (bundle, event count, tree size). Only reads: any thread."""
    size = pb.Checkpoint.FromString(signed.checkpoint).tree_size
    rows = log.store.query(tenant, correlation_id=chosen["correlation_id"], start_ns=chosen["start_ns"],
                           end_ns=chosen["end_ns"], limit=limits.max_events + 1, through_sequence=size)
    if len(rows) > limits.max_events:
        raise LimitExceeded("export_max_events", limits.max_events, len(rows),
                            message=f"more than {limits.max_events} events selected (export_max_events); "
                                    "narrow the time range or export one correlation id")
    stored = sum(len(row.leaf) for row in rows) + log.store.value_bytes([row.sequence for row in rows])
    if stored > limits.max_bytes:
        raise LimitExceeded("export_max_bytes", limits.max_bytes, stored,
                            message=f"the {len(rows)} events selected hold {stored} bytes, more than "
                                    f"{limits.max_bytes} (export_max_bytes); narrow the time range")
    data = bundle.build(log=log, tenant=tenant, selection=chosen, rows=rows, tree_size=size, signed=signed)
    return data, len(rows), size
