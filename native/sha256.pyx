# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""SHA-256 of many independent messages, side by side in vector lanes.

The compiled twin of ``sha256_py.py`` (same API, results and errors; its
docstring states them). The work is ``sha256_mb.h``, which the chain and the
batch encoder include too: 16 messages a pass in the lanes of AVX-512
registers (or of AVX2 register pairs), else OpenSSL one message at a time,
chosen at run time. This module exposes it to tests (every implementation
against hashlib on this machine) and to the benchmarks.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from planes.native import sha256_py as _twin

from sha256_mb cimport (PLANES_SHA256_AVX2, PLANES_SHA256_AVX512, PLANES_SHA256_OPENSSL, planes_sha256_implementation,
                       planes_sha256_many_with, planes_sha256_msg)

__all__ = _twin.__all__

_NAMES = {PLANES_SHA256_AVX512: "avx512", PLANES_SHA256_AVX2: "avx2", PLANES_SHA256_OPENSSL: "openssl"}
_CODES = {name: code for code, name in _NAMES.items()}


def implementations():
    """The implementations this process can run, fastest first (PLANES_SHA256 caps the first)."""
    cdef int best = planes_sha256_implementation()
    return tuple(_NAMES[code] for code in sorted(_NAMES, reverse=True) if code <= best)


def implementation():
    """The implementation :func:`hash_many` uses by default."""
    return _NAMES[planes_sha256_implementation()]


def hash_many(data, offsets, *, head=b"", implementation=None):
    """SHA-256 of ``head || data[offsets[i]:offsets[i + 1]]`` for each i; n * 32 bytes."""
    cdef int code = _CODES[_twin._implementation_arg(implementation, implementations())]
    view = _twin._bytes_view(data, "data")
    cdef const uint8_t[::1] buffer = view if view.nbytes else b"\0"
    cdef const uint8_t[::1] prefix = _twin._bytes_view(head, "head") if len(head) else b"\0"
    cdef size_t prefix_len = len(head)
    cdef const uint8_t[::1] raw = _raw_offsets(offsets)
    cdef Py_ssize_t n = raw.shape[0] // 8 - 1, i
    cdef uint64_t limit = view.nbytes, start = 0, end, previous = 0
    cdef planes_sha256_msg *messages = <planes_sha256_msg *>malloc((n + 1) * sizeof(planes_sha256_msg))
    if messages == NULL:
        raise MemoryError()
    try:
        out = PyBytes_FromStringAndSize(NULL, n * 32)
        for i in range(n + 1):
            memcpy(&end, &raw[8 * i], 8)
            if end > limit or end < previous:
                _refuse(data, offsets, head)
            if i:
                messages[i - 1].head, messages[i - 1].head_len = &prefix[0], prefix_len
                messages[i - 1].data, messages[i - 1].len = &buffer[0] + start, end - start
                messages[i - 1].out = <uint8_t *>PyBytes_AS_STRING(out) + 32 * (i - 1)
            start = previous = end
        with nogil:
            planes_sha256_many_with(messages, n, code)
    finally:
        free(messages)
    return out


cdef object _raw_offsets(object offsets):
    """The offsets as raw bytes, once their buffer has the twin's shape (values are checked above)."""
    try:
        view = memoryview(offsets)
    except TypeError:
        raise TypeError(f"offsets must be a buffer of uint64, not {type(offsets).__name__}") from None
    if not view.c_contiguous or (view.format not in ("B", "b", "c")
                                 and (view.itemsize != 8 or view.format not in _twin._OFFSET_FORMATS)):
        _refuse(b"", offsets, b"")
    raw = view.cast("B") if view.ndim != 1 or view.format != "B" else view
    if raw.nbytes % 8 or raw.nbytes == 0:
        _refuse(b"", offsets, b"")
    return raw


cdef int _refuse(data, offsets, head) except -1:
    """The one place a refusal becomes an exception: the twin raises it."""
    _twin.hash_many(data, offsets, head=head)
    raise AssertionError("sha256: the compiled module refused arguments its twin accepts")
