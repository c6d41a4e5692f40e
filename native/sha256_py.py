"""SHA-256 of many independent messages: the pure-Python twin of ``sha256.pyx``.

Same API, results and errors as the compiled module, on :mod:`hashlib`;
``PLANES_NO_EXTENSIONS=1`` selects it (see :mod:`planes.native`). The
compiled module hashes up to 16 messages side by side in vector lanes
(multi-buffer SHA-256, AVX-512 or AVX2, else OpenSSL one at a time); the
native chain and batch encoder use the same code. Here it exists so that
the rule and its errors are stated once and tested on both:

- ``hash_many(data, offsets, head=b"")`` returns the concatenated digests
  ``SHA-256(head || data[offsets[i]:offsets[i + 1]])`` for i < n, n * 32
  bytes (``offsets``: n + 1 native uint64 values, as in :mod:`.chain`);
- ``implementation`` names which code computes them: one of
  :func:`implementations` (the default, :func:`implementation`, is the
  fastest one this CPU supports, capped by ``PLANES_SHA256=openssl|avx2``).
"""

from __future__ import annotations

from hashlib import sha256

from planes.native.chain_py import _OFFSET_FORMATS, _bytes_view, _offsets_arg  # noqa: F401 (the compiled twin uses them)

__all__ = ["hash_many", "implementation", "implementations"]


def implementations() -> tuple[str, ...]:
    """The implementations this process can run, fastest first."""
    return ("hashlib",)


def implementation() -> str:
    """The implementation :func:`hash_many` uses by default."""
    return "hashlib"


def _implementation_arg(value, supported: tuple[str, ...]) -> str:
    if value is None:
        return supported[0]
    if value not in supported:
        raise ValueError(f"implementation must be one of {', '.join(supported)} on this machine, got {value!r}")
    return value


def hash_many(data, offsets, *, head=b"", implementation=None) -> bytes:
    """SHA-256 of ``head || data[offsets[i]:offsets[i + 1]]`` for each i; n * 32 bytes."""
    _implementation_arg(implementation, implementations())
    view = _bytes_view(data, "data")
    prefix = bytes(_bytes_view(head, "head"))
    bounds = _offsets_arg(offsets, view.nbytes)
    out = []
    for start, end in zip(bounds, bounds[1:]):
        digest = sha256(prefix)
        digest.update(view[start:end])
        out.append(digest.digest())
    return b"".join(out)
