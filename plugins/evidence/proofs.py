"""Many inclusion proofs against one tree, sharing the subtree hashes they need.

Proving one leaf rehashes every sibling subtree of its path: about n leaf
hashes. An export proves each of its k events against the same tree, and the
log proves many events against the same checkpoint. A subtree larger than
``SMALL`` leaves is hashed from its two halves and every such root is kept,
so the first proof costs about n hashes and leaves the tree's upper part
(about 2n / SMALL roots) memoized; each later proof then hashes only the
sibling subtrees below ``SMALL`` leaves on its path (native ``merkle_root``
over zero-copy slices of the leaf hashes), about 2 * SMALL hashes.
"""

from __future__ import annotations

from hashlib import sha256

from planes.native import load

chain = load("chain")

#: Subtrees of at most this many leaves are hashed in one native call, not from their halves.
SMALL = 1024


def _split(size: int) -> int:
    """The largest power of two smaller than ``size`` (RFC 6962's k)."""
    return 1 << ((size - 1).bit_length() - 1)


class InclusionProofs:
    """Audit paths (RFC 6962 PATH) for leaves of the tree over ``leaf_hashes[:size]``."""

    def __init__(self, leaf_hashes: bytes, size: int):
        if size < 0 or len(leaf_hashes) < size * 32:
            raise ValueError(f"tree size {size} needs {size * 32} bytes of leaf hashes, got {len(leaf_hashes)}")
        self._hashes = memoryview(leaf_hashes)
        self.size = size
        self._subtrees: dict[tuple[int, int], bytes] = {}

    def _subtree(self, start: int, end: int) -> bytes:
        key = (start, end)
        found = self._subtrees.get(key)
        if found is None:
            if end - start <= SMALL:
                found = chain.merkle_root(self._hashes[start * 32:end * 32])
            else:
                half = start + _split(end - start)
                found = sha256(b"\x01" + self._subtree(start, half) + self._subtree(half, end)).digest()
            self._subtrees[key] = found
        return found

    def path(self, index: int) -> list[bytes]:
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} is outside a tree of size {self.size}")
        siblings = []
        start, end = 0, self.size
        while end - start > 1:
            half = _split(end - start)
            if index - start < half:
                siblings.append(self._subtree(start + half, end))
                end = start + half
            else:
                siblings.append(self._subtree(start, start + half))
                start += half
        siblings.reverse()  # the audit path runs from the leaf up
        return siblings
