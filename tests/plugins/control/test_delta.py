"""Snapshot deltas: rebuilding content from runs, and a subscriber that verifies what it rebuilt."""

from __future__ import annotations

import random

import pytest
from google.protobuf import struct_pb2

from planes.control.v1 import control_service_pb2 as pb
from planes.plugins.control.delta import DeltaUnusable, element_bounds, make_runs, rebuild
from planes.plugins.control.subscriber import SnapshotRejected

from .conftest import signed_snapshot


def _content(names: list[str]) -> bytes:
    return pb.SnapshotContent(resources=[
        pb.Resource(kind=pb.RESOURCE_KIND_MODEL_ROUTE, tenant="acme", name=name, resource_version=1,
                    spec=struct_pb2.Struct(fields={"note": struct_pb2.Value(string_value=name * 3)}))
        for name in names]).SerializeToString(deterministic=True)


def _elements(content: bytes) -> list[bytes]:
    bounds = element_bounds(content)
    return [content[start:end] for start, end in zip([0, *bounds], bounds)]


def _delta(base: bytes, target: bytes):
    runs = make_runs(base, element_bounds(base), target, element_bounds(target))
    return runs, rebuild(runs, base, element_bounds(base))


def test_element_bounds_are_the_resources():
    content = _content(["a", "bb", "ccc"])
    bounds = element_bounds(content)
    assert len(bounds) == 3 and bounds[-1] == len(content)
    pieces = [content[s:e] for s, e in zip([0, *bounds], bounds)]
    assert [pb.SnapshotContent.FromString(p).resources[0].name for p in pieces] == ["a", "bb", "ccc"]
    assert element_bounds(b"") == []


def test_element_bounds_read_every_wire_type_and_length():
    small = pb.Resource(name="s").SerializeToString()
    large = pb.Resource(name="l" * 20_000).SerializeToString()
    pieces = [b"\x0a" + bytes([len(small)]) + small,            # one-byte length
              b"\x10\x96\x01",                                   # field 2, varint
              b"\x19" + bytes(8),                                 # field 3, fixed64
              b"\x25" + bytes(4),                                 # field 4, fixed32
              b"\x0a" + _varint(len(large)) + large]                # a three-byte length
    content = b"".join(pieces)
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    assert element_bounds(content) == ends


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


@pytest.mark.parametrize("damaged", [b"\x0a\x05abc", b"\x0a", b"\x0b", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"])
def test_element_bounds_refuse_malformed_content(damaged):
    with pytest.raises(ValueError):
        element_bounds(damaged)


@pytest.mark.parametrize("seed", range(30))
def test_runs_rebuild_the_target_exactly_after_random_edits(seed):
    rng = random.Random(seed)
    base_names = sorted({f"r{rng.randrange(400)}" for _ in range(rng.randrange(0, 60))})
    names = list(base_names)
    for _ in range(rng.randrange(0, 8)):
        edit = rng.choice(["add", "remove", "change"])
        if edit == "add" or not names:
            names.append(f"new{rng.randrange(10_000)}")
        elif edit == "remove":
            names.pop(rng.randrange(len(names)))
        else:
            names[rng.randrange(len(names))] += "x"
    names.sort()
    base, target = _content(base_names), _content(names)
    runs, (rebuilt, bounds) = _delta(base, target)
    assert rebuilt == target
    assert bounds == element_bounds(target)
    # Compact: exactly the elements the base lacks travel as bytes; everything else is a range.
    kept = set(_elements(base))
    new = b"".join(element for element in _elements(target) if element not in kept)
    inserted = b"".join(r.inserted for r in runs if r.WhichOneof("run") == "inserted")
    assert inserted == new, f"{len(inserted)} bytes inserted for a change of {len(new)}"


def test_one_changed_resource_costs_one_element():
    names = [f"route-{i:04d}" for i in range(1000)]
    base = _content(names)
    names[500] = "route-0500-changed"
    target = _content(names)
    runs, (rebuilt, _) = _delta(base, target)
    assert [r.WhichOneof("run") for r in runs] == ["base", "inserted", "base"]
    assert runs[0].base.count == 500 and (runs[2].base.start, runs[2].base.count) == (501, 499)
    changed = pb.SnapshotContent.FromString(runs[1].inserted).resources
    assert [r.name for r in changed] == ["route-0500-changed"]
    assert rebuilt == target


@pytest.mark.parametrize("runs, problem", [
    ([pb.ContentRun(base=pb.ElementRange(start=2, count=5))], "elements 2..7 of a base that has 3"),
    ([pb.ContentRun(base=pb.ElementRange(start=0, count=0))], "elements 0..0"),
    ([pb.ContentRun(inserted=b"\x0a\x09short")], "not whole elements"),
    ([pb.ContentRun(inserted=b"")], "empty inserted run"),
    ([pb.ContentRun()], "neither keeps nor inserts"),
])
def test_runs_that_do_not_fit_the_base_are_unusable(runs, problem):
    base = _content(["a", "b", "c"])
    with pytest.raises(DeltaUnusable, match=problem):
        rebuild(runs, base, element_bounds(base))


def _delta_message(key, base_signed, target_signed, base_revision: int, runs=None) -> pb.SnapshotDelta:
    base, target = base_signed.content, target_signed.content
    runs = runs if runs is not None else make_runs(base, element_bounds(base), target, element_bounds(target))
    header = pb.SignedSnapshot(snapshot=target_signed.snapshot, signature=target_signed.signature,
                               key_id=target_signed.key_id)
    return pb.SnapshotDelta(base_revision=base_revision, snapshot=header, runs=runs)


def test_cache_applies_a_verified_delta_and_persists_the_full_snapshot(cache, key, tmp_path):
    first, second = signed_snapshot(key, 1), signed_snapshot(key, 2)
    cache.offer(first)
    applied = cache.offer_delta(_delta_message(key, first, second, 1))
    assert applied.revision == 2 and cache.current.signed.content == second.content
    third = signed_snapshot(key, 3)
    assert cache.offer_delta(_delta_message(key, second, third, 2)).revision == 3, "bounds carried over"
    assert pb.SignedSnapshot.FromString((cache.directory / "snapshot.bin").read_bytes()) == third


def test_delta_against_another_base_changes_nothing(cache, key):
    first, second, third = (signed_snapshot(key, r) for r in (1, 2, 3))
    cache.offer(first)
    with pytest.raises(DeltaUnusable, match="against revision 2; this subscriber runs 1"):
        cache.offer_delta(_delta_message(key, second, third, 2))
    assert cache.current.revision == 1


def test_tampered_delta_fails_the_digest_and_changes_nothing(cache, key):
    first, second = signed_snapshot(key, 1), signed_snapshot(key, 2)
    cache.offer(first)
    evil = signed_snapshot(key, 2, note="evil").content
    runs = [pb.ContentRun(inserted=evil)]
    with pytest.raises(DeltaUnusable, match="does not match the signed digest"):
        cache.offer_delta(_delta_message(key, first, second, 1, runs=runs))
    assert cache.current.revision == 1


def test_a_delta_to_an_older_revision_is_a_stale_nack(cache, key):
    first, second = signed_snapshot(key, 1), signed_snapshot(key, 2)
    cache.offer(second)
    replay = _delta_message(key, second, first, 2)
    with pytest.raises(SnapshotRejected) as refused:
        cache.offer_delta(replay)
    assert refused.value.reason == pb.NACK_REASON_STALE_REVISION
    assert cache.current.revision == 2
