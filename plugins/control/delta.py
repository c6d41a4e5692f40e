"""Snapshot deltas: a revision's content as runs of an older revision's elements and new bytes.

An element is one top-level field of a serialized ``SnapshotContent`` (a
``resources`` entry with its tag and length), so content is a sequence of
elements and a delta says, in order, which ranges of the base's elements to
keep and which new elements to insert. Nothing here is trusted: a delta only
rebuilds bytes, and the subscriber verifies those bytes against the signed
header exactly as it would a full snapshot's.

Positions are element indexes, found by reading field keys and lengths
(:func:`element_bounds`), never by parsing resources, so a delta works
whatever order or fields the content has.
"""

from __future__ import annotations

from planes.control.v1 import control_service_pb2 as pb
from planes.native import load

codec = load("codec")


class DeltaUnusable(Exception):
    """A delta that cannot rebuild content here: another base, a range out of bounds, malformed bytes.

    Not a NACK: the subscriber fetches the full snapshot instead.
    """


def element_bounds(content: bytes) -> list[int]:
    """The end offset of each top-level field of ``content``; ValueError if it is not well-formed.

    The native codec's field scanner (``planes.native.codec.field_ends``): a
    subscriber finds the bounds of every full snapshot it applies, 1,000
    resources in microseconds rather than the 0.4 ms a Python loop took.
    """
    return codec.field_ends(content)


def _elements(content: bytes, bounds: list[int]) -> list[bytes]:
    return [content[start:end] for start, end in zip([0, *bounds], bounds)]


def make_runs(base: bytes, base_bounds: list[int], target: bytes, target_bounds: list[int]) -> list[pb.ContentRun]:
    """Runs that rebuild ``target`` from ``base``: kept ranges of base elements, inserted new ones."""
    index = {element: i for i, element in enumerate(_elements(base, base_bounds))}
    runs: list[pb.ContentRun] = []
    inserted: list[bytes] = []
    kept: list[int] = []                                  # [start, count] of the open range

    def close() -> None:
        if inserted:
            runs.append(pb.ContentRun(inserted=b"".join(inserted)))
            inserted.clear()
        if kept:
            runs.append(pb.ContentRun(base=pb.ElementRange(start=kept[0], count=kept[1])))
            kept.clear()

    for element in _elements(target, target_bounds):
        at = index.get(element)
        if at is None:
            if kept:
                close()
            inserted.append(element)
        elif kept and at == kept[0] + kept[1]:
            kept[1] += 1
        else:
            close()
            kept.extend((at, 1))
    close()
    return runs


def rebuild(runs, base: bytes, base_bounds: list[int]) -> tuple[bytes, list[int]]:
    """The content the runs describe, and its element bounds; DeltaUnusable if they do not fit ``base``."""
    pieces, bounds, end = [], [], 0
    view = memoryview(base)
    for run in runs:
        kind = run.WhichOneof("run")
        if kind == "base":
            start, count = run.base.start, run.base.count
            if count == 0 or start + count > len(base_bounds):
                raise DeltaUnusable(f"elements {start}..{start + count} of a base that has {len(base_bounds)}")
            low = base_bounds[start - 1] if start else 0
            high = base_bounds[start + count - 1]
            pieces.append(view[low:high])
            shift = end - low
            bounds.extend(bound + shift for bound in base_bounds[start:start + count])
            end += high - low
        elif kind == "inserted":
            try:
                inner = element_bounds(run.inserted)
            except ValueError as exc:
                raise DeltaUnusable(f"inserted bytes are not whole elements: {exc}") from None
            if not inner:
                raise DeltaUnusable("an empty inserted run")
            pieces.append(run.inserted)
            bounds.extend(bound + end for bound in inner)
            end += len(run.inserted)
        else:
            raise DeltaUnusable("a run that neither keeps nor inserts")
    return b"".join(pieces), bounds
