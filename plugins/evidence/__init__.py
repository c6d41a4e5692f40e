"""The evidence plane plugin: a hash-chained, Merkle-checkpointed, append-only log.

Settings (``[plugin.evidence]``): ``checkpoint_every`` (events, default 1000),
``checkpoint_seconds`` (default 5), ``synchronous`` (SQLite, default ``FULL``),
``encode_threads`` (threads that encode a batch of 256 events or more, default 2),
``retention`` (a table of event type -> seconds after which raw values are
pruned, until the control plane provides retention rules); exports:
``export_max_events`` (default 100000) and ``export_max_bytes`` (stored bytes of
leaves, raw values and salts, default 32 MiB) per bundle, ``export_max_per_tenant``
(default 2) and ``export_max_concurrent`` (default 4) built at once (:mod:`.export`).
An unknown key or a value of the wrong type fails start-up naming the key
(:class:`EvidenceSettings`).
State: ``<state_dir>/evidence/log.sqlite3`` (the index) with ``log.sqlite3.segments``
(the append-only segment file) beside it, and the checkpoint signing key
``<state_dir>/keys/evidence-signing.pem`` (0600; its public half beside it), made with
a new log and kept for its life (:func:`signing_key`). Start-up refuses, changing
nothing, when these files disagree (:mod:`.recovery`, :func:`signing_key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planes.kernel.contracts.evidence import EvidencePlane
from planes.kernel.errors import FailedPrecondition, PlanesError, SettingsError
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.secrets import secret_missing
from planes.kernel.tokens import SigningKey, key_id, load_public_key

from .export import ExportLimits
from .log import EvidenceLog
from .plane import Evidence
from .store import SqliteEvidenceStore

__all__ = ["Evidence", "EvidenceLog", "EvidencePlugin", "EvidenceSettings", "SqliteEvidenceStore"]

KEY_FILE = "keys/evidence-signing.pem"
PUBLIC_KEY_FILE = "keys/evidence-signing.pub.pem"
STORE_FILE = "evidence/log.sqlite3"


#: The SQLite ``synchronous`` levels an acknowledged event survives a crash under (OFF would lose it).
SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True)
class EvidenceSettings:
    """``[plugin.evidence]``, as the module docstring describes it."""

    checkpoint_every: int = 1000
    checkpoint_seconds: float = 5.0
    synchronous: str = "FULL"
    encode_threads: int = 2
    #: Event type -> seconds after which raw values are pruned.
    retention: Mapping[str, float] = field(default_factory=dict)
    export_max_events: int = ExportLimits.max_events
    export_max_bytes: int = ExportLimits.max_bytes
    export_max_per_tenant: int = ExportLimits.per_tenant
    export_max_concurrent: int = ExportLimits.process

    def __post_init__(self) -> None:
        # Checked here: SQLite takes a value it does not know (FUL, say) as NORMAL, silently.
        if self.synchronous.upper() not in SYNCHRONOUS:
            raise SettingsError(f"plugin.evidence.synchronous must be one of {', '.join(SYNCHRONOUS)}, "
                                f"got {self.synchronous!r}")


def open_log(state_dir: Path, settings: EvidenceSettings | Mapping[str, Any] | None = None) -> EvidenceLog:
    """The log under ``state_dir``; ``settings`` as :class:`EvidenceSettings` or its fields by name."""
    if not isinstance(settings, EvidenceSettings):
        settings = EvidenceSettings(**(settings or {}))
    store = SqliteEvidenceStore(state_dir / STORE_FILE, synchronous=settings.synchronous.upper())
    try:
        key = signing_key(state_dir, store)
        log_id = store.meta("log_id")
        if log_id is None:
            log_id = os.urandom(16).hex().encode()
            store.set_meta("log_id", log_id)
    except BaseException:
        store.close()
        raise
    return EvidenceLog(store, key, log_id=log_id.decode(), checkpoint_every=settings.checkpoint_every,
                       checkpoint_seconds=settings.checkpoint_seconds, encode_threads=settings.encode_threads)


def signing_key(state_dir: Path, store: SqliteEvidenceStore) -> SigningKey:
    """The log's checkpoint signing key: made for a new log, and for an existing one only ever the key it has.

    The log has one key for life (fsck and every verifier hold its
    checkpoints to one key id; there is no rotation), so a missing key, or
    one that is not the key of the public key file or of the checkpoints
    already signed, refuses start-up instead of silently signing with
    another (which fsck would later misreport as bad signatures).
    """
    path, public = state_dir / KEY_FILE, state_dir / PUBLIC_KEY_FILE
    signed = store.checkpoint_key_ids()
    events = store.head()[0]
    if secret_missing(path):
        if signed or events:
            raise FailedPrecondition(
                f"evidence signing key {path} is missing, and the evidence log holds {events} events and "
                f"{_signed_by(signed)}: restore the key from backup (a new key cannot sign on for the old one); "
                "nothing was changed")
        if public.exists():
            raise FailedPrecondition(
                f"evidence signing key {path} is missing but its public half {public} is there: restore the key "
                f"from backup, or (the log holds no events) remove {public.name} to make a new key")
    key, _ = SigningKey.load_or_create(path)
    if public.exists():
        published = key_id(load_public_key(public))
        if published != key.kid:
            raise FailedPrecondition(
                f"evidence signing key {path} (key id {key.kid}) is not the private half of {public} (key id "
                f"{published}): restore the matching pair from backup; the evidence log does not rotate keys")
    others = {kid: count for kid, count in signed.items() if kid != key.kid}
    if others:
        raise FailedPrecondition(
            f"evidence signing key {path} has key id {key.kid}, but the evidence log holds {_signed_by(others)}: "
            "restore that key from backup; the evidence log does not rotate keys")
    if not public.exists():
        public.write_bytes(key.public_pem())
    return key


def _signed_by(signed: dict[str, int]) -> str:
    if not signed:
        return "no checkpoint yet"
    return " and ".join(f"{count} checkpoint{'s' * (count != 1)} signed by key id {kid}" for kid, count in signed.items())


class EvidencePlugin(Plugin):
    name = "evidence"
    version = "0.1.0"
    provides = (Provision(EvidencePlane, supports=("1.0", "2.0")),)

    def setup(self, kernel) -> None:
        settings = kernel.settings.plugin_settings_as(self.name, EvidenceSettings)
        limits = ExportLimits.from_settings(dataclasses.asdict(settings))  # before the log opens: nothing to undo
        self.log = open_log(kernel.state_dir, settings)
        self.retention = dict(settings.retention)
        self.plane = Evidence(self.log, limits)
        self._ticker: asyncio.Task | None = None

    def implementation(self, provision: Provision) -> Evidence:
        return self.plane

    async def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.log.checkpoint_seconds)
            await self.plane._run(self.log.tick)
            if self.retention:
                await self.plane._run(self.log.prune, self.retention)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.log.size:
            # Every acknowledged event is covered by a signed checkpoint when
            # the host stops, not only after the next start.
            await self.plane._run(self.log.checkpoint_now)
        self.plane.close()
        self.log.close()

    def add_cli_commands(self, commands) -> None:
        from planes.kernel.cli import add_client_arguments

        evidence = commands.add_parser("evidence", help="verify evidence bundles and check the evidence log")
        actions = evidence.add_subparsers(dest="evidence_command", metavar="ACTION")
        verify = actions.add_parser("verify", help="check an exported bundle offline (no server, no state)")
        verify.add_argument("bundle", help="the bundle file, or - for standard input")
        verify.add_argument("--public-key", help="PEM file of the evidence key the bundle must be signed with")
        verify.add_argument("--key-id", default="", help="the key id the bundle must be signed with")
        verify.set_defaults(handler=_cmd_verify)
        export = actions.add_parser("export", help="export a bundle from a running kernel (reviewer token)")
        export.add_argument("--correlation-id", default="", help="the correlation to export")
        export.add_argument("--tenant", default="", help="tenant (default: the token's)")
        export.add_argument("--out", required=True,
                            help="bundle file to create (mode 0600: it holds raw values; never replaced)")
        add_client_arguments(export, token="reviewer token file (default: $PLANES_TOKEN)", timeout=60.0)
        export.set_defaults(handler=_cmd_export)
        query = actions.add_parser(
            "query", help="print events of a running kernel's log (a token that may read the tenant's evidence)")
        query.add_argument("--correlation-id", default="", help="only this correlation's events")
        query.add_argument("--type", action="append", default=[], dest="event_types", metavar="EVENT_TYPE",
                           help="only events of this type (repeat for several), e.g. tool.invoked")
        query.add_argument("--since", help="only events at or after this UTC time (ISO 8601, e.g. 2026-11-27T10:00)")
        query.add_argument("--until", help="only events before this UTC time (ISO 8601)")
        query.add_argument("--limit", type=int, default=100, help="at most this many events (0: all; default 100)")
        query.add_argument("--json", action="store_true", help="one JSON object per line, as the proto has it")
        query.add_argument("--tenant", default="", help="tenant (default: the token's)")
        add_client_arguments(query, token="token file (default: $PLANES_TOKEN)", timeout=60.0)
        query.set_defaults(handler=_cmd_query)
        check = actions.add_parser("fsck", help="recompute the chain and tree of this host's log")
        check.add_argument("--config", help="settings TOML file")
        check.add_argument("--state-dir", help="state directory (default: ./var)")
        check.set_defaults(handler=_cmd_fsck)
        evidence.set_defaults(handler=lambda args: (evidence.print_usage(sys.stderr), 2)[1])


def _cmd_verify(args) -> int:
    from . import bundle

    data = sys.stdin.buffer.read() if args.bundle == "-" else Path(args.bundle).read_bytes()
    pinned = Path(args.public_key).read_bytes() if args.public_key else None
    verdict = bundle.verify(data, public_key_pem=pinned, expected_key_id=args.key_id)
    if not verdict.ok:
        print(f"planes: evidence bundle INVALID: {verdict.problem}", file=sys.stderr)
        return 1
    print(f"evidence bundle OK: {verdict.events} events proven against a checkpoint of tree size "
          f"{verdict.tree_size}, signed by key {verdict.key_id}")
    for note in verdict.notes:
        print(f"note: {note}")
    return 0


def _cmd_export(args) -> int:
    import hashlib

    from planes.evidence.v1 import evidence_service_pb2 as pb
    from planes.kernel.clients import connect
    from planes.kernel.contracts import EvidencePlane
    from planes.kernel.errors import InvalidArgument, NotFound
    from planes.kernel.cli import client_address, client_tls, client_token

    from . import bundle
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings

    if not args.correlation_id:
        raise InvalidArgument("give --correlation-id (time-range export: use the ExportBundle RPC)")
    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    address = client_address(args, settings)
    # Export needs a reviewer: the state directory's admin token is never tried.
    token = client_token(args, settings, admin_fallback=False, address=address)
    tls = client_tls(args)
    out = Path(args.out)
    if out.exists():
        raise InvalidArgument(f"{out} exists; choose another path")

    async def export() -> tuple[bytes, pb.BundleSummary]:
        client = connect(address, EvidencePlane, token=token, **tls)
        chunks, summary = [], pb.BundleSummary()
        try:
            request = pb.ExportBundleRequest(tenant=args.tenant, correlation_id=args.correlation_id)
            async for part in client.export_bundle(request, timeout=args.timeout):
                if part.data:
                    chunks.append(part.data)
                if part.HasField("summary"):
                    summary = part.summary
        finally:
            await client.close()
        return b"".join(chunks), summary

    data, summary = run(export())
    if hashlib.sha256(data).digest() != summary.digest.value:
        raise PlanesError("the bundle received does not match the digest the server sent; nothing written")
    if not summary.event_count:  # a bundle of nothing proves nothing; most likely a mistyped id or tenant
        raise NotFound(f"no events for {_tenant_named(args.tenant, token)} match correlation id "
                       f"{args.correlation_id!r}; nothing written")
    if not bundle.write_new(out, data):
        raise InvalidArgument(f"{out} exists; choose another path")
    print(f"wrote {out} (mode 0600): {summary.event_count} events, checkpoint tree size {summary.tree_size}")
    return 0


def _cmd_query(args) -> int:
    from google.protobuf import json_format, timestamp_pb2

    from planes.evidence.v1 import evidence_service_pb2 as pb
    from planes.kernel.cli import client_address, client_tls, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contracts import EvidencePlane
    from planes.kernel.errors import InvalidArgument
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings

    if args.limit < 0:
        raise InvalidArgument(f"--limit must be 0 (all) or more, got {args.limit}")
    request = pb.QueryEventsRequest(tenant=args.tenant, correlation_id=args.correlation_id,
                                    event_types=args.event_types, limit=args.limit)
    for flag, field_name in (("since", "start_time"), ("until", "end_time")):
        text = getattr(args, flag)
        if text:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(_utc(text, flag))
            getattr(request, field_name).CopyFrom(stamp)
    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    address = client_address(args, settings)
    # Reading evidence needs a tenant's reader: the state directory's admin token is never tried.
    token = client_token(args, settings, admin_fallback=False, address=address)

    async def query() -> int:
        client = connect(address, EvidencePlane, token=token, **client_tls(args))
        shown = 0
        try:
            async for page in client.query_events(request, timeout=args.timeout):
                for event in page.events:
                    print(json_format.MessageToJson(event, indent=None) if args.json else _event_line(event),
                          flush=True)
                    shown += 1
        finally:
            await client.close()
        return shown

    if not run(query()) and not args.json:
        print(f"no events for {_tenant_named(args.tenant, token)} match", file=sys.stderr)
    return 0


def _utc(text: str, flag: str):
    """An ISO 8601 time from the command line, as UTC when it names no zone."""
    from datetime import datetime, timezone

    from planes.kernel.errors import InvalidArgument

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"--{flag} {text!r} is not an ISO 8601 time such as 2026-11-27T10:00") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _event_line(event) -> str:
    """One event for a terminal: sequence, time, type, correlation, actor, then its fields."""
    parts = []
    for item in event.fields:
        which = item.WhichOneof("value")
        if which == "string_value":
            value = item.string_value if len(item.string_value) <= 80 else item.string_value[:77] + "..."
            parts.append(f"{item.name}={value!r}")
        elif which == "bytes_value":
            parts.append(f"{item.name}=0x{item.bytes_value[:16].hex()}{'...' if len(item.bytes_value) > 16 else ''}")
        else:
            parts.append(f"{item.name}=<{'redacted' if item.redacted else 'withheld'}>")
    correlation = event.correlation
    return (f"{event.sequence:>8} {event.time.ToJsonString()} {event.event_type:<20} "
            f"corr={correlation.correlation_id or '-'} actor={correlation.actor or '-'} {' '.join(parts)}").rstrip()


def _tenant_named(tenant: str, token: str) -> str:
    """The tenant an export reads, for a message: the one asked for, else the token's."""
    from planes.kernel.tokens import decode_claims

    if not tenant:
        try:
            tenant = str(decode_claims(token).get("ten", ""))
        except PlanesError:
            tenant = ""
    return f"tenant {tenant!r}" if tenant else "this token's tenant"


def _cmd_fsck(args) -> int:
    from planes.kernel.settings import load_settings

    from .fsck import fsck

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    path = settings.state_dir / STORE_FILE
    if not path.exists():
        raise PlanesError(f"no evidence log at {path}")
    store = SqliteEvidenceStore(path, writer=False)
    report = fsck(store, load_public_key(settings.state_dir / PUBLIC_KEY_FILE))
    store.close()
    if not report.ok:
        print(f"planes: evidence log DAMAGED: {report.problems[0]}", file=sys.stderr)
        return 1
    print(f"evidence log OK: {report.events} events, {report.values} raw values, "
          f"{report.checkpoints} checkpoints verified")
    return 0
