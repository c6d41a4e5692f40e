"""``planes evidence fsck``: recompute the chain and the tree from stored leaves.

Every stored byte is covered. In a segment: a changed leaf no longer hashes
to its stored leaf hash; a changed leaf hash or chain head breaks the
recomputed chain; damaged offsets do not cut the leaves into the counted
events (or cut them differently, which changes leaf hashes); a changed
event-id hash, tenant or time range disagrees with the leaves; a missing
segment is a gap in the sequences. A changed raw value or salt no longer
matches its commitment; a string field with neither a raw value nor a
recorded removal lost it (bytes fields may be withheld at the source, so
a lost one shows instead in the file layout: recorded offsets and lengths
must account for every byte of the segment file but page padding); a
changed or missing correlation-index row
disagrees with the runs recomputed from the leaves; a changed checkpoint
fails its signature or its recomputed root and head, and each
checkpoint's log id must be the ``log_id`` meta row's. The first problem is
reported with where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.tokens import key_id
from planes.native import eventbatch_py, load

from . import leaf as leaves
from .log import CHECKPOINT_CONTEXT, ZERO_HEAD
from planes.kernel.files import align_up

from .store import Segment, SqliteEvidenceStore, correlation_sequences, u64_array

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


class _Stop(Exception):
    pass


def _offsets(segment: Segment) -> list[int] | str:
    """The segment's offsets, or what is wrong with them."""
    if len(segment.offsets) != (segment.count + 1) * 8 or segment.count < 1:
        return f"offsets hold {len(segment.offsets)} bytes for {segment.count} events"
    offsets = u64_array(segment.offsets).tolist()
    if offsets[0] != 0 or offsets[-1] != len(segment.leaves):
        return f"offsets run from {offsets[0]} to {offsets[-1]}, the leaves hold {len(segment.leaves)} bytes"
    for index in range(segment.count):
        if offsets[index + 1] < offsets[index]:
            return f"offset {index + 1} goes backwards"
    return offsets


def _correlations(segment: Segment, decoded) -> dict[str, list[int]]:
    """Each correlation id of a segment's leaves and its events' sequences, in order."""
    found: dict[str, list[int]] = {}
    for sequence, leaf in enumerate(decoded, segment.first_sequence):
        if leaf is not None:
            found.setdefault(leaf.correlation_id, []).append(sequence)
    return found


def _indexed_correlations(segment: Segment, store: SqliteEvidenceStore) -> dict[str, list[int]] | None:
    """The same as the index rows of the segment have it (rows of one run each, as logs before the ``runs``
    column wrote them, or of one correlation each); None if a row is malformed or names another tenant."""
    found: dict[str, list[int]] = {}
    for tenant, correlation, first, last, runs in store.correlation_runs(segment.first_sequence,
                                                                           segment.last_sequence):
        if tenant != segment.tenant or (runs is not None and (not isinstance(runs, bytes) or len(runs) % 16
                                                              or not runs)):
            return None
        sequences = list(correlation_sequences(first, last, runs))
        if not sequences or sequences[0] != first or sequences[-1] != last or sequences != sorted(set(sequences)):
            return None
        found.setdefault(correlation, []).extend(sequences)
    return {correlation: sorted(sequences) for correlation, sequences in found.items()}


def _check_values_held(segment: Segment, decoded: list, records: list, removed: set[tuple[int, str]],
                       problem) -> None:
    """Every committed field holds its raw value or has a recorded removal (redaction, retention).

    A field withheld at the source is committed as bytes with no value stored, so a bytes field without
    a value is not a problem by itself; a lost bytes value still shows in the file layout
    (:func:`_check_file_layout`): the values part is the segment's last.
    """
    held = {(record[0], record[1]) for record in records}
    for sequence, leaf in enumerate(decoded, segment.first_sequence):
        if leaf is None:
            continue
        for committed in leaf.fields:
            if (committed.kind == leaves.KIND_STRING and (sequence, committed.name) not in held
                    and (sequence, committed.name) not in removed):
                problem(f"event sequence {sequence} (id {leaf.event_id!r}): field {committed.name!r} has no raw "
                        f"value and no recorded removal (segment at sequence {segment.first_sequence}: its "
                        "values_length or values were changed)")


def _allowed_between(data: bytes, end: int) -> bool:
    """Whether ``data``, the file bytes after a segment ending at ``end``, are what appends leave there: zero
    padding up to the next page (a direct write), then nothing or another batch (a leaf's magic; an append
    not committed, or one the next segment overwrote only in part)."""
    padding = align_up(end) - end
    if data[:4] == leaves.MAGIC:
        return True
    if any(data[:padding]):
        return False
    rest = data[padding:]
    return not rest or rest[:4] == leaves.MAGIC or not any(rest)


def _check_file_layout(store: SqliteEvidenceStore, problem) -> None:
    """The recorded lengths and offsets account for the segment file: segments do not overlap, and only
    padding lies between them (a values_length or leaves_length cut short leaves their bytes there)."""
    layout = store.segment_layout()
    size = store.file_size()
    for (first, offset, length), following in zip(layout, [*layout[1:], None]):
        end = offset + length
        stop = following[1] if following is not None else size
        if stop < end:
            if following is not None:
                problem(f"segment at sequence {first}: it runs to byte {end} of the segment file, past the start "
                        f"of the segment at sequence {following[0]} (byte {stop})")
            continue  # a short file: the segment's parts are short, reported above
        if not _allowed_between(store.file_bytes(end, min(stop - end, align_up(end) - end + 65536)), end):
            problem(f"segment at sequence {first}: the segment file holds {stop - end} bytes after it that no "
                    "segment accounts for (its recorded values_length or leaves_length is short)")


def fsck(store: SqliteEvidenceStore, public_key: Ed25519PublicKey, *, stop_at_first: bool = True) -> FsckReport:
    report = FsckReport()

    def problem(text: str) -> None:
        report.problems.append(text)
        if stop_at_first:
            raise _Stop

    try:
        _check_segments(store, public_key, report, problem)
    except _Stop:
        return report
    return report


def _check_segments(store: SqliteEvidenceStore, public_key: Ed25519PublicKey, report: FsckReport, problem) -> None:
    head = ZERO_HEAD
    heads_at: dict[int, bytes] = {}
    all_hashes = bytearray()
    expected = 1
    for segment in store.segments():
        where_segment = f"segment at sequence {segment.first_sequence}"
        if segment.first_sequence != expected:
            problem(f"gap: sequence {expected} is missing (next stored is {segment.first_sequence})")
            expected = segment.first_sequence
        offsets = _offsets(segment)
        if isinstance(offsets, str):
            problem(f"{where_segment}: {offsets}")
            expected += max(segment.count, 0)
            continue
        count = segment.count
        for name, size in (("leaf hashes", 32), ("chain heads", 32), ("event-id hashes", 8)):
            blob = {"leaf hashes": segment.leaf_hashes, "chain heads": segment.chain_heads,
                    "event-id hashes": segment.id_hashes}[name]
            if len(blob) != count * size:
                problem(f"{where_segment}: {name} hold {len(blob)} bytes for {count} events")
        hashes, heads = chain.hash_and_chain(head, segment.leaves, u64_array(segment.offsets))
        keys = u64_array(segment.id_hashes) if len(segment.id_hashes) == count * 8 else None
        decoded = []
        for index in range(count):
            sequence = segment.first_sequence + index
            at = index * 32
            raw = segment.leaves[offsets[index]:offsets[index + 1]]
            try:
                leaf, damage = leaves.decode(raw), ""
            except ValueError as exc:
                leaf, damage = None, str(exc)
            decoded.append(leaf)
            where = f"event sequence {sequence}" + (f" (id {leaf.event_id!r})" if leaf else "")
            if hashes[at:at + 32] != segment.leaf_hashes[at:at + 32]:
                problem(f"{where}: stored leaf or leaf hash was altered")
            if heads[at:at + 32] != segment.chain_heads[at:at + 32]:
                problem(f"{where}: chain head does not match the recomputed chain")
            if leaf is None:
                problem(f"{where}: leaf does not parse: {damage}")
                continue
            if leaf.sequence != sequence:
                problem(f"{where}: the leaf says sequence {leaf.sequence}")
            if leaf.tenant != segment.tenant:
                problem(f"{where}: index column tenant ({segment.tenant!r}) disagrees with the leaf")
            if not segment.min_time <= leaf.time_ns <= segment.max_time:
                problem(f"{where}: index columns min_time/max_time of {where_segment} disagree with the leaf")
            if keys is not None and keys[index] != eventbatch_py.id_hash(leaf.event_id.encode()):
                problem(f"{where}: stored event-id hash disagrees with the leaf")
            heads_at[sequence] = heads[at:at + 32]
        times = [leaf.time_ns for leaf in decoded if leaf is not None]
        if times and (min(times), max(times)) != (segment.min_time, segment.max_time):
            problem(f"{where_segment}: index columns min_time/max_time disagree with the leaves")
        if _indexed_correlations(segment, store) != _correlations(segment, decoded):
            problem(f"{where_segment}: correlation index rows disagree with the leaves")
        head = heads[-32:] if count else head
        all_hashes += hashes
        report.events += count
        expected = segment.first_sequence + count
        try:
            records = eventbatch_py.decode_values(segment.values)
        except eventbatch_py.ValuesFormatError as exc:
            problem(f"{where_segment}: raw values do not parse: {exc}")
            continue
        removed = store.removed_values(segment)
        _check_values_held(segment, decoded, records, removed, problem)
        for sequence, name, salt, value in records:
            index = sequence - segment.first_sequence
            leaf = decoded[index] if 0 <= index < count else None
            committed = leaf.field(name) if leaf is not None else None
            if (sequence, name) in removed:
                if committed is None or any(salt) or any(value):
                    problem(f"event sequence {sequence}: field {name!r} was removed but its raw value is still in "
                            "the segment file")
                continue
            report.values += 1
            if committed is None or leaves.commitment(salt, name, committed.kind, value) != committed.commitment:
                problem(f"event sequence {sequence}: raw value of field {name!r} was altered")
    _check_file_layout(store, problem)
    for sequence in store.stray_removals():
        problem(f"a removed value is recorded for sequence {sequence}, which the log does not hold")

    saved = store.meta("frontier")
    if saved is not None:
        # The log appends to this frontier and signs its root in the next checkpoint: a changed byte here
        # would be signed into every later checkpoint, so it must match the leaves like everything else.
        try:
            stored_frontier = chain.MerkleFrontier.from_bytes(saved)
        except ValueError as exc:
            problem(f"the stored Merkle frontier does not parse: {exc}")
        else:
            if stored_frontier.size == report.events:
                rebuilt = chain.MerkleFrontier()
                rebuilt.append(bytes(all_hashes))
                if stored_frontier.to_bytes() != rebuilt.to_bytes():
                    problem(f"the stored Merkle frontier (size {stored_frontier.size}) does not match the stored "
                            "leaves")
            # A frontier of another size is stale and rebuilt from the leaves when the log opens.

    stored_log_id = store.meta("log_id")
    log_id = stored_log_id.decode(errors="replace") if isinstance(stored_log_id, bytes) else stored_log_id
    expected_key_id = key_id(public_key)
    for tree_size, body, signature, stored_key_id in store.checkpoints():
        report.checkpoints += 1
        where = f"checkpoint at tree size {tree_size}"
        try:
            public_key.verify(signature, CHECKPOINT_CONTEXT + body)
        except InvalidSignature:
            problem(f"{where}: signature does not verify")
            continue
        checkpoint = pb.Checkpoint.FromString(body)
        if checkpoint.log_id != log_id:
            # Every bundle carries the checkpoint and the log id it is checked against; they must agree.
            problem(f"{where}: signed for log id {checkpoint.log_id!r}, the meta row log_id says {log_id!r}")
        if checkpoint.key_id != expected_key_id or stored_key_id != checkpoint.key_id:
            problem(f"{where}: key id {stored_key_id!r} (signed: {checkpoint.key_id!r}) is not the log key's "
                    f"{expected_key_id!r}")
        if checkpoint.tree_size != tree_size or tree_size > report.events:
            problem(f"{where}: covers {checkpoint.tree_size} events, the log holds {report.events}")
            continue
        if chain.merkle_root(bytes(all_hashes[:tree_size * 32])) != checkpoint.root_hash:
            problem(f"{where}: Merkle root does not match the stored leaves")
        if heads_at.get(tree_size, ZERO_HEAD) != checkpoint.chain_head:
            problem(f"{where}: chain head does not match the stored leaves")
