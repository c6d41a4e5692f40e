"""The evidence writer the other planes use, and its outage spool.

When the evidence plane answers, events go straight to it. When it does not
(UNAVAILABLE, a deadline, a closed channel):

* events of a type marked evidence-required raise :class:`EvidenceUnavailable`
  before the caller does the side effect they describe: the work fails closed;
* other events go to a spool on local disk: bounded in bytes, each record
  AES-GCM-encrypted and chained to the one before (the previous record's hash
  is the associated data, so a removed, reordered or altered record fails to
  decrypt). :meth:`EvidenceWriter.replay` sends them in order once the plane
  is back, and removes each record only once it is delivered. When the bound is
  hit, the events that do not fit are counted, not kept, and one ``gap`` event
  records the range, the counts, the cause and the policy in force, after the
  replayed records. The counts are kept on disk, encrypted, until that event is
  delivered, so a restart does not lose them.

The spool key is a 0600 file made on first use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.errors import (AlreadyExists, Cancelled, DeadlineExceeded, EvidenceUnavailable, FailedPrecondition,
                                  Internal, InvalidArgument, Unavailable)
from planes.kernel.files import fsync_dir

__all__ = ["EvidenceUnavailable", "EvidenceWriter", "call_event", "Gap", "Spool", "SpoolCorrupted"]
from planes.kernel.secrets import ensure_private_dir, read_secret, write_replacing, write_secret

#: Opens a spool file in the current format; an older spool (records from the
#: start of the file, no header checksums) is read once and rewritten in it.
MAGIC = b"\x89SPOOL2\n"
_RECORD = struct.Struct(">I12sI")  # ciphertext length, nonce, CRC-32 of the two
_LEGACY_RECORD = struct.Struct(">I12s")
GENESIS = bytes(32)
_GAPS_AAD = b"planes evidence spool gaps v1"

log = logging.getLogger(__name__)
#: Answers that no retry changes: a spooled record that gets one is counted as lost, not retried forever.
REFUSED = (AlreadyExists, FailedPrecondition, InvalidArgument)


class SpoolCorrupted(Internal):
    reason = "EVIDENCE_SPOOL_CORRUPTED"


@dataclass
class Gap:
    first_ns: int = 0
    last_ns: int = 0
    events: int = 0
    batches: int = 0
    cause: str = ""
    #: The policy in force when the events were lost, kept with the counts: a gap event
    #: resent after a restart with another spool bound must be the same event.
    policy: str = ""


def _header(length: int, nonce: bytes) -> bytes:
    return _RECORD.pack(length, nonce, zlib.crc32(_LEGACY_RECORD.pack(length, nonce)))


class Spool:
    """An append-only file of encrypted, chained records with a byte bound.

    The file starts with :data:`MAGIC`; each record is a header (ciphertext
    length, nonce, CRC-32 of both) and the ciphertext. The checksum is what
    tells a crash from damage: only a last record cut short (an incomplete
    header, or a good header whose ciphertext runs past the end) is a write
    torn by a crash; any other mismatch is :class:`SpoolCorrupted`, and the
    file is left as it was.
    """

    def __init__(self, directory: Path, *, max_bytes: int):
        ensure_private_dir(directory)
        key_path = directory / "spool.key"
        write_secret(key_path, AESGCM.generate_key(bit_length=256))
        self._aead = AESGCM(read_secret(key_path))
        self.path = directory / "spool.log"
        #: Gaps not yet delivered, kept across restarts (see :class:`EvidenceWriter`).
        self.gaps_path = directory / "gaps.state"
        self.max_bytes = max_bytes
        self._tail = GENESIS
        #: Bytes cut from the end at start-up: a record torn by a crash while it
        #: was written, so never acknowledged to its caller.
        self.torn_bytes = self._open()

    def _open(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if data and data[:1] != MAGIC[:1] and data[1:len(MAGIC)] != MAGIC[1:]:
            data = self._migrate(data)
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            end = 0  # the crash hit the file's first write
        else:  # past the last whole record
            last = deque(_walk(self.path, data, torn_tail=True), maxlen=1)
            end = last[0][3] if last else len(MAGIC)
        if end < len(data):
            log.warning("evidence spool %s: cut %d bytes of a record torn by a crash", self.path, len(data) - end)
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
        if end <= len(MAGIC):  # no record: no spool (a file of the signature alone would look like a backlog)
            self.clear()
        last = deque(self._chain(), maxlen=1)  # the chain's tail; reading also checks every record decrypts
        self._tail = last[0][1] if last else GENESIS
        return len(data) - end

    def _migrate(self, data: bytes) -> bytes:
        """Rewrite a spool of the format before :data:`MAGIC` (same records, no checksums) in the current one."""
        out, at, previous = [MAGIC], 0, GENESIS
        while at < len(data):
            if at + _LEGACY_RECORD.size > len(data) or \
                    at + _LEGACY_RECORD.size + _LEGACY_RECORD.unpack_from(data, at)[0] > len(data):
                # That format cannot tell a torn last write from a damaged length.
                raise SpoolCorrupted(
                    f"evidence spool {self.path} (format without record checksums) has an incomplete record at "
                    f"offset {at}: a crash while it was written, or damage. If the process crashed, keep a copy, "
                    f"then truncate the file to {at} bytes and restart; otherwise restore it from a backup")
            length, nonce = _LEGACY_RECORD.unpack_from(data, at)
            ciphertext = data[at + _LEGACY_RECORD.size:at + _LEGACY_RECORD.size + length]
            try:
                self._aead.decrypt(nonce, ciphertext, previous)
            except InvalidTag:
                raise SpoolCorrupted(f"evidence spool {self.path}: record at offset {at} was altered, removed "
                                     f"or reordered") from None
            previous = hashlib.sha256(previous + ciphertext).digest()
            out += [_header(length, nonce), ciphertext]
            at += _LEGACY_RECORD.size + length
        migrated = b"".join(out)
        write_replacing(self.path, migrated)
        log.info("evidence spool %s: rewritten with record checksums", self.path)
        return migrated

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    @property
    def empty(self) -> bool:
        """No record waits (the file is absent, or holds the signature alone)."""
        return self.size <= len(MAGIC)

    def fits(self, payload: int) -> bool:
        return (self.size or len(MAGIC)) + _RECORD.size + payload + 16 <= self.max_bytes

    def append(self, plaintext: bytes) -> None:
        nonce = os.urandom(12)
        ciphertext = self._aead.encrypt(nonce, plaintext, self._tail)
        record = _header(len(ciphertext), nonce) + ciphertext
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            created = os.fstat(fd).st_size == 0
            os.write(fd, MAGIC + record if created else record)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self._tail = hashlib.sha256(self._tail + ciphertext).digest()

    def records(self) -> Iterator[bytes]:
        """Decrypted records in order, as the file was when iteration began; SpoolCorrupted names the first bad one.

        Reading changes nothing, so records may be appended while a caller
        walks an earlier snapshot.
        """
        for plaintext, _ in self._chain():
            yield plaintext

    def _chain(self) -> Iterator[tuple[bytes, bytes]]:
        """Each record's plaintext and the chain hash after it."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        previous = GENESIS
        for index, nonce, ciphertext, end in _walk(self.path, data, torn_tail=False):
            try:
                plaintext = self._aead.decrypt(nonce, ciphertext, previous)
            except InvalidTag:
                raise SpoolCorrupted(f"evidence spool record {index} was altered, removed or reordered "
                                     f"(offset {end - len(ciphertext) - _RECORD.size})") from None
            previous = hashlib.sha256(previous + ciphertext).digest()
            yield plaintext, previous

    def drop(self, count: int) -> None:
        """Remove the first ``count`` records (delivered ones), keeping any appended since they were read."""
        if count <= 0:
            return
        rest = list(self.records())[count:]
        if not rest:
            self.clear()
            return
        out, previous = [MAGIC], GENESIS
        for plaintext in rest:
            nonce = os.urandom(12)
            ciphertext = self._aead.encrypt(nonce, plaintext, previous)
            out += [_header(len(ciphertext), nonce), ciphertext]
            previous = hashlib.sha256(previous + ciphertext).digest()
        write_replacing(self.path, b"".join(out))
        self._tail = previous

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        self._tail = GENESIS

    def load_gaps(self) -> dict:
        """The gap state :meth:`save_gaps` last wrote, or an empty one."""
        try:
            data = self.gaps_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return json.loads(self._aead.decrypt(data[:12], data[12:], _GAPS_AAD))
        except (InvalidTag, ValueError):
            raise SpoolCorrupted(f"evidence spool gap state {self.gaps_path} is damaged: the counts of events "
                                 f"lost in an outage cannot be read; restore it from a backup") from None

    def save_gaps(self, state: dict) -> None:
        """Keep ``state`` durably and encrypted; an empty state removes the file."""
        if not state:
            if self.gaps_path.exists():
                self.gaps_path.unlink()
                fsync_dir(self.gaps_path.parent)
            return
        nonce = os.urandom(12)
        write_replacing(self.gaps_path, nonce + self._aead.encrypt(nonce, json.dumps(state).encode(), _GAPS_AAD))


def _walk(path: Path, data: bytes, *, torn_tail: bool) -> Iterator[tuple[int, bytes, bytes, int]]:
    """(index, nonce, ciphertext, end offset) of each record whose header checks.

    With ``torn_tail`` an incomplete last record ends the walk (the caller cuts
    it); without, it is SpoolCorrupted like any other damage.
    """
    if not data:
        return  # created, and the crash came before the first write
    if not data.startswith(MAGIC):
        raise SpoolCorrupted(f"evidence spool {path} does not start with the spool file signature")
    at, index = len(MAGIC), 0
    while at < len(data):
        if at + _RECORD.size > len(data):
            if torn_tail:
                return
            raise SpoolCorrupted(f"evidence spool record {index} (offset {at}) is truncated")
        length, nonce, check = _RECORD.unpack_from(data, at)
        if zlib.crc32(data[at:at + _LEGACY_RECORD.size]) != check:
            raise SpoolCorrupted(f"evidence spool {path}: the header of record {index} (offset {at}) is damaged; "
                                 f"the records from there on cannot be read")
        end = at + _RECORD.size + length
        if end > len(data):
            if torn_tail:
                return
            raise SpoolCorrupted(f"evidence spool record {index} (offset {at}) is truncated")
        yield index, nonce, data[at + _RECORD.size:end], end
        at, index = end, index + 1


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

    :meth:`record` and :meth:`replay` run on one event loop: the spool is only
    read, appended to and cut between awaits, so a record made while a replay
    waits on the plane is spooled behind the records being sent, and the
    replay removes only the records it has delivered.
    """

    def __init__(self, client, spool_dir: Path, *, required: Callable[[str], bool] = lambda _: False,
                 max_spool_bytes: int = 64 * 1024 * 1024, timeout: float = 5.0, clock=time.time):
        self.client = client
        self.spool = Spool(spool_dir, max_bytes=max_spool_bytes)
        self.required = required
        self.timeout = timeout
        self.clock = clock
        state = self.spool.load_gaps()
        #: Events that did not fit in the spool, per tenant, still being counted.
        self.gaps: dict[str, Gap] = {tenant: Gap(**gap) for tenant, gap in state.get("open", {}).items()}
        #: Gaps closed for sending, in order: their counts (and so their event
        #: ids) no longer change, so a resent gap event is a duplicate there.
        self.sealed: list[tuple[str, Gap]] = [(tenant, Gap(**gap)) for tenant, gap in state.get("sealed", [])]
        self._replaying = asyncio.Lock()

    @property
    def backlog(self) -> bool:
        return not self.spool.empty or bool(self.gaps) or bool(self.sealed)

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
        self._count_lost(request, cause)

    def _count_lost(self, request: pb.AppendEventsRequest, cause: str) -> None:
        now = int(self.clock() * 1e9)
        gap = self.gaps.setdefault(request.tenant, Gap())
        gap.first_ns = gap.first_ns or now
        gap.last_ns = now
        gap.events += len(request.events)
        gap.batches += 1
        gap.cause = cause
        gap.policy = gap.policy or self._policy()
        self._save_gaps()

    def _save_gaps(self) -> None:
        state = {}
        if self.gaps:
            state["open"] = {tenant: dataclasses.asdict(gap) for tenant, gap in self.gaps.items()}
        if self.sealed:
            state["sealed"] = [[tenant, dataclasses.asdict(gap)] for tenant, gap in self.sealed]
        self.spool.save_gaps(state)

    async def replay(self) -> int:
        """Send spooled batches in order, then a gap event for each tenant that lost some. Returns events sent.

        Runs until nothing is left, so records spooled meanwhile are sent too,
        after the earlier ones. A replay cut short by another outage has removed
        what it delivered and raises; running it again sends the rest.
        """
        async with self._replaying:
            sent = 0
            while self.backlog:
                delivered = 0
                try:
                    for plaintext in self.spool.records():
                        request = pb.AppendEventsRequest.FromString(plaintext)
                        try:
                            await self.client.append_events(request, timeout=self.timeout)
                        except REFUSED as exc:
                            # The log will never take this record (a replay it cannot confirm, a changed
                            # one, a malformed one): kept, it would block every record behind it, and so
                            # every evidence-required event, for good. It leaves as a counted gap instead.
                            log.error("evidence spool: the log refused a spooled batch of %d events for tenant "
                                      "%s (%s: %s); it is counted in a gap event and dropped",
                                      len(request.events), request.tenant, type(exc).__name__, exc.message)
                            self._count_lost(request, f"refused on replay: {type(exc).__name__}: {exc.message}")
                        else:
                            sent += len(request.events)
                        delivered += 1
                finally:
                    self.spool.drop(delivered)
                if not self.spool.empty:
                    continue  # spooled while this pass was sending
                if self.gaps:
                    # Counts go on in a new gap while these are sent.
                    self.sealed += sorted(self.gaps.items())
                    self.gaps = {}
                    self._save_gaps()
                while self.sealed:
                    tenant, gap = self.sealed[0]
                    await self.client.append_events(self._gap_request(tenant, gap), timeout=self.timeout)
                    del self.sealed[0]
                    self._save_gaps()
            return sent

    def _policy(self) -> str:
        return f"buffer, spool bound {self.spool.max_bytes} bytes"

    def _gap_request(self, tenant: str, gap: Gap) -> pb.AppendEventsRequest:
        event = pb.Event(event_id=f"gap:{tenant}:{gap.first_ns}:{gap.last_ns}:{gap.events}", event_type="gap",
                         correlation=common_pb2.Correlation(tenant=tenant, actor="evidence-writer"))
        for name, value in (("first_ns", gap.first_ns), ("last_ns", gap.last_ns), ("lost_events", gap.events),
                            ("lost_batches", gap.batches), ("cause", gap.cause),
                            ("policy", gap.policy or self._policy())):
            event.fields.add(name=name, string_value=str(value))
        return pb.AppendEventsRequest(tenant=tenant, events=[event])
