"""The evidence hash chain and RFC 6962 tree (planes.native.chain and its twin).

Each test runs on both implementations (the ``chain`` fixture). Expected values
come from the straightforward recursive RFC 6962 definitions below, written
from the RFC and independent of both implementations, and from the
certificate-transparency test vectors.
"""

from __future__ import annotations

import os
import random
import re
from array import array
from hashlib import sha256

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ZERO_HEAD = bytes(32)


# -- the reference: RFC 6962 section 2.1, as written -----------------------------

def ref_leaf(data: bytes) -> bytes:
    return sha256(b"\x00" + data).digest()


def ref_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: list[bytes]) -> bytes:
    """MTH over leaf *hashes*."""
    if not leaves:
        return sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = ref_split(len(leaves))
    return sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = ref_split(len(leaves))
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_mth(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = ref_split(n)
    if m <= k:
        return ref_subproof(m, leaves[:k], whole) + [ref_mth(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [ref_mth(leaves[:k])]


def ref_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    return ref_subproof(m, leaves, True) if 0 < m < len(leaves) else []


def ref_chain(head: bytes, leaves: list[bytes]) -> list[bytes]:
    heads = []
    for leaf in leaves:
        head = sha256(head + leaf).digest()
        heads.append(head)
    return heads


def pack(events: list[bytes]) -> tuple[bytes, array]:
    offsets = array("Q", [0])
    for event in events:
        offsets.append(offsets[-1] + len(event))
    return b"".join(events), offsets


def random_hashes(n: int, seed: int = 6962) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


# -- certificate-transparency test vectors ----------------------------------------

CT_LEAVES = [bytes.fromhex(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(x) for x in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (0-based index, tree size, audit path)
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def test_ct_vectors(chain):
    hashes = chain.leaf_hashes(*pack(CT_LEAVES))
    for size, root in enumerate(CT_ROOTS):
        assert chain.merkle_root(hashes, size) == root
    for index, size, path in CT_INCLUSION:
        proof = chain.inclusion_proof(hashes, index, size)
        assert [p.hex() for p in proof] == path
        assert chain.verify_inclusion(hashes[index * 32:index * 32 + 32], index, size, proof, CT_ROOTS[size])
    for old, new, path in CT_CONSISTENCY:
        proof = chain.consistency_proof(hashes, old, new)
        assert [p.hex() for p in proof] == path
        assert chain.verify_consistency(old, new, CT_ROOTS[old], CT_ROOTS[new], proof)


def test_reference_matches_ct_vectors():
    leaves = [ref_leaf(x) for x in CT_LEAVES]
    assert [ref_mth(leaves[:n]) for n in range(9)] == CT_ROOTS


# -- the API surface ----------------------------------------------------------------

def test_both_implementations_have_the_same_api(chain, twin):
    assert chain.HASH_SIZE == 32
    assert chain.__all__ == twin.__all__
    for name in chain.__all__:
        assert hasattr(chain, name), name
    for name in ("MAX_SIZE", "MAX_THREADS", "DEFAULT_THREADS", "EMPTY_ROOT", "FRONTIER_FORMAT"):
        assert getattr(chain, name) == getattr(twin, name)


# -- leaf hashes and the chain --------------------------------------------------------

def test_leaf_hashes_are_rfc6962_leaf_hashes(chain):
    events = [b"", b"a", b"evidence" * 40, bytes(range(256))]
    assert chain.leaf_hashes(*pack(events)) == b"".join(ref_leaf(e) for e in events)


def test_no_leaves(chain):
    assert chain.leaf_hashes(b"", array("Q", [0])) == b""
    assert chain.hash_and_chain(ZERO_HEAD, b"", array("Q", [0])) == (b"", b"")
    assert chain.chain(ZERO_HEAD, b"") == b""
    assert chain.verify_chain(ZERO_HEAD, b"", b"") == -1


def test_offsets_may_start_anywhere_and_skip_bytes(chain):
    data = b"xxHELLOyyWORLDzz"
    offsets = array("Q", [2, 7, 7, 9, 14])
    expected = b"".join(ref_leaf(x) for x in (b"HELLO", b"", b"yy", b"WORLD"))
    assert chain.leaf_hashes(data, offsets) == expected


@FUZZ
@given(events=st.lists(st.binary(max_size=300), max_size=40), head=st.binary(min_size=32, max_size=32))
def test_hash_and_chain_matches_reference(chain, events, head):
    data, offsets = pack(events)
    leaves, heads = chain.hash_and_chain(head, data, offsets)
    expected = [ref_leaf(e) for e in events]
    assert leaves == b"".join(expected)
    assert heads == b"".join(ref_chain(head, expected))
    assert chain.leaf_hashes(data, offsets) == leaves
    assert chain.chain(head, leaves) == heads
    assert chain.verify_chain(head, leaves, heads) == -1


@pytest.mark.parametrize("threads", [1, 2, 3, 64], ids=lambda t: f"threads={t}")
def test_big_batches_give_the_same_result_on_any_number_of_threads(chain, threads):
    rng = random.Random(threads)
    # Enough events for the threaded path, some of them big enough to end a chunk alone.
    events = [rng.randbytes(rng.choice((0, 1, 200, 256, 1000, 40_000))) for _ in range(3000)]
    data, offsets = pack(events)
    expected = [ref_leaf(e) for e in events]
    heads = ref_chain(ZERO_HEAD, expected)
    assert chain.hash_and_chain(ZERO_HEAD, data, offsets, threads=threads) == (b"".join(expected), b"".join(heads))
    assert chain.leaf_hashes(data, offsets, threads=threads) == b"".join(expected)


def test_a_log_continues_from_its_last_head(chain):
    events = [os.urandom(100) for _ in range(300)]
    leaves, heads = chain.hash_and_chain(ZERO_HEAD, *pack(events))
    first, first_heads = chain.hash_and_chain(ZERO_HEAD, *pack(events[:123]))
    second, second_heads = chain.hash_and_chain(first_heads[-32:], *pack(events[123:]))
    assert (first + second, first_heads + second_heads) == (leaves, heads)


def test_any_buffer_is_accepted(chain):
    events = [b"alpha", b"beta", b"gamma"]
    data, offsets = pack(events)
    expected = chain.hash_and_chain(ZERO_HEAD, data, offsets)
    datas = [bytearray(data), memoryview(data), pa.py_buffer(data), np.frombuffer(data, dtype=np.uint8),
             memoryview(b"--" + data)[2:]]
    offsetses = [np.array(offsets, dtype=np.uint64), np.array(offsets, dtype=np.int64), offsets.tobytes(),
                 bytearray(offsets.tobytes()), pa.py_buffer(offsets.tobytes()), array("q", offsets)]
    for d in datas:
        assert chain.hash_and_chain(ZERO_HEAD, d, offsets) == expected
    for o in offsetses:
        assert chain.hash_and_chain(ZERO_HEAD, data, o) == expected
    head = np.frombuffer(ZERO_HEAD, dtype=np.uint64)  # a hash may be any 32-byte buffer
    leaves, heads = expected
    assert chain.hash_and_chain(head, data, offsets) == expected
    assert chain.chain(bytearray(ZERO_HEAD), np.frombuffer(leaves, dtype=np.uint8)) == heads
    assert chain.merkle_root(pa.py_buffer(leaves)) == chain.merkle_root(leaves)


def test_verify_chain_locates_the_first_changed_leaf_or_head(chain):
    leaves = b"".join(random_hashes(50))
    heads = chain.chain(ZERO_HEAD, leaves)
    assert chain.verify_chain(ZERO_HEAD, leaves, heads) == -1
    for index in range(50):
        at = index * 32 + 7
        assert chain.verify_chain(ZERO_HEAD, flip(leaves, at), heads) == index
        assert chain.verify_chain(ZERO_HEAD, leaves, flip(heads, at)) == index
    assert chain.verify_chain(flip(ZERO_HEAD), leaves, heads) == 0
    # A tail rewritten consistently still breaks at its first changed leaf.
    forged_leaves = leaves[:20 * 32] + b"".join(random_hashes(30, seed=1))
    forged_heads = heads[:20 * 32] + chain.chain(heads[19 * 32:20 * 32], forged_leaves[20 * 32:])
    assert chain.verify_chain(ZERO_HEAD, forged_leaves, forged_heads) == -1
    assert chain.verify_chain(ZERO_HEAD, leaves, forged_heads) == 20


@pytest.mark.parametrize("index", [0, 1, 4095, 4096, 9999, 19_999], ids=lambda i: f"at={i}")
def test_verify_chain_locates_the_first_change_in_a_long_log(chain, index):
    leaves = b"".join(random_hashes(20_000))
    heads = chain.chain(ZERO_HEAD, leaves)
    tampered = flip(heads, index * 32)
    later = flip(tampered, 19_999 * 32 + 5) if index < 19_999 else tampered
    for threads in (1, 2, 4):
        assert chain.verify_chain(ZERO_HEAD, leaves, later, threads=threads) == index
        assert chain.verify_chain(ZERO_HEAD, leaves, heads, threads=threads) == -1


# -- the Merkle tree -------------------------------------------------------------------

def test_empty_tree_and_one_leaf(chain):
    assert chain.merkle_root(b"") == sha256(b"").digest()
    assert chain.merkle_root(b"".join(random_hashes(3)), 0) == sha256(b"").digest()
    leaf = ref_leaf(b"only")
    assert chain.merkle_root(leaf) == leaf
    assert chain.inclusion_proof(leaf, 0, 1) == []
    assert chain.verify_inclusion(leaf, 0, 1, [], leaf)


def test_roots_at_and_between_powers_of_two(chain):
    leaves = random_hashes(130)
    packed = b"".join(leaves)
    for size in range(131):
        assert chain.merkle_root(packed, size) == ref_mth(leaves[:size]), size
        assert chain.merkle_root(packed[:size * 32]) == ref_mth(leaves[:size]), size


@pytest.mark.parametrize("size", [1023, 1024, 1025, 2048, 3 * 1024 + 7, 5000], ids=lambda n: f"n={n}")
def test_big_roots_on_any_number_of_threads(chain, size):
    leaves = random_hashes(size)
    expected = ref_mth(leaves)
    for threads in (1, 2, 5):
        assert chain.merkle_root(b"".join(leaves), threads=threads) == expected


def test_inclusion_proofs_at_every_index(chain):
    leaves = random_hashes(70)
    packed = b"".join(leaves)
    for size in range(1, 71):
        root = ref_mth(leaves[:size])
        for index in range(size):
            proof = chain.inclusion_proof(packed, index, size)
            assert proof == ref_path(index, leaves[:size]), (index, size)
            assert chain.verify_inclusion(leaves[index], index, size, proof, root)


def test_inclusion_verifier_rejects_tampering(chain):
    leaves = random_hashes(37)
    packed = b"".join(leaves)
    for size in (1, 2, 3, 8, 13, 32, 37):
        root = ref_mth(leaves[:size])
        for index in range(size):
            proof = chain.inclusion_proof(packed, index, size)
            leaf = leaves[index]
            assert not chain.verify_inclusion(flip(leaf), index, size, proof, root)
            assert not chain.verify_inclusion(leaf, index, size, proof, flip(root, 31))
            for at in range(len(proof)):
                bad = list(proof)
                bad[at] = flip(bad[at], at)
                assert not chain.verify_inclusion(leaf, index, size, bad, root)
            for other in range(size):
                if other != index:
                    assert not chain.verify_inclusion(leaf, other, size, proof, root), (index, other, size)
            assert not chain.verify_inclusion(leaf, index, size, proof + [leaf], root)
            if proof:
                assert not chain.verify_inclusion(leaf, index, size, proof[:-1], root)
            if len(proof) > 1:
                assert not chain.verify_inclusion(leaf, index, size, proof[::-1], root)


def test_consistency_proofs_for_every_pair(chain):
    leaves = random_hashes(40)
    packed = b"".join(leaves)
    roots = [ref_mth(leaves[:n]) for n in range(41)]
    for new in range(41):
        for old in range(new + 1):
            proof = chain.consistency_proof(packed, old, new)
            assert proof == ref_proof(old, leaves[:new]), (old, new)
            assert chain.verify_consistency(old, new, roots[old], roots[new], proof), (old, new)


def test_consistency_verifier_rejects_tampering(chain):
    leaves = random_hashes(33)
    packed = b"".join(leaves)
    roots = [ref_mth(leaves[:n]) for n in range(34)]
    for new in range(1, 34):
        for old in range(1, new):
            proof = chain.consistency_proof(packed, old, new)
            assert not chain.verify_consistency(old, new, flip(roots[old]), roots[new], proof)
            assert not chain.verify_consistency(old, new, roots[old], flip(roots[new]), proof)
            for at in range(len(proof)):
                bad = list(proof)
                bad[at] = flip(bad[at], 31 - at)
                assert not chain.verify_consistency(old, new, roots[old], roots[new], bad), (old, new, at)
            assert not chain.verify_consistency(old, new, roots[old], roots[new], proof[:-1])
            assert not chain.verify_consistency(old, new, roots[old], roots[new], proof + [roots[old]])
            assert not chain.verify_consistency(old, new, roots[old], roots[new], [])
            if old + 1 < new:
                assert not chain.verify_consistency(old + 1, new, roots[old], roots[new], proof)


def test_consistency_edges(chain):
    leaves = random_hashes(5)
    root = ref_mth(leaves)
    empty = sha256(b"").digest()
    assert chain.verify_consistency(5, 5, root, root, [])
    assert not chain.verify_consistency(5, 5, root, flip(root), [])
    assert not chain.verify_consistency(5, 5, root, root, [root])
    assert chain.verify_consistency(0, 5, empty, root, [])
    assert not chain.verify_consistency(0, 5, root, root, [])
    assert not chain.verify_consistency(0, 5, empty, root, [root])
    assert chain.verify_consistency(0, 0, empty, empty, [])


def test_frontier_matches_merkle_root_at_every_size(chain):
    leaves = random_hashes(140)
    frontier = chain.MerkleFrontier()
    assert frontier.size == 0 and frontier.root() == sha256(b"").digest()
    for size, leaf in enumerate(leaves, 1):
        frontier.append(leaf)
        assert frontier.size == size
        assert frontier.root() == ref_mth(leaves[:size]), size
        restored = chain.MerkleFrontier.from_bytes(frontier.to_bytes())
        assert (restored.size, restored.root(), restored.to_bytes()) == (size, frontier.root(), frontier.to_bytes())


@settings(FUZZ, max_examples=40)
@given(batches=st.lists(st.integers(0, 1500), max_size=6))
def test_frontier_in_batches_survives_persistence(chain, batches):
    leaves = random_hashes(sum(batches))
    packed = b"".join(leaves)
    frontier, at = chain.MerkleFrontier(), 0
    for count in batches:
        frontier = chain.MerkleFrontier.from_bytes(frontier.to_bytes())
        frontier.append(memoryview(packed)[at * 32:(at + count) * 32])
        at += count
        assert frontier.size == at
    assert frontier.root() == chain.merkle_root(packed) == ref_mth(leaves)


@pytest.mark.parametrize("first", [0, 1, 700, 1024, 3000], ids=lambda n: f"after={n}")
def test_frontier_takes_big_batches_at_any_size(chain, first):
    leaves = random_hashes(first + 5000)
    packed = b"".join(leaves)
    frontier = chain.MerkleFrontier()
    frontier.append(packed[:first * 32])
    frontier.append(packed[first * 32:])
    assert frontier.size == first + 5000
    assert frontier.root() == ref_mth(leaves)


def test_frontier_format(chain):
    frontier = chain.MerkleFrontier()
    frontier.append(b"".join(random_hashes(5)))
    data = frontier.to_bytes()
    assert data[0] == 1 and int.from_bytes(data[1:9], "big") == 5 and len(data) == 9 + 2 * 32
    assert repr(frontier) == "MerkleFrontier(size=5)"


# -- bad input -----------------------------------------------------------------------------

def _raises(exception, pattern, function, *args, **kwargs):
    with pytest.raises(exception, match=pattern) as raised:
        function(*args, **kwargs)
    return str(raised.value)


def test_misized_hashes_name_the_argument_and_size(chain):
    leaves = b"".join(random_hashes(4))
    root = ref_mth(random_hashes(4))
    _raises(ValueError, r"previous_head must be a 32-byte SHA-256 hash, got 31 bytes",
            chain.chain, ZERO_HEAD[:31], leaves)
    _raises(ValueError, r"previous_head .* got 33 bytes", chain.hash_and_chain, ZERO_HEAD + b"x", b"", array("Q", [0]))
    _raises(ValueError, r"leaf_hashes must be a whole number of 32-byte hashes, got 127 bytes",
            chain.chain, ZERO_HEAD, leaves[:-1])
    _raises(ValueError, r"heads must be a whole number of 32-byte hashes, got 129 bytes",
            chain.verify_chain, ZERO_HEAD, leaves, leaves + b"x")
    _raises(ValueError, r"heads holds 3 hashes but leaf_hashes holds 4",
            chain.verify_chain, ZERO_HEAD, leaves, leaves[:96])
    _raises(ValueError, r"leaf_hashes .* got 33 bytes", chain.merkle_root, leaves[:33])
    _raises(ValueError, r"leaf_hashes .* got 1 bytes", chain.inclusion_proof, b"x", 0, 1)
    _raises(ValueError, r"leaf_hashes .* got 31 bytes", chain.consistency_proof, leaves[:31], 0, 0)
    _raises(ValueError, r"leaf_hash must be a 32-byte SHA-256 hash, got 0 bytes",
            chain.verify_inclusion, b"", 0, 1, [], root)
    _raises(ValueError, r"root .* got 64 bytes", chain.verify_inclusion, root, 0, 1, [], root * 2)
    _raises(ValueError, r"proof\[1\] must be a 32-byte SHA-256 hash, got 16 bytes",
            chain.verify_inclusion, root, 0, 4, [root, root[:16]], root)
    _raises(ValueError, r"old_root .* got 2 bytes", chain.verify_consistency, 1, 2, b"ab", root, [root])
    _raises(ValueError, r"new_root .* got 31 bytes", chain.verify_consistency, 1, 2, root, root[1:], [root])
    _raises(ValueError, r"proof\[0\] .* got 0 bytes", chain.verify_consistency, 1, 2, root, root, [b""])
    _raises(ValueError, r"leaf_hashes .* got 3 bytes", chain.MerkleFrontier().append, b"abc")


def test_bad_offsets_say_where_and_what(chain):
    data = b"0123456789"
    message = _raises(ValueError, r"offsets\[2\] = 3 is less than offsets\[1\] = 5: offsets must not decrease",
                      chain.leaf_hashes, data, array("Q", [0, 5, 3, 10]))
    assert "offsets[2]" in message
    _raises(ValueError, r"offsets\[3\] = 11 is beyond the end of data \(10 bytes\)",
            chain.hash_and_chain, ZERO_HEAD, data, array("Q", [0, 5, 6, 11]))
    _raises(ValueError, r"offsets\[0\] = 18446744073709551615 is beyond", chain.leaf_hashes, data, array("q", [-1, 2]))
    _raises(ValueError, r"8 bytes each\), got 12 bytes", chain.leaf_hashes, data, bytes(12))
    _raises(ValueError, r"got 0 bytes", chain.leaf_hashes, data, b"")
    _raises(ValueError, r"format 'I' with 4-byte items", chain.leaf_hashes, data, array("I", [0, 1, 2, 3]))
    _raises(ValueError, r"format 'd'", chain.leaf_hashes, data, np.array([0.0, 1.0]))
    _raises(ValueError, r"offsets must be a C-contiguous buffer", chain.leaf_hashes, data,
            np.arange(8, dtype=np.uint64)[::2])
    _raises(ValueError, r"data must be a C-contiguous buffer", chain.leaf_hashes,
            np.arange(8, dtype=np.uint8)[::2], array("Q", [0]))
    _raises(TypeError, r"offsets must be a buffer of uint64, not list", chain.leaf_hashes, data, [0, 5, 10])
    _raises(TypeError, r"data must be a bytes-like object, not str", chain.leaf_hashes, "text", array("Q", [0]))


def test_impossible_sizes_and_indices(chain):
    leaves = b"".join(random_hashes(8))
    root = ref_mth(random_hashes(8))
    _raises(ValueError, r"index = 8 must be less than size = 8", chain.inclusion_proof, leaves, 8, 8)
    _raises(ValueError, r"index = 0 must be less than size = 0", chain.inclusion_proof, leaves, 0, 0)
    _raises(ValueError, r"size = 9 exceeds the 8 leaf hashes given", chain.inclusion_proof, leaves, 0, 9)
    _raises(ValueError, r"index must not be negative, got -1", chain.inclusion_proof, leaves, -1, 8)
    _raises(ValueError, r"size = 9 exceeds the 8 leaf hashes given", chain.merkle_root, leaves, 9)
    _raises(ValueError, r"size must not be negative", chain.merkle_root, leaves, -1)
    _raises(ValueError, r"old_size = 5 must not exceed new_size = 4", chain.consistency_proof, leaves, 5, 4)
    _raises(ValueError, r"new_size = 9 exceeds the 8 leaf hashes", chain.consistency_proof, leaves, 1, 9)
    _raises(ValueError, r"index = 3 must be less than size = 3", chain.verify_inclusion, root, 3, 3, [], root)
    _raises(ValueError, r"size = 9223372036854775808 exceeds the largest supported size",
            chain.verify_inclusion, root, 0, 2**63, [], root)
    _raises(ValueError, r"old_size = 3 must not exceed new_size = 2",
            chain.verify_consistency, 3, 2, root, root, [root])
    _raises(ValueError, r"old_size must not be negative", chain.verify_consistency, -1, 2, root, root, [])
    _raises(ValueError, r"threads must be at least 1, got 0", chain.merkle_root, leaves, threads=0)
    _raises(TypeError, None, chain.merkle_root, leaves, 1.5)
    _raises(TypeError, r"proof must be a sequence of 32-byte hashes, not bytes",
            chain.verify_inclusion, root, 0, 2, root, root)


def test_bad_frontier_data_is_refused_and_a_failed_append_changes_nothing(chain):
    frontier = chain.MerkleFrontier()
    frontier.append(b"".join(random_hashes(6)))
    good = frontier.to_bytes()
    _raises(ValueError, r"at least 9 bytes .* got 0", chain.MerkleFrontier.from_bytes, b"")
    _raises(ValueError, r"format 2, expected 1", chain.MerkleFrontier.from_bytes, b"\x02" + good[1:])
    _raises(ValueError, r"for size 6 must be 73 bytes \(9 \+ 2 x 32\), got 72",
            chain.MerkleFrontier.from_bytes, good[:-1])
    _raises(ValueError, r"got 74", chain.MerkleFrontier.from_bytes, good + b"\x00")
    _raises(ValueError, r"frontier size 18446744073709551615 exceeds",
            chain.MerkleFrontier.from_bytes, b"\x01" + b"\xff" * 8 + bytes(64 * 32))
    _raises(ValueError, r"leaf_hashes .* got 40 bytes", frontier.append, bytes(40))
    huge = chain.MerkleFrontier.from_bytes(b"\x01" + (2**63 - 1).to_bytes(8, "big") + bytes(63 * 32))
    _raises(ValueError, r"appending 1 leaves to 9223372036854775807 would exceed", huge.append, bytes(32))
    assert huge.size == 2**63 - 1
    assert frontier.to_bytes() == good


@FUZZ
@given(data=st.binary(max_size=200), offsets=st.binary(max_size=80), head=st.binary(max_size=40),
       threads=st.integers(-1, 20))
def test_random_bytes_never_crash(chain, twin, data, offsets, head, threads):
    def outcome(module, function, *args, **kwargs):
        try:
            return getattr(module, function)(*args, **kwargs)
        except (ValueError, TypeError) as error:
            return type(error), str(error)

    for function, args in [("leaf_hashes", (data, offsets)), ("hash_and_chain", (head, data, offsets)),
                           ("chain", (head, data)), ("merkle_root", (data,)), ("verify_chain", (head, data, data))]:
        kwargs = {"threads": threads} if function not in ("chain",) else {}
        assert outcome(chain, function, *args, **kwargs) == outcome(twin, function, *args, **kwargs)
    assert outcome(chain.MerkleFrontier, "from_bytes", data + offsets) == outcome(twin.MerkleFrontier, "from_bytes",
                                                                                    data + offsets)


@FUZZ
@given(proof=st.lists(st.binary(min_size=31, max_size=33), max_size=70), index=st.integers(-2, 2**64),
       size=st.integers(-2, 2**64), leaf=st.binary(min_size=32, max_size=32))
def test_random_proofs_give_an_answer_never_a_crash(chain, twin, proof, index, size, leaf):
    def outcome(module, function, *args):
        try:
            return getattr(module, function)(*args)
        except ValueError as error:
            return str(error)

    for args in [("verify_inclusion", leaf, index, size, proof, leaf),
                 ("verify_consistency", index, size, leaf, leaf, proof)]:
        assert outcome(chain, *args) == outcome(twin, *args)
    sized = [p[:32].ljust(32, b"\x00") for p in proof]
    for args in [("verify_inclusion", leaf, index % 64, 64, sized, leaf),
                 ("verify_consistency", index % 64 + 1, 65 + size % 64, leaf, leaf, sized)]:
        assert outcome(chain, *args) is False


@FUZZ
@given(events=st.lists(st.binary(max_size=64), min_size=1, max_size=40), data=st.data())
def test_twin_parity_on_proofs_and_frontiers(chain, twin, events, data):
    packed, offsets = pack(events)
    leaves, heads = chain.hash_and_chain(ZERO_HEAD, packed, offsets)
    assert (leaves, heads) == twin.hash_and_chain(ZERO_HEAD, packed, offsets)
    n = len(events)
    index = data.draw(st.integers(0, n - 1))
    old = data.draw(st.integers(0, n))
    assert chain.inclusion_proof(leaves, index, n) == twin.inclusion_proof(leaves, index, n)
    assert chain.consistency_proof(leaves, old, n) == twin.consistency_proof(leaves, old, n)
    mine, theirs = chain.MerkleFrontier(), twin.MerkleFrontier()
    mine.append(leaves)
    theirs.append(leaves)
    assert mine.to_bytes() == theirs.to_bytes()
    assert chain.MerkleFrontier.from_bytes(theirs.to_bytes()).root() == twin.merkle_root(leaves)
    assert re.fullmatch(r"MerkleFrontier\(size=\d+\)", repr(mine))
