"""The evidence writer the other planes use, and its outage spool.

When the evidence plane answers, events go straight to it. When it does not
(UNAVAILABLE, a deadline, a closed channel):

* events of a type marked evidence-required raise :class:`EvidenceUnavailable`
  before the caller does the side effect they describe: the work fails closed;
* other events go to a spool on local disk: bounded in bytes, each record
  AES-GCM-encrypted and chained to the one before (the previous record's hash
  is the associated data, so a removed, reordered or altered record fails to
  decrypt). :meth:`EvidenceWriter.replay` sends them in order once the plane
  is back. When the bound is hit, the events that do not fit are counted, not
  kept, and one ``gap`` event records the range, the counts, the cause and the
  policy in force, after the replayed records.

The spool key is a 0600 file made on first use.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.errors import Cancelled, DeadlineExceeded, EvidenceUnavailable, Internal, Unavailable

__all__ = ["EvidenceUnavailable", "EvidenceWriter", "call_event", "Gap", "Spool", "SpoolCorrupted"]
from planes.kernel.secrets import read_secret, write_secret

_RECORD = struct.Struct(">I12s")  # ciphertext length, nonce
GENESIS = bytes(32)


class SpoolCorrupted(Internal):
    reason = "EVIDENCE_SPOOL_CORRUPTED"


@dataclass
class Gap:
    first_ns: int = 0
    last_ns: int = 0
    events: int = 0
    batches: int = 0
    cause: str = ""


class Spool:
    """An append-only file of encrypted, chained records with a byte bound."""

    def __init__(self, directory: Path, *, max_bytes: int):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path = directory / "spool.key"
        write_secret(key_path, AESGCM.generate_key(bit_length=256))
        self._aead = AESGCM(read_secret(key_path))
        self.path = directory / "spool.log"
        self.max_bytes = max_bytes
        self._tail = GENESIS
        self._records = 0
        #: Bytes cut from the end at start-up: a record torn by a crash while it
        #: was written, so never acknowledged to its caller.
        self.torn_bytes = self._cut_torn_tail()
        for _ in self.records():  # find the chain's tail; also checks the file
            pass

    def _cut_torn_tail(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        at = 0
        while at + _RECORD.size <= len(data):
            length, _ = _RECORD.unpack_from(data, at)
            if at + _RECORD.size + length > len(data):
                break
            at += _RECORD.size + length
        if at < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(at)
                os.fsync(handle.fileno())
        return len(data) - at

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def fits(self, payload: int) -> bool:
        return self.size + _RECORD.size + payload + 16 <= self.max_bytes

    def append(self, plaintext: bytes) -> None:
        nonce = os.urandom(12)
        ciphertext = self._aead.encrypt(nonce, plaintext, self._tail)
        with open(self.path, "ab") as handle:
            handle.write(_RECORD.pack(len(ciphertext), nonce) + ciphertext)
            handle.flush()
            os.fsync(handle.fileno())
        self._tail = hashlib.sha256(self._tail + ciphertext).digest()
        self._records += 1

    def records(self) -> Iterable[bytes]:
        """Decrypted records in order; SpoolCorrupted names the first bad one."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        at, previous, index = 0, GENESIS, 0
        while at < len(data):
            if at + _RECORD.size > len(data):
                raise SpoolCorrupted(f"evidence spool record {index} is truncated")
            length, nonce = _RECORD.unpack_from(data, at)
            end = at + _RECORD.size + length
            if end > len(data):
                raise SpoolCorrupted(f"evidence spool record {index} is truncated")
            ciphertext = data[at + _RECORD.size:end]
            try:
                plaintext = self._aead.decrypt(nonce, ciphertext, previous)
            except InvalidTag:
                raise SpoolCorrupted(f"evidence spool record {index} was altered, removed or reordered") from None
            previous = hashlib.sha256(previous + ciphertext).digest()
            self._tail = previous
            yield plaintext
            at, index = end, index + 1

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._tail = GENESIS


def call_event(source: str, call, tenant: str, event_type: str, **fields) -> pb.Event:
    """An event recording what ``call`` did: its correlation, the caller as actor, ``fields`` as internal text.

    ``source`` prefixes the random event id (``control``, ``data``...).
    """
    event = pb.Event(event_id=f"{source}:{event_type}:{os.urandom(12).hex()}", event_type=event_type,
                     correlation=common_pb2.Correlation(correlation_id=call.correlation_id, request_id=call.request_id,
                                                        trace_id=call.trace.trace_id, tenant=tenant,
                                                        actor=call.identity.principal))
    for name, value in fields.items():
        event.fields.add(name=name, string_value=str(value), classification=common_pb2.CLASSIFICATION_INTERNAL)
    return event


class EvidenceWriter:
    """Records events through an evidence plane client, surviving its outages.

    ``required`` tells whether an event type is evidence-required (fail closed).
    """

    def __init__(self, client, spool_dir: Path, *, required: Callable[[str], bool] = lambda _: False,
                 max_spool_bytes: int = 64 * 1024 * 1024, timeout: float = 5.0, clock=time.time):
        self.client = client
        self.spool = Spool(spool_dir, max_bytes=max_spool_bytes)
        self.required = required
        self.timeout = timeout
        self.clock = clock
        #: Events that did not fit in the spool, per tenant.
        self.gaps: dict[str, Gap] = {}

    @property
    def backlog(self) -> bool:
        return self.spool.size > 0 or bool(self.gaps)

    async def record(self, tenant: str, events: list[pb.Event]) -> None:
        """Append ``events``; raises EvidenceUnavailable for required ones during an outage."""
        request = pb.AppendEventsRequest(tenant=tenant, events=events)
        if not self.backlog:
            try:
                await self.client.append_events(request, timeout=self.timeout)
                return
            except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                cause = f"{type(exc).__name__}: {exc.message}"
        else:
            cause = "evidence plane unavailable (earlier records still spooled)"
        needed = [e.event_type for e in events if self.required(e.event_type)]
        if needed:
            raise EvidenceUnavailable(
                f"evidence-required event {needed[0]} cannot be recorded ({cause}); the work must not proceed")
        self._spool(request, cause)

    def _spool(self, request: pb.AppendEventsRequest, cause: str) -> None:
        payload = request.SerializeToString()
        if self.spool.fits(len(payload)):
            self.spool.append(payload)
            return
        now = int(self.clock() * 1e9)
        gap = self.gaps.setdefault(request.tenant, Gap())
        gap.first_ns = gap.first_ns or now
        gap.last_ns = now
        gap.events += len(request.events)
        gap.batches += 1
        gap.cause = cause

    async def replay(self) -> int:
        """Send spooled batches in order, then the gap event if any were lost. Returns events sent.

        A batch the plane already has is a duplicate there, so a replay cut
        short by another outage is safe to run again.
        """
        sent = 0
        for plaintext in self.spool.records():
            request = pb.AppendEventsRequest.FromString(plaintext)
            await self.client.append_events(request, timeout=self.timeout)
            sent += len(request.events)
        for tenant in sorted(self.gaps):
            await self.client.append_events(self._gap_request(tenant, self.gaps[tenant]), timeout=self.timeout)
            del self.gaps[tenant]
        self.spool.clear()
        return sent

    def _gap_request(self, tenant: str, gap: Gap) -> pb.AppendEventsRequest:
        event = pb.Event(event_id=f"gap:{tenant}:{gap.first_ns}:{gap.last_ns}:{gap.events}", event_type="gap",
                         correlation=common_pb2.Correlation(tenant=tenant, actor="evidence-writer"))
        for name, value in (("first_ns", gap.first_ns), ("last_ns", gap.last_ns), ("lost_events", gap.events),
                            ("lost_batches", gap.batches), ("cause", gap.cause),
                            ("policy", f"buffer, spool bound {self.spool.max_bytes} bytes")):
            event.fields.add(name=name, string_value=str(value))
        return pb.AppendEventsRequest(tenant=tenant, events=[event])
