"""``planes evidence fsck``: recompute the chain and the tree from stored leaves.

Every stored byte is covered: a leaf that changed no longer hashes to its
stored leaf hash; a changed leaf hash or chain head breaks the recomputed
chain; a changed index column disagrees with its leaf; a changed raw value or
salt no longer matches its commitment; a changed checkpoint fails its
signature or its recomputed root and head. The first problem is reported with
where it is.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.native import load

from . import leaf as leaves
from .log import CHECKPOINT_CONTEXT, ZERO_HEAD
from .store import SqliteEvidenceStore

chain = load("chain")


@dataclass
class FsckReport:
    events: int = 0
    checkpoints: int = 0
    values: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(store: SqliteEvidenceStore, public_key: Ed25519PublicKey, *, stop_at_first: bool = True) -> FsckReport:
    report = FsckReport()

    def problem(text: str) -> bool:
        report.problems.append(text)
        return stop_at_first

    head = ZERO_HEAD
    heads_at: dict[int, bytes] = {}
    all_hashes = bytearray()
    expected = 1
    for batch in store.scan():
        offsets = array("Q", [0])
        for event in batch:
            offsets.append(offsets[-1] + len(event.leaf))
        hashes, heads = chain.hash_and_chain(head, b"".join(e.leaf for e in batch), offsets)
        for index, event in enumerate(batch):
            at = index * 32
            where = f"event sequence {event.sequence} (id {event.event_id!r})"
            if event.sequence != expected:
                if problem(f"gap: sequence {expected} is missing (next stored is {event.sequence})"):
                    return report
                expected = event.sequence
            expected += 1
            if hashes[at:at + 32] != event.leaf_hash:
                if problem(f"{where}: stored leaf or leaf hash was altered"):
                    return report
            if heads[at:at + 32] != event.chain_head:
                if problem(f"{where}: chain head does not match the recomputed chain"):
                    return report
            try:
                leaf = leaves.decode(event.leaf)
            except ValueError as exc:
                if problem(f"{where}: leaf does not parse: {exc}"):
                    return report
                continue
            columns = (leaf.sequence, leaf.event_id, leaf.tenant, leaf.correlation_id, leaf.event_type, leaf.time_ns)
            stored = (event.sequence, event.event_id, event.tenant, event.correlation_id, event.event_type,
                      event.time_ns)
            if columns != stored:
                names = ("sequence", "event_id", "tenant", "correlation_id", "event_type", "time_ns")
                changed = [n for n, a, b in zip(names, columns, stored) if a != b]
                if problem(f"{where}: index columns {changed} disagree with the leaf"):
                    return report
            heads_at[event.sequence] = heads[at:at + 32]
        head = heads[-32:]
        all_hashes += hashes
        report.events += len(batch)
        values = store.values([e.sequence for e in batch])
        for event in batch:
            leaf = leaves.decode(event.leaf)
            for name, value in values.get(event.sequence, {}).items():
                committed = leaf.field(name)
                report.values += 1
                if committed is None or leaves.commitment(value.salt, name, committed.kind,
                                                          value.value) != committed.commitment:
                    if problem(f"event sequence {event.sequence}: raw value of field {name!r} was altered"):
                        return report

    for tree_size, body, signature, _key_id in store.checkpoints():
        report.checkpoints += 1
        where = f"checkpoint at tree size {tree_size}"
        try:
            public_key.verify(signature, CHECKPOINT_CONTEXT + body)
        except InvalidSignature:
            if problem(f"{where}: signature does not verify"):
                return report
            continue
        checkpoint = pb.Checkpoint.FromString(body)
        if checkpoint.tree_size != tree_size or tree_size > report.events:
            if problem(f"{where}: covers {checkpoint.tree_size} events, the log holds {report.events}"):
                return report
            continue
        if chain.merkle_root(bytes(all_hashes[:tree_size * 32])) != checkpoint.root_hash:
            if problem(f"{where}: Merkle root does not match the stored leaves"):
                return report
        if heads_at.get(tree_size, ZERO_HEAD) != checkpoint.chain_head:
            if problem(f"{where}: chain head does not match the stored leaves"):
                return report
    return report
