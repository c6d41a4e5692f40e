"""The evidence hash chain and RFC 6962 Merkle tree: the pure-Python twin of ``chain.pyx``.

Same API, same results and the same errors as the compiled module, on
:mod:`hashlib`; ``PLANES_NO_EXTENSIONS=1`` selects it (see :mod:`planes.native`).
Every hash is SHA-256 (32 bytes).

- Leaf hash (RFC 6962): ``SHA-256(0x00 || leaf)``; node hash:
  ``SHA-256(0x01 || left || right)``.
- Chain: ``head_i = SHA-256(head_{i-1} || leaf_hash_i)``; a log starts from
  ``head_{-1}`` = 32 zero bytes.
- Merkle tree hash (MTH), inclusion and consistency proofs: RFC 6962 section
  2.1; the verifiers are the algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2.

Arguments are any buffer-protocol object (bytes, bytearray, memoryview,
pyarrow.Buffer, numpy arrays). A hash argument of the wrong size, a batch of
hashes that is not a multiple of 32 bytes and an impossible size or index are
ValueErrors that name the argument and the numbers. A proof of the right shape
that does not verify is ``False``, never an exception.

``threads`` (keyword) is accepted for parity with the compiled module, which
spreads batch hashing over that many threads; here it is validated and ignored.
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterable
from hashlib import sha256

__all__ = [
    "HASH_SIZE",
    "MerkleFrontier",
    "chain",
    "consistency_proof",
    "hash_and_chain",
    "inclusion_proof",
    "leaf_hashes",
    "merkle_root",
    "verify_chain",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
#: The largest tree size, index or batch count accepted (sizes travel as int64).
MAX_SIZE = 2**63 - 1
#: Most threads a batch call may use (``threads=`` above this is capped).
MAX_THREADS = 16
EMPTY_ROOT = sha256(b"").digest()
FRONTIER_FORMAT = 1

_LEAF = b"\x00"
_NODE = b"\x01"
_OFFSET_FORMATS = {"Q", "L", "q", "l"} | ({"<Q", "<L", "<q", "<l"} if sys.byteorder == "little" else set())


# -- arguments ---------------------------------------------------------------

def _bytes_view(value, name: str) -> memoryview:
    """A flat, C-contiguous byte view of a buffer-protocol object."""
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(value).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _hash_arg(value, name: str) -> bytes:
    data = bytes(_bytes_view(value, name))
    if len(data) != HASH_SIZE:
        raise ValueError(f"{name} must be a {HASH_SIZE}-byte SHA-256 hash, got {len(data)} bytes")
    return data


def _hashes_arg(value, name: str) -> memoryview:
    view = _bytes_view(value, name)
    if view.nbytes % HASH_SIZE:
        raise ValueError(f"{name} must be a whole number of {HASH_SIZE}-byte hashes, got {view.nbytes} bytes")
    return view


def _count_arg(value, name: str) -> int:
    number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > MAX_SIZE:
        raise ValueError(f"{name} = {number} exceeds the largest supported size, {MAX_SIZE}")
    return number


def _threads_arg(value) -> int:
    if value is None:
        return DEFAULT_THREADS
    number = operator.index(value)
    if number < 1:
        raise ValueError(f"threads must be at least 1, got {number}")
    return min(number, MAX_THREADS)


def _proof_arg(proof, name: str = "proof") -> list[bytes]:
    if isinstance(proof, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"{name} must be a sequence of {HASH_SIZE}-byte hashes, not {type(proof).__name__}")
    return [_hash_arg(node, f"{name}[{i}]") for i, node in enumerate(proof)]


def _offsets_arg(offsets, data_size: int) -> list[int]:
    """Validated offsets: n + 1 native uint64, none decreasing, none past ``data_size``."""
    try:
        view = memoryview(offsets)
    except TypeError:
        raise TypeError(f"offsets must be a buffer of uint64, not {type(offsets).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("offsets must be a C-contiguous buffer")
    if view.format not in ("B", "b", "c") and (view.itemsize != 8 or view.format not in _OFFSET_FORMATS):
        raise ValueError(f"offsets must hold native 8-byte unsigned integers (array('Q'), numpy uint64) "
                         f"or raw bytes, got format {view.format!r} with {view.itemsize}-byte items")
    raw = view.cast("B") if view.ndim != 1 or view.format != "B" else view
    if raw.nbytes % 8 or raw.nbytes == 0:
        raise ValueError(f"offsets must be n + 1 >= 1 uint64 values (8 bytes each), got {raw.nbytes} bytes")
    values = raw.cast("Q").tolist()
    previous = 0
    for index, value in enumerate(values):
        if value > data_size:
            raise ValueError(f"offsets[{index}] = {value} is beyond the end of data ({data_size} bytes)")
        if index and value < previous:
            raise ValueError(f"offsets[{index}] = {value} is less than offsets[{index - 1}] = {previous}: "
                             "offsets must not decrease")
        previous = value
    return values


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


#: Threads a batch call uses by default: the CPUs this process may run on.
DEFAULT_THREADS = _default_threads()


# -- hashing -------------------------------------------------------------------

def _node(left: bytes, right: bytes) -> bytes:
    return sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def leaf_hashes(data, offsets, *, threads=None) -> bytes:
    """RFC 6962 leaf hashes of the leaves ``data[offsets[i]:offsets[i + 1]]``; n * 32 bytes."""
    _threads_arg(threads)
    view = _bytes_view(data, "data")
    bounds = _offsets_arg(offsets, view.nbytes)
    out = []
    for start, end in zip(bounds, bounds[1:]):
        digest = sha256(_LEAF)
        digest.update(view[start:end])
        out.append(digest.digest())
    return b"".join(out)


def chain(previous_head, leaf_hashes) -> bytes:
    """All n heads ``h_i = SHA-256(h_{i-1} || leaf_hash_i)``, from ``h_{-1} = previous_head``."""
    head = _hash_arg(previous_head, "previous_head")
    hashes = bytes(_hashes_arg(leaf_hashes, "leaf_hashes"))
    heads = []
    for at in range(0, len(hashes), HASH_SIZE):
        head = sha256(head + hashes[at:at + HASH_SIZE]).digest()
        heads.append(head)
    return b"".join(heads)


def hash_and_chain(previous_head, data, offsets, *, threads=None) -> tuple[bytes, bytes]:
    """(leaf hashes, heads) of a batch: :func:`leaf_hashes` then :func:`chain`, in one pass."""
    head = _hash_arg(previous_head, "previous_head")
    _threads_arg(threads)
    view = _bytes_view(data, "data")
    bounds = _offsets_arg(offsets, view.nbytes)
    leaves, heads = [], []
    for start, end in zip(bounds, bounds[1:]):
        digest = sha256(_LEAF)
        digest.update(view[start:end])
        leaf = digest.digest()
        head = sha256(head + leaf).digest()
        leaves.append(leaf)
        heads.append(head)
    return b"".join(leaves), b"".join(heads)


def verify_chain(previous_head, leaf_hashes, heads, *, threads=None) -> int:
    """Index of the first head that does not match the recomputed chain, or -1 when all match."""
    head = _hash_arg(previous_head, "previous_head")
    hashes = bytes(_hashes_arg(leaf_hashes, "leaf_hashes"))
    stored = bytes(_hashes_arg(heads, "heads"))
    _threads_arg(threads)
    if len(stored) != len(hashes):
        raise ValueError(f"heads holds {len(stored) // HASH_SIZE} hashes but leaf_hashes holds "
                         f"{len(hashes) // HASH_SIZE}; they must match")
    for index, at in enumerate(range(0, len(hashes), HASH_SIZE)):
        expected = stored[at:at + HASH_SIZE]
        if sha256(head + hashes[at:at + HASH_SIZE]).digest() != expected:
            return index
        head = expected
    return -1


# -- the Merkle tree -------------------------------------------------------------

def _mth(hashes: bytes, start: int, count: int) -> bytes:
    """MTH of ``count`` leaf hashes from index ``start``."""
    frontier = MerkleFrontier()
    frontier._extend(hashes, start, count)
    return frontier.root()


def _tree_args(leaf_hashes, size, name: str) -> tuple[bytes, int]:
    hashes = bytes(_hashes_arg(leaf_hashes, "leaf_hashes"))
    count = len(hashes) // HASH_SIZE
    size = count if size is None else _count_arg(size, name)
    if size > count:
        raise ValueError(f"{name} = {size} exceeds the {count} leaf hashes given")
    return hashes, size


def merkle_root(leaf_hashes, size=None, *, threads=None) -> bytes:
    """RFC 6962 MTH of the first ``size`` leaf hashes (default: all of them)."""
    hashes, size = _tree_args(leaf_hashes, size, "size")
    _threads_arg(threads)
    return _mth(hashes, 0, size)


def inclusion_proof(leaf_hashes, index, size) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]): the audit path, from the leaf's sibling up."""
    hashes, size = _tree_args(leaf_hashes, size, "size")
    index = _count_arg(index, "index")
    if index >= size:
        raise ValueError(f"index = {index} must be less than size = {size}")
    path = []
    start, n = 0, size
    while n > 1:
        k = _split(n)
        if index < k:
            path.append(_mth(hashes, start + k, n - k))
            n = k
        else:
            path.append(_mth(hashes, start, k))
            start, index, n = start + k, index - k, n - k
    path.reverse()
    return path


def consistency_proof(leaf_hashes, old_size, new_size) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:new_size]); empty when old_size is 0 or equals new_size."""
    hashes, new_size = _tree_args(leaf_hashes, new_size, "new_size")
    old_size = _count_arg(old_size, "old_size")
    if old_size > new_size:
        raise ValueError(f"old_size = {old_size} must not exceed new_size = {new_size}")
    if old_size in (0, new_size):
        return []
    path = []
    start, m, n, whole = 0, old_size, new_size, True
    while m != n:
        k = _split(n)
        if m <= k:
            path.append(_mth(hashes, start + k, n - k))
            n = k
        else:
            path.append(_mth(hashes, start, k))
            start, m, n, whole = start + k, m - k, n - k, False
    if not whole:
        path.append(_mth(hashes, start, n))
    path.reverse()
    return path


def verify_inclusion(leaf_hash, index, size, proof: Iterable, root) -> bool:
    """RFC 9162 2.1.3.2: does ``proof`` place ``leaf_hash`` at ``index`` of the tree of ``size`` with ``root``?"""
    r = _hash_arg(leaf_hash, "leaf_hash")
    index = _count_arg(index, "index")
    size = _count_arg(size, "size")
    path = _proof_arg(proof)
    root = _hash_arg(root, "root")
    if index >= size:
        raise ValueError(f"index = {index} must be less than size = {size}")
    fn, sn = index, size - 1
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(old_size, new_size, old_root, new_root, proof: Iterable) -> bool:
    """RFC 9162 2.1.4.2: is the tree (old_size, old_root) a prefix of (new_size, new_root)?

    Equal sizes need an empty proof and equal roots; old_size 0 needs an empty
    proof and the empty tree's root.
    """
    old_size = _count_arg(old_size, "old_size")
    new_size = _count_arg(new_size, "new_size")
    old_root = _hash_arg(old_root, "old_root")
    new_root = _hash_arg(new_root, "new_root")
    path = _proof_arg(proof)
    if old_size > new_size:
        raise ValueError(f"old_size = {old_size} must not exceed new_size = {new_size}")
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path and old_root == EMPTY_ROOT
    if not path:
        return False
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root


class MerkleFrontier:
    """The compact range of a growing RFC 6962 tree: one root per perfect subtree.

    Holds the roots of the perfect subtrees the leaves so far decompose into
    (one per set bit of ``size``, largest first), so appending costs O(1)
    amortized and :meth:`root` O(log size), without re-reading the log.
    ``to_bytes`` / ``from_bytes`` persist it: a format byte (1), the size as
    8 bytes big-endian, then the subtree roots.
    """

    __slots__ = ("_nodes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._nodes: list[bytes] = []

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def append(self, leaf_hashes) -> None:
        """Append a batch of leaf hashes (a whole number of 32-byte hashes)."""
        hashes = bytes(_hashes_arg(leaf_hashes, "leaf_hashes"))
        count = len(hashes) // HASH_SIZE
        if self._size + count > MAX_SIZE:
            raise ValueError(f"appending {count} leaves to {self._size} would exceed the largest supported "
                             f"size, {MAX_SIZE}")
        self._extend(hashes, 0, count)

    def _extend(self, hashes: bytes, start: int, count: int) -> None:
        nodes, size = self._nodes, self._size
        for at in range(start * HASH_SIZE, (start + count) * HASH_SIZE, HASH_SIZE):
            node = hashes[at:at + HASH_SIZE]
            bit = 1
            while size & bit:
                node = _node(nodes.pop(), node)
                bit <<= 1
            nodes.append(node)
            size += 1
        self._size = size

    def root(self) -> bytes:
        """The RFC 6962 MTH of the leaves so far (SHA-256 of nothing for none)."""
        if not self._nodes:
            return EMPTY_ROOT
        root = self._nodes[-1]
        for node in reversed(self._nodes[:-1]):
            root = _node(node, root)
        return root

    def to_bytes(self) -> bytes:
        return bytes([FRONTIER_FORMAT]) + self._size.to_bytes(8, "big") + b"".join(self._nodes)

    @classmethod
    def from_bytes(cls, data) -> MerkleFrontier:
        """The frontier that :meth:`to_bytes` wrote; ValueError for anything else."""
        raw = bytes(_bytes_view(data, "data"))
        if len(raw) < 9:
            raise ValueError(f"frontier data must be at least 9 bytes (format byte and size), got {len(raw)}")
        if raw[0] != FRONTIER_FORMAT:
            raise ValueError(f"frontier data has format {raw[0]}, expected {FRONTIER_FORMAT}")
        size = int.from_bytes(raw[1:9], "big")
        if size > MAX_SIZE:
            raise ValueError(f"frontier size {size} exceeds the largest supported size, {MAX_SIZE}")
        expected = 9 + size.bit_count() * HASH_SIZE
        if len(raw) != expected:
            raise ValueError(f"frontier data for size {size} must be {expected} bytes "
                             f"(9 + {size.bit_count()} x {HASH_SIZE}), got {len(raw)}")
        frontier = cls()
        frontier._size = size
        frontier._nodes = [raw[at:at + HASH_SIZE] for at in range(9, expected, HASH_SIZE)]
        return frontier

    def __repr__(self) -> str:
        return f"MerkleFrontier(size={self._size})"
