"""Export-style proofs: 100 inclusion proofs against one 1M-leaf tree, one by one vs shared subtrees."""

from __future__ import annotations

import os

import pytest

from planes.native import load
from planes.plugins.evidence.proofs import InclusionProofs

chain = load("chain")
SIZE = 1_000_000
INDICES = sorted(int.from_bytes(os.urandom(4), "big") % SIZE for _ in range(100))


@pytest.fixture(scope="module")
def hashes():
    return os.urandom(32 * SIZE)


@pytest.mark.benchmark(group="export-proofs-1M")
def test_100_proofs_one_by_one(benchmark, hashes):
    benchmark.pedantic(lambda: [chain.inclusion_proof(hashes, i, SIZE) for i in INDICES], rounds=3, iterations=1)


@pytest.mark.benchmark(group="export-proofs-1M")
def test_100_proofs_shared_subtrees(benchmark, hashes):
    def export():
        proofs = InclusionProofs(hashes, SIZE)
        return [proofs.path(i) for i in INDICES]

    benchmark.pedantic(export, rounds=3, iterations=1)
