"""Shared-subtree inclusion proofs equal the native module's, at every index."""

from __future__ import annotations

import hashlib

import pytest

from planes.native import load
from planes.plugins.evidence.proofs import InclusionProofs

chain = load("chain")


def _leaves(count: int) -> bytes:
    return b"".join(hashlib.sha256(b"\x00" + i.to_bytes(4, "big")).digest() for i in range(count))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100])
def test_every_path_matches_the_reference(size):
    hashes = _leaves(size + 5)  # more leaves stored than the tree covers
    proofs = InclusionProofs(hashes, size)
    root = chain.merkle_root(hashes[:size * 32])
    for index in range(size):
        path = proofs.path(index)
        assert path == chain.inclusion_proof(hashes, index, size)
        assert chain.verify_inclusion(hashes[index * 32:index * 32 + 32], index, size, path, root)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="outside a tree of size 3"):
        InclusionProofs(_leaves(3), 3).path(3)
    with pytest.raises(ValueError, match="needs 128 bytes"):
        InclusionProofs(_leaves(3), 4)


@pytest.mark.parametrize("size", [1025, 2048, 3000, 5000])
def test_paths_through_memoized_halves_match_the_reference(size):
    """Trees larger than SMALL leaves: roots built from memoized halves give the same paths."""
    hashes = _leaves(size)
    proofs = InclusionProofs(hashes, size)
    root = chain.merkle_root(hashes)
    for index in sorted({0, 1, 1023, 1024, min(1025, size - 1), size // 2, size - 2, size - 1}):
        path = proofs.path(index)
        assert path == chain.inclusion_proof(hashes, index, size)
        assert chain.verify_inclusion(hashes[index * 32:index * 32 + 32], index, size, path, root)
