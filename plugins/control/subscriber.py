"""Bounded cached configuration: what a host runs under, and for how long.

A subscriber (an execution host, a worker) applies only snapshots that
verify: the Ed25519 signature over the header bytes exactly as sent, the
content digest, the validity window, a revision above every one it has
applied (anti-rollback, kept in a high-water file that survives restarts),
and the plane contracts it serves. It keeps the last good snapshot on disk,
written atomically, so a restart works offline. A cache refused at start-up
(damaged, foreign) leaves it running on nothing: then the revision it last
applied is accepted again, since fetching it afresh is no rollback.

While it hears from the control plane (a watch message, a status reply) it
renews its lease; the lease length comes from the snapshot. When the lease
runs out it moves to the state the snapshot's policy names (degraded, or stop
admitting); past the snapshot's expiry it always stops admitting. It never
switches to an unverified or unknown configuration. The clock is injectable,
so every path is tested deterministically.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel import digests
from planes.kernel.contract import ContractVersion
from planes.kernel.errors import LimitExceeded, PermissionDenied, Unauthenticated
from planes.kernel.secrets import ensure_private_dir

from .delta import DeltaUnusable, element_bounds, rebuild

log = logging.getLogger(__name__)

SNAPSHOT_CONTEXT = b"planes.control.v1.Snapshot\x00"
SNAPSHOT_FILE = "snapshot.bin"
STATE_FILE = "subscriber.json"


def content_digest(content: bytes) -> common_pb2.Digest:
    """A snapshot's content digest: BLAKE3, as every subscriber hashes the whole content on every push.

    On this CPU (no SHA extensions) SHA-256 of 1,000 resources cost about
    0.5 ms per subscriber, most of a push to 100 (bench/RESULTS.md, control
    section). Subscribers accept any algorithm of ``planes.kernel.digests``,
    so SHA-256 snapshots cached before the change stay valid.
    """
    return digests.digest(digests.BLAKE3, content)


class ConfigState(enum.Enum):
    #: No verified snapshot yet: nothing is admitted.
    EMPTY = "empty"
    #: Running under a verified snapshot within its lease.
    ACTIVE = "active"
    #: Lease ran out; the snapshot's policy says keep serving, reported degraded.
    DEGRADED = "degraded"
    #: Lease ran out (or the snapshot expired): finish admitted work, admit nothing new.
    STOP_ADMITTING = "stop_admitting"


class SnapshotRejected(Exception):
    """A snapshot was refused; ``reason`` is the NackReason to report."""

    def __init__(self, reason: int, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def reason_name(self) -> str:
        return pb.NackReason.Name(self.reason)


@dataclass(frozen=True)
class VerifiedSnapshot:
    header: pb.Snapshot
    signed: pb.SignedSnapshot

    @property
    def revision(self) -> int:
        return self.header.revision

    def content(self) -> pb.SnapshotContent:
        return pb.SnapshotContent.FromString(self.signed.content)


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def verify_snapshot(signed: pb.SignedSnapshot, keys: dict[str, Ed25519PublicKey], now: float | None,
                    served: dict[str, ContractVersion] | None = None) -> VerifiedSnapshot:
    """Check a snapshot before parsing what it says; SnapshotRejected otherwise.

    ``now`` None skips the validity window (for reloading the cache, whose
    window :meth:`CachedConfig.state` judges).
    """
    key = keys.get(signed.key_id)
    if key is None:
        raise SnapshotRejected(pb.NACK_REASON_UNKNOWN_KEY, f"snapshot signed by unknown key {signed.key_id!r}")
    try:
        key.verify(signed.signature, SNAPSHOT_CONTEXT + signed.snapshot)
    except InvalidSignature:
        raise SnapshotRejected(pb.NACK_REASON_BAD_SIGNATURE, "snapshot signature does not verify") from None
    header = pb.Snapshot.FromString(signed.snapshot)
    if header.key_id != signed.key_id:
        raise SnapshotRejected(pb.NACK_REASON_BAD_SIGNATURE, "snapshot key id differs from its signature's")
    digest = header.content_digest
    hasher = digests.HASHES.get(digest.algorithm)
    if hasher is None or hasher(signed.content).digest() != digest.value:
        raise SnapshotRejected(pb.NACK_REASON_DIGEST_MISMATCH,
                               f"content of revision {header.revision} does not match its digest")
    if now is not None and now < _seconds(header.not_before):
        raise SnapshotRejected(pb.NACK_REASON_NOT_YET_VALID, f"revision {header.revision} is not valid yet")
    if now is not None and now >= _seconds(header.expires_at):
        raise SnapshotRejected(pb.NACK_REASON_EXPIRED, f"revision {header.revision} has expired")
    for needed in header.required_contracts:
        # A requirement on a plane this host serves must be met by the version it serves; one on a plane
        # it does not serve (a worker and the data plane, say) is the concern of the hosts that do.
        have = (served or {}).get(needed.plane)
        want = ContractVersion(needed.major, needed.minor)
        if have is not None and not have.serves(want):
            raise SnapshotRejected(
                pb.NACK_REASON_MISSING_CONTRACT,
                f"revision {header.revision} needs the {needed.plane} contract {want}; this host serves {have}")
    return VerifiedSnapshot(header, signed)


def control_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """The control plane's public key in a PEM file, by key id: what a :class:`CachedConfig` verifies with."""
    from planes.kernel.tokens import key_id, load_public_key

    public = load_public_key(path)
    return {key_id(public): public}


class CachedConfig:
    """The subscriber's current configuration, its lease, and its disk cache."""

    def __init__(self, directory: Path, keys: dict[str, Ed25519PublicKey], *,
                 served: dict[str, ContractVersion] | None = None, clock: Callable[[], float] = time.time):
        ensure_private_dir(directory)
        self.directory = directory
        self.keys = dict(keys)
        self.served = dict(served or {})
        self.clock = clock
        self.current: VerifiedSnapshot | None = None
        self._bounds: list[int] | None = None       # element bounds of the current content, for the next delta
        self.last_contact = 0.0
        self.high_water = 0
        self.load_problem = ""
        self._load()

    # -- persistence ----------------------------------------------------------

    def _load(self) -> None:
        state_problem = self._load_state()
        self._load_snapshot()
        if state_problem:
            if self.current is not None:
                floor = (f"anti-rollback floor kept from the cached snapshot (revision {self.high_water}); "
                         "the lease starts again at the next contact with the control plane")
            else:
                floor = ("anti-rollback floor lost (no valid cached snapshot to recover it from): the next "
                         "correctly signed revision will be accepted whatever its number")
            log.warning("%s; %s", state_problem, floor)

    def _load_state(self) -> str:
        """Read the high-water mark and last contact; a problem to report, or ""."""
        state_path = self.directory / STATE_FILE
        if not state_path.exists():
            return ""
        try:
            state = json.loads(state_path.read_text())
            high_water = int(state.get("high_water", 0))
            last_contact = float(state.get("last_contact", 0.0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Treated like a damaged cache: what it held is recovered where it
            # can be, and the control plane is asked afresh.
            return f"{state_path} is damaged and was ignored ({type(exc).__name__}: {exc})"
        self.high_water, self.last_contact = high_water, last_contact
        return ""

    def _load_snapshot(self) -> None:
        snapshot_path = self.directory / SNAPSHOT_FILE
        if not snapshot_path.exists():
            return
        try:
            signed = pb.SignedSnapshot.FromString(snapshot_path.read_bytes())
            # The window is not checked here: an expired cached snapshot is
            # kept, but never admits work; state() says so.
            verified = verify_snapshot(signed, self.keys, None, self.served)
        except Exception as exc:  # a damaged or foreign cache: run with nothing rather than with it
            self.load_problem = f"cached snapshot refused: {exc or type(exc).__name__}"
            log.warning("%s: %s; admitting nothing until the control plane sends revision %d or newer",
                        snapshot_path, self.load_problem, max(self.high_water, 1))
            return
        if verified.revision < self.high_water:
            self.load_problem = (f"cached snapshot revision {verified.revision} is older than revision "
                                 f"{self.high_water} applied before: refused (rollback)")
            log.warning("%s: %s", snapshot_path, self.load_problem)
            return
        self.current = verified
        # The state file lags the snapshot after a crash between the two writes.
        self.high_water = max(self.high_water, verified.revision)

    def _write_atomically(self, name: str, data: bytes) -> None:
        path = self.directory / name
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _save_state(self) -> None:
        self._write_atomically(STATE_FILE, json.dumps(
            {"high_water": self.high_water, "last_contact": self.last_contact}).encode())

    # -- applying ---------------------------------------------------------------

    def offer(self, signed: pb.SignedSnapshot, bounds: list[int] | None = None) -> VerifiedSnapshot:
        """Verify and apply a snapshot atomically; SnapshotRejected with the NACK reason otherwise.

        Offering the snapshot already applied (same bytes) is a no-op, not a
        NACK: a watch that reconnects may deliver it again. ``bounds``: the
        content's element bounds when the caller has them (a rebuilt delta).
        """
        now = self.clock()
        if self.current is not None and signed.snapshot == self.current.signed.snapshot \
                and signed.content == self.current.signed.content:
            self.heard_from_control()
            return self.current
        verified = verify_snapshot(signed, self.keys, now, self.served)
        if self.current is not None:
            floor = max(self.high_water, self.current.revision)
            if verified.revision <= floor:
                raise SnapshotRejected(pb.NACK_REASON_STALE_REVISION,
                                       f"revision {verified.revision} is not newer than revision {floor} "
                                       "already applied (rollback or replay)")
        elif verified.revision < self.high_water:
            # Running on nothing (the cache was refused): the revision trusted
            # last is welcome again, as re-fetching it is no rollback.
            raise SnapshotRejected(pb.NACK_REASON_STALE_REVISION,
                                   f"revision {verified.revision} is older than revision {self.high_water} "
                                   "applied before (rollback or replay)")
        self._write_atomically(SNAPSHOT_FILE, signed.SerializeToString())
        self.current = verified
        self.load_problem = ""
        self._bounds = bounds
        if bounds is None:
            # Where the next delta's elements are: found now, while applying
            # is slow anyway, rather than on the push that needs them.
            with contextlib.suppress(ValueError):
                self._bounds = element_bounds(signed.content)
        self.high_water = verified.revision
        self.last_contact = now
        self._save_state()
        return verified

    def offer_delta(self, delta: pb.SnapshotDelta) -> VerifiedSnapshot:
        """Rebuild a revision from the current one and :meth:`offer` it.

        DeltaUnusable when the delta cannot be applied here (another base,
        runs that do not fit, or content that does not match the signed
        digest): fetch the full snapshot then. Any other refusal is the
        revision's own, a SnapshotRejected as for the full snapshot.
        """
        current = self.current
        if current is None or current.revision != delta.base_revision:
            raise DeltaUnusable(f"the delta is against revision {delta.base_revision}; this subscriber runs "
                                f"{current.revision if current else 'none'}")
        if self._bounds is None:
            try:
                self._bounds = element_bounds(current.signed.content)
            except ValueError as exc:
                raise DeltaUnusable(f"the current content has no elements to build on: {exc}") from None
        content, bounds = rebuild(delta.runs, current.signed.content, self._bounds)
        signed = pb.SignedSnapshot()
        signed.CopyFrom(delta.snapshot)
        signed.content = content
        try:
            return self.offer(signed, bounds)
        except SnapshotRejected as rejected:
            if rejected.reason == pb.NACK_REASON_DIGEST_MISMATCH:
                raise DeltaUnusable(f"content rebuilt on revision {delta.base_revision} does not match "
                                    "the signed digest") from None
            raise

    def heard_from_control(self) -> None:
        """The control plane answered: the lease starts again from now."""
        self.last_contact = self.clock()
        self._save_state()

    # -- state --------------------------------------------------------------------

    def state(self) -> tuple[ConfigState, str]:
        current = self.current
        if current is None:
            return ConfigState.EMPTY, self.load_problem or "no verified configuration yet"
        now = self.clock()
        header = current.header
        if now >= _seconds(header.expires_at):
            return ConfigState.STOP_ADMITTING, f"revision {header.revision} expired"
        if now < _seconds(header.not_before):
            return ConfigState.STOP_ADMITTING, f"revision {header.revision} is not valid yet (clock moved back?)"
        lease = header.lease.seconds + header.lease.nanos / 1e9
        if now < self.last_contact + lease:
            return ConfigState.ACTIVE, f"revision {header.revision}"
        if header.on_lease_expiry == pb.LEASE_EXPIRY_POLICY_DEGRADED:
            return ConfigState.DEGRADED, f"revision {header.revision}: control plane silent past the lease"
        return ConfigState.STOP_ADMITTING, f"revision {header.revision}: control plane silent past the lease"

    def admitting(self) -> bool:
        return self.state()[0] in (ConfigState.ACTIVE, ConfigState.DEGRADED)


_HEALTH = {ConfigState.ACTIVE: common_pb2.HealthSummary.STATE_HEALTHY,
           ConfigState.DEGRADED: common_pb2.HealthSummary.STATE_DEGRADED}


def config_health(cache: CachedConfig) -> common_pb2.HealthSummary:
    """A host's health as its configuration makes it: healthy only while admitting under a live lease."""
    state, reason = cache.state()
    return common_pb2.HealthSummary(state=_HEALTH.get(state, common_pb2.HealthSummary.STATE_STOP_ADMITTING),
                                    reason=f"configuration {state.value}: {reason}")


class SnapshotSubscriber:
    """Keeps a :class:`CachedConfig` in step with the control plane.

    Watches for snapshots, offers each to the cache (verify, then apply
    atomically), and reports ACK or NACK with health and capacity (never
    payloads). Every message from the control plane renews the lease; when
    the stream breaks it retries with capped backoff, running on the cache
    meanwhile. ``control`` is a control-plane client (in-process or remote).
    ``health`` defaults to what the cache's state says (:func:`config_health`).
    """

    def __init__(self, control, cache: CachedConfig, subscriber_id: str, *,
                 contracts: list[common_pb2.ContractVersion] | None = None,
                 health: Callable[[], common_pb2.HealthSummary] | None = None,
                 capacity: Callable[[], common_pb2.CapacitySummary] | None = None,
                 on_applied: Callable[[VerifiedSnapshot], None] | None = None,
                 max_backoff: float = 10.0):
        self.control = control
        self.cache = cache
        self.subscriber_id = subscriber_id
        self.contracts = list(contracts or [])
        self.health = health or (lambda: config_health(cache))
        self.capacity = capacity or common_pb2.CapacitySummary
        self.on_applied = on_applied
        self.max_backoff = max_backoff
        self.last_error = ""

    async def report(self, revision: int = 0, rejected: SnapshotRejected | None = None) -> int:
        request = pb.ReportStatusRequest(
            subscriber_id=self.subscriber_id,
            applied_revision=self.cache.current.revision if self.cache.current else 0,
            revision=revision, health=self.health(), capacity=self.capacity(), contract_versions=self.contracts)
        if revision:
            request.outcome = pb.APPLY_OUTCOME_NACK if rejected else pb.APPLY_OUTCOME_ACK
        if rejected is not None:
            request.nack_reason = rejected.reason
            request.error = rejected.message
        reply = await self.control.report_status(request, timeout=10)
        self.cache.heard_from_control()
        return reply.target_revision

    async def handle(self, message: pb.WatchSnapshotsResponse) -> None:
        """Verify and apply one pushed snapshot, then report the outcome.

        A keepalive (no snapshot) renews the lease and is answered with a
        periodic health and capacity report.
        """
        self.cache.heard_from_control()
        if not message.HasField("snapshot") and not message.HasField("delta"):
            await self.report()
            return
        revision = message.target_revision
        try:
            if message.HasField("delta"):
                applied = await self._apply_delta(message.delta, revision)
            else:
                applied = self.cache.offer(message.snapshot)
        except SnapshotRejected as rejected:
            await self.report(revision, rejected)
            return
        if self.on_applied is not None:
            self.on_applied(applied)
        await self.report(applied.revision)

    async def _apply_delta(self, delta: pb.SnapshotDelta, revision: int) -> VerifiedSnapshot:
        try:
            return self.cache.offer_delta(delta)
        except DeltaUnusable as unusable:
            self.last_error = f"delta to revision {revision} unusable ({unusable}); fetched the full snapshot"
        reply = await self.control.get_snapshot(pb.GetSnapshotRequest(revision=revision), timeout=30)
        return self.cache.offer(reply.snapshot)

    async def run(self) -> None:
        """Watch until cancelled."""
        import asyncio

        backoff = 0.1
        while True:
            known = self.cache.current.revision if self.cache.current else 0
            request = pb.WatchSnapshotsRequest(subscriber_id=self.subscriber_id, known_revision=known,
                                               contract_versions=self.contracts)
            try:
                async for message in self.control.watch_snapshots(request):
                    backoff = 0.1
                    await self.handle(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the control plane is unreachable or refuses: run on the cache, retry
                error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                if error != self.last_error:  # said once, not at every retry
                    refused = isinstance(exc, (PermissionDenied, Unauthenticated, LimitExceeded))
                    log.log(logging.ERROR if refused else logging.WARNING,
                            "snapshot subscriber %s: %s; running on the cached configuration and retrying",
                            self.subscriber_id, error)
                self.last_error = error
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)
