"""Micro-benchmarks of the evidence hash chain (pytest-benchmark).

Each group pairs the native call with its baseline in the same run: chain
hashing of 256-byte events against a Python hashlib loop doing the same work
(leaf hash, then chain hash); verify_chain and merkle_root of a 1M-event log
against the pure-Python twin; inclusion-proof verification in a 1M-leaf tree.
``bench/chain_runner.py`` prints the same comparisons as ratios in one table.
"""

from __future__ import annotations

import os
from array import array
from hashlib import sha256

import pytest

from planes.native import chain as native
from planes.native import chain_py as twin

ZERO = bytes(32)
EVENTS = 100_000
LOG = 1_000_000
THREADS = [1, native.DEFAULT_THREADS]


def threads_id(threads: int) -> str:
    return "native-1-thread" if threads == 1 else f"native-{threads}-threads"


def hashlib_loop(events):
    head, leaves, heads = ZERO, [], []
    for event in events:
        leaf = sha256(b"\x00" + event).digest()
        head = sha256(head + leaf).digest()
        leaves.append(leaf)
        heads.append(head)
    return b"".join(leaves), b"".join(heads)


@pytest.fixture(scope="module")
def events():
    items = [os.urandom(256) for _ in range(EVENTS)]
    return items, b"".join(items), array("Q", range(0, 256 * EVENTS + 1, 256))


@pytest.fixture(scope="module")
def log():
    leaves = os.urandom(32 * LOG)
    return leaves, native.chain(ZERO, leaves)


@pytest.mark.benchmark(group="chain: 100k events of 256 bytes")
def test_chain_hashlib_loop(benchmark, events):
    items, _, _ = events
    benchmark.extra_info["events"] = EVENTS
    benchmark.pedantic(hashlib_loop, args=(items,), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="chain: 100k events of 256 bytes")
def test_chain_twin(benchmark, events):
    _, data, offsets = events
    benchmark.pedantic(twin.hash_and_chain, args=(ZERO, data, offsets), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="chain: 100k events of 256 bytes")
@pytest.mark.parametrize("threads", THREADS, ids=threads_id)
def test_chain_native(benchmark, events, threads):
    _, data, offsets = events
    benchmark.pedantic(native.hash_and_chain, args=(ZERO, data, offsets), kwargs={"threads": threads},
                       rounds=15, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="verify_chain: 1M-event log")
@pytest.mark.parametrize("threads", THREADS, ids=threads_id)
def test_verify_chain_native(benchmark, log, threads):
    leaves, heads = log
    assert benchmark.pedantic(native.verify_chain, args=(ZERO, leaves, heads), kwargs={"threads": threads},
                              rounds=7, iterations=1) == -1


@pytest.mark.benchmark(group="verify_chain: 1M-event log")
def test_verify_chain_twin(benchmark, log):
    leaves, heads = log
    assert benchmark.pedantic(twin.verify_chain, args=(ZERO, leaves, heads), rounds=3, iterations=1) == -1


@pytest.mark.benchmark(group="merkle_root: 1M leaves")
@pytest.mark.parametrize("threads", THREADS, ids=threads_id)
def test_merkle_root_native(benchmark, log, threads):
    leaves, _ = log
    benchmark.pedantic(native.merkle_root, args=(leaves,), kwargs={"threads": threads}, rounds=7, iterations=1)


@pytest.mark.benchmark(group="merkle_root: 1M leaves")
def test_merkle_root_twin(benchmark, log):
    leaves, _ = log
    benchmark.pedantic(twin.merkle_root, args=(leaves,), rounds=3, iterations=1)


@pytest.fixture(scope="module")
def proof(log):
    leaves, _ = log
    index = LOG * 2 // 3 + 1
    path = native.inclusion_proof(leaves, index, LOG)
    return leaves[32 * index:32 * index + 32], index, path, native.merkle_root(leaves)


@pytest.mark.benchmark(group="inclusion proof: 1M-leaf tree")
def test_inclusion_proof_build_native(benchmark, log):
    leaves, _ = log
    path = benchmark.pedantic(native.inclusion_proof, args=(leaves, LOG * 2 // 3 + 1, LOG), rounds=7, iterations=1)
    benchmark.extra_info["proof_bytes"] = 32 * len(path)


@pytest.mark.benchmark(group="inclusion proof: 1M-leaf tree")
@pytest.mark.parametrize("module", [native, twin], ids=["verify-native", "verify-twin"])
def test_inclusion_proof_verify(benchmark, proof, module):
    leaf, index, path, root = proof
    benchmark.extra_info["proof_bytes"] = 32 * len(path)
    assert benchmark(module.verify_inclusion, leaf, index, LOG, path, root)
