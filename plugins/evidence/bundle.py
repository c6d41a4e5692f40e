"""Export bundles and their offline verification.

A bundle is one JSON document, self-contained: the selected events' leaves
with their remaining raw values and salts, each event's inclusion proof
against one signed checkpoint, the checkpoint, the evidence public key, and a
manifest signature by the same key over everything else. ``planes evidence
verify BUNDLE`` checks it with no server and no state directory, and names
the first thing that fails.

Checks, in order: the checkpoint's signature; per event, that its leaf
parses, that every raw value matches its commitment, and that its inclusion
proof leads to the checkpoint's root; then the manifest signature, which
catches events added, removed or reordered. Pin the expected key with
``--public-key`` (or ``--key-id``): without a pin, a bundle is only checked
against the key it carries.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel import secrets
from planes.kernel.tokens import key_id
from planes.native import load

from . import leaf as leaves
from .log import CHECKPOINT_CONTEXT

chain = load("chain")

FORMAT = "planes-evidence-bundle/1"
MANIFEST_CONTEXT = b"planes.evidence.v1.Bundle\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {type(text).__name__}")
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical(document: dict) -> bytes:
    """The signed form: sorted keys, no whitespace, the signature left out."""
    body = {key: value for key, value in document.items() if key != "manifest_signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def build(*, log, tenant: str, selection: dict, rows, tree_size: int, signed: pb.SignedCheckpoint) -> bytes:
    """The bundle for ``rows`` (StoredEvents of one tenant) proven against ``signed``."""
    proofs = log.inclusion_proofs(tree_size)
    values = log.store.values([row.sequence for row in rows])
    events = []
    for row in rows:
        events.append({
            "sequence": row.sequence,
            "leaf": _b64(row.leaf),
            "audit_path": [_b64(node) for node in proofs.path(row.sequence - 1)],
            "values": {name: {"salt": _b64(v.salt), "value": _b64(v.value)}
                       for name, v in sorted(values.get(row.sequence, {}).items())},
        })
    document = {
        "format": FORMAT,
        "log_id": log.log_id,
        "tenant": tenant,
        "selection": selection,
        "public_key": log.key.public_pem().decode(),
        "checkpoint": {"body": _b64(signed.checkpoint), "signature": _b64(signed.signature),
                       "key_id": signed.key_id},
        "events": events,
    }
    document["manifest_signature"] = _b64(log.key.private_key.sign(MANIFEST_CONTEXT + canonical(document)))
    return json.dumps(document, indent=1, sort_keys=True).encode()


def write_new(path: Path, data: bytes) -> bool:
    """Publish ``data`` as a new owner-only (0600) file at ``path``, all or nothing; False if ``path`` exists.

    A bundle holds raw field values, so it is never readable by others, not
    even while being written (:func:`planes.kernel.secrets.write_new`).
    """
    return secrets.write_new(path, data, 0o600)


@dataclass
class Verdict:
    ok: bool
    problem: str = ""
    events: int = 0
    tree_size: int = 0
    key_id: str = ""
    notes: list[str] = field(default_factory=list)


class BundleError(Exception):
    """The first check that failed, in words."""


def verify(data: bytes, *, public_key_pem: bytes | None = None, expected_key_id: str = "") -> Verdict:
    try:
        return _verify(data, public_key_pem, expected_key_id)
    except BundleError as exc:
        return Verdict(False, str(exc))
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        # Every field is checked as it is read; this is the net under those checks, so that a malformed
        # bundle is a verdict, never a traceback.
        return Verdict(False, f"malformed bundle: {type(exc).__name__}: {str(exc)[:200]}")


def _verify(data: bytes, public_key_pem: bytes | None, expected_key_id: str) -> Verdict:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"not a bundle: invalid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"not a bundle: format is not {FORMAT!r}")
    try:
        carried = serialization.load_pem_public_key(document["public_key"].encode())
        pinned = serialization.load_pem_public_key(public_key_pem) if public_key_pem else None
    except (KeyError, ValueError, AttributeError) as exc:
        raise BundleError(f"bad public key: {exc}") from None
    key = pinned or carried
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("the public key is not an Ed25519 key")
    kid = key_id(key)
    notes = []
    if pinned is None:
        notes.append(f"trusted the key carried in the bundle ({kid}); pin one with --public-key or --key-id")
    if expected_key_id and kid != expected_key_id:
        raise BundleError(f"wrong signature key: bundle key {kid}, expected {expected_key_id}")

    try:
        checkpoint_bytes = _unb64(document["checkpoint"]["body"])
        signature = _unb64(document["checkpoint"]["signature"])
    except (KeyError, TypeError, ValueError):
        raise BundleError("checkpoint missing or not base64") from None
    try:
        key.verify(signature, CHECKPOINT_CONTEXT + checkpoint_bytes)
    except InvalidSignature:
        raise BundleError(f"wrong signature: the checkpoint is not signed by key {kid}") from None
    checkpoint = pb.Checkpoint.FromString(checkpoint_bytes)
    if checkpoint.log_id != document.get("log_id"):
        raise BundleError(f"checkpoint is of log {checkpoint.log_id!r}, bundle says {document.get('log_id')!r}")

    events = document.get("events")
    if not isinstance(events, list):
        raise BundleError("events missing")
    previous = 0
    for position, entry in enumerate(events):
        sequence = _verify_event(position, entry, document.get("tenant", ""), checkpoint)
        if sequence <= previous:
            raise BundleError(f"event #{position}: sequence {sequence} out of order")
        previous = sequence

    try:
        key.verify(_unb64(document["manifest_signature"]), MANIFEST_CONTEXT + canonical(document))
    except (KeyError, ValueError, InvalidSignature):
        raise BundleError("manifest signature invalid: events were added, removed, reordered or altered "
                          "after export") from None
    return Verdict(True, events=len(events), tree_size=checkpoint.tree_size, key_id=kid, notes=notes)


def _verify_event(position: int, entry: dict, tenant: str, checkpoint: pb.Checkpoint) -> int:
    """Check one exported event against the checkpoint; its sequence."""
    label = f"event #{position}"
    try:
        if not isinstance(entry, dict):
            raise ValueError(f"an entry is an object, not {type(entry).__name__}")
        raw_leaf = _unb64(entry["leaf"])
        sequence = entry["sequence"]
        if type(sequence) is not int or sequence < 1:
            raise ValueError(f"sequence must be a positive integer, got {sequence!r:.40}")
        if not isinstance(entry["audit_path"], list) or not isinstance(entry["values"], dict):
            raise ValueError("audit_path is a list and values an object")
        path = [_unb64(node) for node in entry["audit_path"]]
        if any(len(node) != 32 for node in path):
            raise ValueError("every audit path node is 32 bytes")
        values = {name: (_unb64(v["salt"]), _unb64(v["value"])) for name, v in entry["values"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{label}: malformed entry: {str(exc)[:200]}") from None
    try:
        leaf = leaves.decode(raw_leaf)
    except ValueError as exc:
        raise BundleError(f"{label}: tampered event: {exc}") from None
    label = f"event #{position} (sequence {leaf.sequence}, id {leaf.event_id!r})"
    if leaf.sequence != sequence:
        raise BundleError(f"{label}: tampered event: leaf sequence {leaf.sequence}, entry says {sequence}")
    if leaf.tenant != tenant:
        raise BundleError(f"{label}: event of tenant {leaf.tenant!r} in a bundle of tenant {tenant!r}")
    for name, (salt, value) in values.items():
        committed = leaf.field(name)
        if committed is None:
            raise BundleError(f"{label}: tampered event: value for field {name!r}, which the leaf does not commit to")
        if leaves.commitment(salt, name, committed.kind, value) != committed.commitment:
            raise BundleError(f"{label}: tampered event: field {name!r} does not match its commitment")
    leaf_hash = hashlib.sha256(b"\x00" + raw_leaf).digest()
    if sequence > checkpoint.tree_size:
        raise BundleError(f"{label}: not covered by the checkpoint (tree size {checkpoint.tree_size})")
    if not chain.verify_inclusion(leaf_hash, sequence - 1, checkpoint.tree_size, path, checkpoint.root_hash):
        raise BundleError(f"{label}: wrong proof: the audit path does not lead to the checkpoint's root")
    return sequence
