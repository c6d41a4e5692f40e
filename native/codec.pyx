# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The data plane's chunk codec, on OpenSSL's SHA-256.

The compiled twin of ``codec_py.py``: same API, results and errors (its
docstring states the wire format and the parsing rules). What this module adds:

- ``encode_chunk`` computes the exact size first (tags, varints, data,
  digest), allocates the ``bytes`` once and fills it with one copy of the
  data, hashing each 64 KiB block right after copying it, while it is still
  in cache: one pass over the data, with the GIL released.
- ``decode_chunk`` parses with C pointers over the received buffer and
  returns a zero-copy ``pyarrow.Buffer`` slice; every length is checked
  against its limit and against the bytes left before it is used.
- ``PayloadAssembler.add`` copies a chunk into the payload block by block,
  updating the chunk's digest and the running content digest from the
  freshly copied block, so both digests and the copy share one pass. With
  two CPUs, a chunk of 256 KiB or more whose digest was sent has that digest
  computed on a helper thread (created per chunk, joined before ``add``
  returns, so fork stays safe) while this thread copies and updates the
  running digest: SHA-256 is the bottleneck here (about 400 MB/s per core
  without SHA extensions), and the two digests are independent streams. The
  running digest is updated on a copy of the context and committed only when
  the chunk is accepted.

C helpers return a status code (``OK`` or one of the twin's parse codes) and
fill a ``Failure``; ``_raise`` is the one place that turns it into an
exception (through the twin's ``_parse_error``, so messages are identical).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memcpy

import os

import pyarrow as pa

from planes.native import codec_py as _twin

from sha256_threads cimport (SHA256_CTX, SHA256_Final, SHA256_Init, SHA256_Update, pthread_attr_t, pthread_create,
                             pthread_join, pthread_t, thread_main)

__all__ = _twin.__all__

DIGEST_SIZE = _twin.DIGEST_SIZE
MAX_DIGEST_BYTES = _twin.MAX_DIGEST_BYTES
MAX_FIELD = _twin.MAX_FIELD
MAX_OFFSET = _twin.MAX_OFFSET
ChunkFormatError = _twin.ChunkFormatError
ChunkLimitError = _twin.ChunkLimitError

cdef enum:
    H = 32                      # SHA-256 digest bytes
    MAX_DIGEST = 64             # = MAX_DIGEST_BYTES
    MAX_FIELD_NUMBER = 536870911  # = the twin's MAX_FIELD_NUMBER, 2^29 - 1
    BLOCK = 65536               # copy-then-hash block: stays in L2 between the copy and the hash
    PARALLEL_BYTES = 262144     # a checked chunk this big hashes its own digest on a helper thread
    OK = 0
    FAILED_DIGEST = -1          # OpenSSL failed
    # the twin's parse codes
    TRUNCATED_VARINT = 1
    VARINT_OVERFLOW = 2
    ZERO_FIELD = 3
    UNEXPECTED_FIELD = 4
    WRONG_WIRE_TYPE = 5
    DUPLICATE_FIELD = 6
    LENGTH_BEYOND_END = 7
    UNSUPPORTED_WIRE_TYPE = 8
    MISSING_CHUNK = 9
    DATA_LIMIT = 10
    DIGEST_LIMIT = 11
    FIXED_BEYOND_END = 12

assert (TRUNCATED_VARINT, VARINT_OVERFLOW, ZERO_FIELD, UNEXPECTED_FIELD, WRONG_WIRE_TYPE, DUPLICATE_FIELD,
        LENGTH_BEYOND_END, UNSUPPORTED_WIRE_TYPE, MISSING_CHUNK, DATA_LIMIT, DIGEST_LIMIT, FIXED_BEYOND_END) == (
    _twin.TRUNCATED_VARINT, _twin.VARINT_OVERFLOW, _twin.ZERO_FIELD, _twin.UNEXPECTED_FIELD,
    _twin.WRONG_WIRE_TYPE, _twin.DUPLICATE_FIELD, _twin.LENGTH_BEYOND_END, _twin.UNSUPPORTED_WIRE_TYPE,
    _twin.MISSING_CHUNK, _twin.DATA_LIMIT, _twin.DIGEST_LIMIT, _twin.FIXED_BEYOND_END)
assert MAX_DIGEST == MAX_DIGEST_BYTES
assert MAX_FIELD_NUMBER == _twin.MAX_FIELD_NUMBER


cdef struct Failure:
    Py_ssize_t position
    uint64_t field
    uint64_t a
    uint64_t b


cdef struct Chunk:
    uint64_t offset
    Py_ssize_t data_at
    Py_ssize_t data_size
    Py_ssize_t digest_at
    Py_ssize_t digest_size


# -- the one place a status becomes an exception ---------------------------------------

cdef int _raise(int status, Failure *failure) except -1:
    if status == OK:
        return 0
    if status == FAILED_DIGEST:
        raise RuntimeError("OpenSSL SHA-256 failed")
    raise _twin._parse_error(status, failure.position, failure.field, failure.a, failure.b)


# -- SHA-256 and the copy ----------------------------------------------------------------

cdef int sha256(const uint8_t *data, size_t size, uint8_t *out) noexcept nogil:
    cdef SHA256_CTX ctx
    if SHA256_Init(&ctx) and SHA256_Update(&ctx, data, size) and SHA256_Final(out, &ctx):
        return OK
    return FAILED_DIGEST


cdef int copy_and_hash(uint8_t *dst, const uint8_t *src, size_t size, SHA256_CTX *first,
                       SHA256_CTX *second) noexcept nogil:
    """Copy ``size`` bytes, feeding each copied block to ``first`` and ``second`` (either may be NULL)."""
    cdef size_t done = 0, step
    while done < size:
        step = min(<size_t>BLOCK, size - done)
        memcpy(dst + done, src + done, step)
        if first != NULL and not SHA256_Update(first, dst + done, step):
            return FAILED_DIGEST
        if second != NULL and not SHA256_Update(second, dst + done, step):
            return FAILED_DIGEST
        done += step
    return OK


cdef struct HashJob:
    const uint8_t *data
    size_t size
    int status
    uint8_t out[H]


cdef void *hash_job(void *job) noexcept nogil:
    cdef HashJob *hashing = <HashJob *>job
    hashing.status = sha256(hashing.data, hashing.size, hashing.out)
    return NULL


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: A checked chunk's two digests (its own and the running one) run on two threads when there are two CPUs.
cdef bint TWO_THREADS = _cpus() > 1


# -- encoding ------------------------------------------------------------------------------

cdef inline int varint_size(uint64_t value) noexcept nogil:
    cdef int size = 1
    while value > 0x7F:
        value >>= 7
        size += 1
    return size


cdef inline uint8_t *put_varint(uint8_t *p, uint64_t value) noexcept nogil:
    while value > 0x7F:
        p[0] = <uint8_t>((value & 0x7F) | 0x80)
        p += 1
        value >>= 7
    p[0] = <uint8_t>value
    return p + 1


cdef object _bytes_view(object value, str name):
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


cdef bytes _encode(object data, object offset, object field, bint with_digest, uint8_t *digest):
    cdef const uint8_t[::1] view = _bytes_view(data, "data")
    cdef uint64_t off = _twin._offset_arg(offset)
    cdef uint64_t number = _twin._field_arg(field)
    cdef size_t size = view.shape[0]
    cdef const uint8_t *src = &view[0] if size else NULL
    cdef size_t inner = 0
    if off:
        inner += 1 + varint_size(off)
    if size:
        inner += 1 + varint_size(size) + size
    if with_digest:
        inner += 2 + H
    cdef uint64_t key = (number << 3) | 2
    cdef size_t total = varint_size(key) + varint_size(inner) + inner
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    cdef uint8_t *data_at
    cdef SHA256_CTX ctx
    cdef int status = OK
    p = put_varint(p, key)
    p = put_varint(p, inner)
    if off:
        p[0] = 0x08
        p = put_varint(p + 1, off)
    if size:
        p[0] = 0x12
        p = put_varint(p + 1, size)
    data_at = p
    with nogil:
        if with_digest:
            if SHA256_Init(&ctx):
                status = copy_and_hash(data_at, src, size, &ctx, NULL)
                if status == OK and not SHA256_Final(digest, &ctx):
                    status = FAILED_DIGEST
            else:
                status = FAILED_DIGEST
        elif size:
            memcpy(data_at, src, size)
    _raise(status, NULL)
    if with_digest:
        p = data_at + size
        p[0] = 0x1A
        p[1] = H
        memcpy(p + 2, digest, H)
    return out


def chunk_digest(data):
    """SHA-256 of a buffer (what a chunk's ``digest`` field holds)."""
    cdef const uint8_t[::1] view = _bytes_view(data, "data")
    cdef uint8_t out[H]
    cdef size_t size = view.shape[0]
    cdef const uint8_t *src = &view[0] if size else NULL
    cdef int status
    with nogil:
        status = sha256(src, size, out)
    _raise(status, NULL)
    return PyBytes_FromStringAndSize(<char *>out, H)


def encode_chunk_with_digest(data, offset, *, field=2):
    """Encode a chunk with its SHA-256 digest; ``(message, digest)``, hashing ``data`` once."""
    cdef uint8_t digest[H]
    message = _encode(data, offset, field, True, digest)
    return message, PyBytes_FromStringAndSize(<char *>digest, H)


def encode_chunk(data, offset, *, field=2, digest=True):
    """The protobuf bytes of a message whose field ``field`` holds ``DataChunk{offset, data, digest}``.

    ``digest=True`` adds the SHA-256 of ``data``; ``False`` leaves it empty.
    One allocation of the exact size and one copy of ``data``, hashed in the
    same pass; the result is ``bytes``, as grpcio serializers must return.
    """
    cdef uint8_t out[H]
    return _encode(data, offset, field, bool(digest), out)


# -- decoding ----------------------------------------------------------------------------

cdef inline int read_varint(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end, uint64_t *value,
                            Failure *failure) noexcept nogil:
    cdef Py_ssize_t start = pos[0], p = pos[0]
    cdef uint64_t result = 0
    cdef uint8_t byte
    cdef int i
    for i in range(10):
        if p >= end:
            failure.position = start
            return TRUNCATED_VARINT
        byte = buf[p]
        p += 1
        if i == 9:
            if byte > 1:
                failure.position = start
                return VARINT_OVERFLOW
            result |= (<uint64_t>byte) << 63
            break
        result |= (<uint64_t>(byte & 0x7F)) << (7 * i)
        if byte < 0x80:
            break
    value[0] = result
    pos[0] = p
    return OK


cdef inline int fail(Failure *failure, int code, Py_ssize_t at, uint64_t field, uint64_t a,
                     uint64_t b) noexcept nogil:
    failure.position, failure.field, failure.a, failure.b = at, field, a, b
    return code


cdef int parse_inner(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, uint64_t max_chunk, Chunk *chunk,
                     Failure *failure) noexcept nogil:
    cdef uint64_t key, number, wire, length, ignored
    cdef Py_ssize_t at
    cdef int status, seen = 0
    cdef uint64_t expected
    chunk.offset = 0
    chunk.data_at = chunk.digest_at = pos
    chunk.data_size = chunk.digest_size = 0
    while pos < end:
        at = pos
        status = read_varint(buf, &pos, end, &key, failure)
        if status != OK:
            return status
        number, wire = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD_NUMBER:
            return fail(failure, ZERO_FIELD, at, number, 0, 0)
        if 1 <= number <= 3:
            expected = 0 if number == 1 else 2
            if wire != expected:
                return fail(failure, WRONG_WIRE_TYPE, at, number, wire, expected)
            if seen & (1 << number):
                return fail(failure, DUPLICATE_FIELD, at, number, 0, 0)
            seen |= 1 << number
            if number == 1:
                status = read_varint(buf, &pos, end, &chunk.offset, failure)
                if status != OK:
                    return status
                continue
            status = read_varint(buf, &pos, end, &length, failure)
            if status != OK:
                return status
            if number == 2 and length > max_chunk:
                return fail(failure, DATA_LIMIT, at, number, max_chunk, length)
            if number == 3 and length > MAX_DIGEST:
                return fail(failure, DIGEST_LIMIT, at, number, MAX_DIGEST, length)
            if length > <uint64_t>(end - pos):
                return fail(failure, LENGTH_BEYOND_END, at, number, length, end - pos)
            if number == 2:
                chunk.data_at, chunk.data_size = pos, <Py_ssize_t>length
            else:
                chunk.digest_at, chunk.digest_size = pos, <Py_ssize_t>length
            pos += <Py_ssize_t>length
        elif wire == 0:
            status = read_varint(buf, &pos, end, &ignored, failure)
            if status != OK:
                return status
        elif wire == 1 or wire == 5:
            length = 8 if wire == 1 else 4
            if length > <uint64_t>(end - pos):
                return fail(failure, FIXED_BEYOND_END, at, number, length, end - pos)
            pos += <Py_ssize_t>length
        elif wire == 2:
            status = read_varint(buf, &pos, end, &length, failure)
            if status != OK:
                return status
            if length > <uint64_t>(end - pos):
                return fail(failure, LENGTH_BEYOND_END, at, number, length, end - pos)
            pos += <Py_ssize_t>length
        else:
            return fail(failure, UNSUPPORTED_WIRE_TYPE, at, number, wire, 0)
    return OK


cdef int parse(const uint8_t *buf, Py_ssize_t end, uint64_t field, uint64_t max_chunk, Chunk *chunk,
               Failure *failure) noexcept nogil:
    cdef Py_ssize_t pos = 0, at
    cdef uint64_t key, number, wire, length
    cdef int status
    cdef bint found = False
    while pos < end:
        at = pos
        status = read_varint(buf, &pos, end, &key, failure)
        if status != OK:
            return status
        number, wire = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD_NUMBER:
            return fail(failure, ZERO_FIELD, at, number, 0, 0)
        if number != field:
            return fail(failure, UNEXPECTED_FIELD, at, field, number, 0)
        if wire != 2:
            return fail(failure, WRONG_WIRE_TYPE, at, number, wire, 2)
        if found:
            return fail(failure, DUPLICATE_FIELD, at, number, 0, 0)
        status = read_varint(buf, &pos, end, &length, failure)
        if status != OK:
            return status
        if length > <uint64_t>(end - pos):
            return fail(failure, LENGTH_BEYOND_END, at, number, length, end - pos)
        status = parse_inner(buf, pos, pos + <Py_ssize_t>length, max_chunk, chunk, failure)
        if status != OK:
            return status
        pos += <Py_ssize_t>length
        found = True
    if not found:
        return fail(failure, MISSING_CHUNK, 0, field, 0, 0)
    return OK


def decode_chunk(message, *, max_chunk_bytes, field=2, verify=False):
    """``(offset, data, digest)`` of a chunk message; ``data`` is a zero-copy slice of ``message``.

    ``digest`` is the one sent (``b""`` when none). ``verify=True`` checks a
    sent digest against the data (SHA-256) and raises :class:`ChunkFormatError`
    on a mismatch; an empty digest is not checked.
    """
    buffer = message if isinstance(message, pa.Buffer) else pa.py_buffer(message)
    cdef const uint8_t[::1] view = _bytes_view(buffer, "message")
    # A limit beyond 64 bits limits nothing a varint can claim.
    cdef uint64_t limit = min(_twin._size_arg(max_chunk_bytes, "max_chunk_bytes"), MAX_OFFSET)
    cdef uint64_t number = _twin._field_arg(field)
    cdef Chunk chunk
    cdef Failure failure
    cdef Py_ssize_t size = view.shape[0]
    cdef const uint8_t *buf = &view[0] if size else NULL
    cdef int status = parse(buf, size, number, limit, &chunk, &failure)
    _raise(status, &failure)
    digest = PyBytes_FromStringAndSize(<const char *>buf + chunk.digest_at, chunk.digest_size)
    cdef uint8_t actual[H]
    if verify and chunk.digest_size:
        with nogil:
            status = sha256(buf + chunk.data_at, chunk.data_size, actual)
        _raise(status, NULL)
        if chunk.digest_size != H or memcmp(actual, buf + chunk.digest_at, H) != 0:
            raise ChunkFormatError(f"chunk at offset {chunk.offset} ({chunk.data_size} bytes): digest does "
                                   "not match its data")
    return chunk.offset, buffer.slice(chunk.data_at, chunk.data_size), digest


def field_ends(message):
    """The end offset of each top-level field of a protobuf message, from keys and lengths alone.

    The twin's docstring states the rules; a malformed message is handed to
    the twin, which raises the exact exception.
    """
    cdef const uint8_t[::1] view = _bytes_view(message, "message")
    cdef Py_ssize_t size = view.shape[0], pos = 0
    cdef const uint8_t *buf = &view[0] if size else NULL
    cdef uint64_t key, value
    cdef Failure failure
    cdef int wire
    ends = []
    while pos < size:
        if read_varint(buf, &pos, size, &key, &failure) != OK or key >> 3 == 0 or key >> 3 > MAX_FIELD_NUMBER:
            return _refuse_fields(message)
        wire = key & 7
        if wire == 0:
            if read_varint(buf, &pos, size, &value, &failure) != OK:
                return _refuse_fields(message)
        elif wire == 2:
            if read_varint(buf, &pos, size, &value, &failure) != OK or value > <uint64_t>(size - pos):
                return _refuse_fields(message)
            pos += <Py_ssize_t>value
        elif wire == 1 or wire == 5:
            if (8 if wire == 1 else 4) > size - pos:
                return _refuse_fields(message)
            pos += 8 if wire == 1 else 4
        else:
            return _refuse_fields(message)
        ends.append(pos)
    return ends


cdef object _refuse_fields(message):
    _twin.field_ends(message)
    raise AssertionError("codec: the twin accepted a message field_ends refused")


# -- reassembly ------------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class PayloadAssembler:
    """Reassembles a payload from its decoded chunks, in order, with one running SHA-256.

    See the twin's docstring for the checks, their order and the copies.
    """

    cdef readonly object declared_size, max_total_bytes, max_chunks, max_chunk_bytes
    cdef readonly object offset
    cdef readonly Py_ssize_t chunks
    cdef uint64_t _size, _received
    cdef SHA256_CTX _running
    cdef bint _hash_content
    cdef object _out, _whole, _result

    def __init__(self, declared_size, *, max_total_bytes, max_chunks, max_chunk_bytes, content_digest=True):
        self.declared_size = _twin._size_arg(declared_size, "declared_size")
        self.max_total_bytes = _twin._size_arg(max_total_bytes, "max_total_bytes")
        self.max_chunks = _twin._size_arg(max_chunks, "max_chunks")
        self.max_chunk_bytes = _twin._size_arg(max_chunk_bytes, "max_chunk_bytes")
        if self.declared_size > self.max_total_bytes:
            raise ChunkLimitError("declared size", self.max_total_bytes, self.declared_size)
        if self.declared_size > MAX_OFFSET:
            raise ChunkLimitError("declared size", MAX_OFFSET, self.declared_size)
        self._size = self.declared_size
        self._received = 0
        self.offset = 0
        self.chunks = 0
        self._out = self._whole = self._result = None
        self._hash_content = bool(content_digest)
        if not SHA256_Init(&self._running):
            _raise(FAILED_DIGEST, NULL)

    def add(self, offset, buffer, digest=b""):
        """Take the next chunk: ``buffer`` at ``offset``, with its sent ``digest`` (``b""`` for none)."""
        if self._result is not None:
            raise ChunkFormatError("the payload is finished; no more chunks")
        offset = _twin._size_arg(offset, "offset")
        cdef const uint8_t[::1] view = _bytes_view(buffer, "buffer")
        sent = bytes(_bytes_view(digest, "digest"))
        cdef Py_ssize_t index = self.chunks
        cdef uint64_t size = view.shape[0]
        if index + 1 > self.max_chunks:
            raise ChunkLimitError("chunk count", self.max_chunks, index + 1)
        if size > self.max_chunk_bytes:
            raise ChunkLimitError("chunk size", self.max_chunk_bytes, size)
        if offset < self.offset:
            raise ChunkFormatError(f"chunk {index} at offset {offset} overlaps the {self.offset} bytes "
                                   "already received")
        if offset > self.offset:
            raise ChunkFormatError(f"chunk {index} at offset {offset} leaves a gap after the {self.offset} "
                                   "bytes already received")
        if self._received + size > self._size:
            raise ChunkLimitError("payload size", self.declared_size, offset + size)
        if sent and len(sent) != H:
            raise ChunkFormatError(f"chunk {index} digest is {len(sent)} bytes, expected a {H}-byte SHA-256")
        cdef bint check = len(sent) == H
        cdef bint whole = self._received == 0 and size == self._size and size > 0
        cdef const uint8_t *src = &view[0] if size else NULL
        cdef uint8_t *dst = NULL
        cdef uint8_t[::1] out
        if size and not whole:
            if self._out is None:
                self._out = pa.allocate_buffer(self.declared_size)
            out = memoryview(self._out).cast("B")
            dst = &out[0] + self._received
        cdef SHA256_CTX running = self._running
        cdef SHA256_CTX *content = &running if self._hash_content else NULL
        cdef SHA256_CTX own
        cdef uint8_t actual[H]
        cdef int status = OK
        cdef pthread_t helper
        cdef HashJob job
        job.data, job.size, job.status = src, size, OK
        with nogil:
            if whole and (check or content != NULL):
                # One chunk is the whole payload: its digest is the content digest, hashed once.
                status = OK if SHA256_Update(&running, src, size) else FAILED_DIGEST
                if status == OK and check:
                    own = running
                    status = OK if SHA256_Final(actual, &own) else FAILED_DIGEST
            elif whole:
                pass
            elif check and content != NULL and TWO_THREADS and size >= PARALLEL_BYTES and pthread_create(&helper, NULL, hash_job,
                                                                                     &job) == 0:
                # The chunk's digest on a helper, from the source; the copy and running digest here.
                status = copy_and_hash(dst, src, size, content, NULL)
                pthread_join(helper, NULL)
                if status == OK:
                    status = job.status
                memcpy(actual, job.out, H)
            elif check:
                status = OK if SHA256_Init(&own) else FAILED_DIGEST
                if status == OK:
                    status = copy_and_hash(dst, src, size, &own, content)
                if status == OK and not SHA256_Final(actual, &own):
                    status = FAILED_DIGEST
            else:
                status = copy_and_hash(dst, src, size, content, NULL)
        _raise(status, NULL)
        if check and memcmp(actual, PyBytes_AS_STRING(sent), H) != 0:
            raise ChunkFormatError(f"chunk {index} at offset {offset} ({size} bytes): digest does not "
                                   "match its data")
        if whole:
            self._whole = buffer if isinstance(buffer, pa.Buffer) else pa.py_buffer(buffer)
        self._running = running
        self._received += size
        self.offset = self._received
        self.chunks += 1

    def finish(self):
        """``(payload, sha256 of payload)`` once every declared byte has arrived."""
        cdef SHA256_CTX final
        cdef uint8_t out[H]
        if self._result is None:
            if self._received != self._size:
                raise ChunkFormatError(f"payload incomplete: {self.offset} of {self.declared_size} declared "
                                       f"bytes received in {self.chunks} chunks")
            payload = self._whole if self._whole is not None else self._out
            if payload is None:
                payload = pa.py_buffer(b"")
            if not self._hash_content:
                self._result = (payload, b"")
                return self._result
            final = self._running
            if not SHA256_Final(out, &final):
                _raise(FAILED_DIGEST, NULL)
            self._result = (payload, PyBytes_FromStringAndSize(<char *>out, H))
        return self._result

    def __repr__(self):
        return (f"PayloadAssembler(declared_size={self.declared_size}, received={self.offset}, "
                f"chunks={self.chunks})")
