# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Evidence batches from wire bytes to leaves, on multi-buffer SHA-256.

The compiled twin of ``eventbatch_py.py``: same API, results and errors (its
docstring states the input, the output and the rules). What this module adds:
one pass over the request bytes with C pointers, with the GIL released.
Each event is parsed into slices of the input (no intermediate objects),
checked and its leaf written straight into an output buffer, with room left
for its field commitments; the raw values go into a second buffer and the
event-id hashes into a third. Every 64 events (a chunk still in cache) the
chunk's commitments are hashed side by side into their leaves, then the
leaves' RFC 6962 hashes (``sha256_mb.h``: 16 messages a pass in AVX-512
lanes on this machine, about 5x OpenSSL one at a time). Leaves and values
are written straight into the bytes objects returned, sized to a bound of
what the events can produce and shrunk in place at the end. A batch of 256
events or more is split between two threads (this one and a helper created
per call, joined before returning): in halves, or, when the caller gives
the previous chain head, a quarter here, after which this thread runs the
sequential chain behind the helper's progress. Python objects are made
only for the correlation runs.

Every C helper returns ``OK`` or ``FAIL`` and nothing else: on ``FAIL`` the
batch is handed to the twin, whose parser raises the exact exception (the
one place where failures become exceptions, so messages are the twin's).
Failure is the rare path; the twin not raising there is a bug and says so.
"""

cimport cython
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.ref cimport PyObject, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

import array as _array

from planes.native import eventbatch_py as _twin

from sha256_threads cimport (SHA256_CTX, SHA256_Final, SHA256_Init, SHA256_Update, pthread_attr_t, pthread_create,
                             pthread_join, pthread_t, thread_main)
from sha256_mb cimport planes_sha256_many, planes_sha256_msg

cdef extern from "Python.h":
    # A new bytes object as a bare reference, so that it can be shrunk in place (_PyBytes_Resize).
    PyObject *new_bytes "PyBytes_FromStringAndSize"(const char *v, Py_ssize_t size)

cdef extern from *:
    """
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    #include <openssl/sha.h>
    #include <openssl/rand.h>
    #include <pthread.h>

    #include <sched.h>

    static inline Py_ssize_t pe_load(const Py_ssize_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pe_store(Py_ssize_t *p, Py_ssize_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void pe_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }

    /* seconds * 1e9 + nanos, if it fits in int64: computed in 128 bits, because a negative nanos can bring
       a product just past the range back into it (the twin checks the sum only). */
    static int pe_time_ns(int64_t seconds, int32_t nanos, int64_t *out) {
        __int128 value = (__int128)seconds * 1000000000 + nanos;
        if (value < (__int128)INT64_MIN || value > (__int128)INT64_MAX) return -1;
        *out = (int64_t)value;
        return 0;
    }

    /* Well-formed UTF-8 as Python's decoder sees it: no overlongs, no surrogates, <= U+10FFFF. */
    static int pe_utf8_valid(const unsigned char *s, Py_ssize_t n) {
        Py_ssize_t i = 0;
        while (i < n) {
            unsigned char c = s[i];
            if (c < 0x80) {  /* ASCII, most of what events hold: eight bytes at a time */
                i++;
                while (i + 8 <= n) {
                    uint64_t word;
                    memcpy(&word, s + i, 8);
                    if (word & 0x8080808080808080ULL) break;
                    i += 8;
                }
                continue;
            }
            if (c >= 0xC2 && c <= 0xDF) {
                if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
                i += 2; continue;
            }
            if (c >= 0xE0 && c <= 0xEF) {
                if (i + 2 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
                if (c == 0xE0 && s[i + 1] < 0xA0) return 0;
                if (c == 0xED && s[i + 1] > 0x9F) return 0;
                i += 3; continue;
            }
            if (c >= 0xF0 && c <= 0xF4) {
                if (i + 3 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80
                    || (s[i + 3] & 0xC0) != 0x80) return 0;
                if (c == 0xF0 && s[i + 1] < 0x90) return 0;
                if (c == 0xF4 && s[i + 1] > 0x8F) return 0;
                i += 4; continue;
            }
            return 0;
        }
        return 1;
    }
    """
    int RAND_bytes(unsigned char *buf, int num) nogil
    int sched_yield() nogil
    Py_ssize_t pe_load(const Py_ssize_t *p) nogil
    void pe_store(Py_ssize_t *p, Py_ssize_t v) nogil
    void pe_pause() nogil
    int pe_time_ns(int64_t seconds, int32_t nanos, int64_t *out) noexcept nogil
    int pe_utf8_valid(const uint8_t *s, Py_ssize_t n) noexcept nogil

__all__ = _twin.__all__

BatchFormatError = _twin.BatchFormatError
BatchLimitError = _twin.BatchLimitError
BatchRuleError = _twin.BatchRuleError
NotCanonical = _twin.NotCanonical
EncodedBatch = _twin.EncodedBatch
ValuesFormatError = _twin.ValuesFormatError
decode_values = _twin.decode_values
correlations = _twin.correlations
pack_values = _twin.pack_values
id_hash = _twin.id_hash
MAGIC = _twin.MAGIC
SALT_BYTES = _twin.SALT_BYTES
KIND_STRING = _twin.KIND_STRING
KIND_BYTES = _twin.KIND_BYTES

cdef enum:
    OK = 0
    FAIL = -1
    H = 32
    SALT = 16
    SALT_POOL = 16 * 256
    CHUNK_EVENTS = 64           # events whose commitments, then leaves, are hashed together
    CHUNK_COMMITMENTS = 256     # ...or fewer events once they have this many commitments
    SPINS_BEFORE_YIELD = 256
    VARINT = 0
    FIXED64 = 1
    LENGTH = 2
    FIXED32 = 5

cdef array.array _OFFSETS_TEMPLATE = _array.array("Q")


cdef struct Span:
    const uint8_t *p
    Py_ssize_t n


cdef struct Field:
    Span name
    int kind                # 0: no value (withheld), 1 string, 2 bytes
    Span value
    int64_t classification
    Span commitment
    bint has_commitment
    Span salt


cdef struct Event:
    Span event_id
    Span correlation[6]     # correlation_id, request_id, trace_id, span_id, tenant, actor
    uint64_t sequence
    bint has_time
    int64_t seconds
    int32_t nanos
    Span event_type
    uint64_t revision
    Span digest
    Span corrects
    bint seen_correlation, seen_config
    Py_ssize_t nfields


cdef struct Reader:
    const uint8_t *p
    const uint8_t *end


cdef inline int read_varint(Reader *r, uint64_t *out) noexcept nogil:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t byte
    while True:
        if r.p >= r.end:
            return FAIL
        byte = r.p[0]
        r.p += 1
        if shift == 63 and byte > 1:
            return FAIL
        result |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = result
            return OK
        shift += 7
        if shift > 63:
            return FAIL


cdef inline int next_field(Reader *r, uint32_t *number, int *wire, uint64_t *value, Span *span) noexcept nogil:
    """One field of a message: OK, FAIL on malformed or non-canonical bytes (groups)."""
    cdef uint64_t key, length
    if read_varint(r, &key) != OK:
        return FAIL
    if (key >> 3) == 0 or (key >> 3) > 0x1FFFFFFF:
        return FAIL
    number[0] = <uint32_t>(key >> 3)
    wire[0] = <int>(key & 7)
    if wire[0] == VARINT:
        return read_varint(r, value)
    if wire[0] == LENGTH:
        if read_varint(r, &length) != OK or length > <uint64_t>(r.end - r.p):
            return FAIL
        span.p = r.p
        span.n = <Py_ssize_t>length
        r.p += length
        return OK
    if wire[0] == FIXED64 or wire[0] == FIXED32:
        length = 8 if wire[0] == FIXED64 else 4
        if length > <uint64_t>(r.end - r.p):
            return FAIL
        r.p += length
        return OK
    return FAIL


cdef inline int text(Span span) noexcept nogil:
    return OK if pe_utf8_valid(span.p, span.n) else FAIL


cdef inline Py_ssize_t chars(Span span) noexcept nogil:
    cdef Py_ssize_t i, count = 0
    for i in range(span.n):
        if (span.p[i] & 0xC0) != 0x80:
            count += 1
    return count


cdef inline bint same(Span a, Span b) noexcept nogil:
    return a.n == b.n and (a.n == 0 or memcmp(a.p, b.p, a.n) == 0)


cdef int parse_digest(Span data, Span *value) noexcept nogil:
    cdef Reader r
    cdef uint32_t number
    cdef int wire
    cdef uint64_t scalar
    cdef Span span
    r.p, r.end = data.p, data.p + data.n
    while r.p < r.end:
        if next_field(&r, &number, &wire, &scalar, &span) != OK:
            return FAIL
        if number == 1 and wire != VARINT or number == 2 and wire != LENGTH:
            return FAIL
        if number == 2:
            value[0] = span
    return OK


cdef int parse_field(Span data, Field *field, uint64_t max_value_bytes) noexcept nogil:
    cdef Reader r
    cdef uint32_t number
    cdef int wire
    cdef uint64_t scalar
    cdef Span span
    field.name.n = field.value.n = field.commitment.n = field.salt.n = 0
    field.kind = 0
    field.classification = 0
    field.has_commitment = False
    r.p, r.end = data.p, data.p + data.n
    while r.p < r.end:
        if next_field(&r, &number, &wire, &scalar, &span) != OK:
            return FAIL
        if 1 <= number <= 7:
            if (number == 4 or number == 7) != (wire == VARINT) or (number != 4 and number != 7 and wire != LENGTH):
                return FAIL
        if number == 1:
            if text(span) != OK:
                return FAIL
            field.name = span
        elif number == 2 or number == 3:
            if <uint64_t>span.n > max_value_bytes or (number == 2 and text(span) != OK):
                return FAIL
            field.kind = 1 if number == 2 else 2
            field.value = span
        elif number == 4:
            field.classification = <int32_t>(<uint32_t>scalar)
        elif number == 5:
            if field.has_commitment or parse_digest(span, &field.commitment) != OK:
                return FAIL
            field.has_commitment = True
        elif number == 6:
            field.salt = span
    return OK


cdef int parse_event(Span data, Event *event, Field **fields, Py_ssize_t *capacity, Py_ssize_t max_fields,
                     uint64_t max_value_bytes) noexcept nogil:
    cdef Reader r, inner
    cdef uint32_t number, inner_number
    cdef int wire, inner_wire, i
    cdef uint64_t scalar, inner_scalar
    cdef Span span, inner_span
    cdef Field *grown
    cdef bint seen_time = False
    event.event_id.n = event.event_type.n = event.digest.n = event.corrects.n = 0
    for i in range(6):
        event.correlation[i].n = 0
    event.sequence = event.revision = 0
    event.has_time = False
    event.seconds = 0
    event.nanos = 0
    event.nfields = 0
    event.seen_correlation = event.seen_config = False
    r.p, r.end = data.p, data.p + data.n
    while r.p < r.end:
        if next_field(&r, &number, &wire, &scalar, &span) != OK:
            return FAIL
        if number == 3:
            if wire != VARINT:
                return FAIL
            event.sequence = scalar
            continue
        if number < 1 or number > 8:
            continue
        if wire != LENGTH:
            return FAIL
        if number == 1:
            if text(span) != OK:
                return FAIL
            event.event_id = span
        elif number == 5:
            if text(span) != OK:
                return FAIL
            event.event_type = span
        elif number == 8:
            if text(span) != OK:
                return FAIL
            event.corrects = span
        elif number == 2:
            if event.seen_correlation:
                return FAIL
            event.seen_correlation = True
            inner.p, inner.end = span.p, span.p + span.n
            while inner.p < inner.end:
                if next_field(&inner, &inner_number, &inner_wire, &inner_scalar, &inner_span) != OK:
                    return FAIL
                if 1 <= inner_number <= 6:
                    if inner_wire != LENGTH or text(inner_span) != OK:
                        return FAIL
                    event.correlation[inner_number - 1] = inner_span
        elif number == 4:
            if event.has_time:
                return FAIL
            event.has_time = True
            inner.p, inner.end = span.p, span.p + span.n
            while inner.p < inner.end:
                if next_field(&inner, &inner_number, &inner_wire, &inner_scalar, &inner_span) != OK:
                    return FAIL
                if inner_number == 1 or inner_number == 2:
                    if inner_wire != VARINT:
                        return FAIL
                    if inner_number == 1:
                        event.seconds = <int64_t>inner_scalar
                    else:
                        event.nanos = <int32_t>(<uint32_t>inner_scalar)
        elif number == 6:
            if event.seen_config:
                return FAIL
            event.seen_config = True
            inner.p, inner.end = span.p, span.p + span.n
            while inner.p < inner.end:
                if next_field(&inner, &inner_number, &inner_wire, &inner_scalar, &inner_span) != OK:
                    return FAIL
                if inner_number == 1:
                    if inner_wire != VARINT:
                        return FAIL
                    event.revision = inner_scalar
                elif inner_number == 2:
                    if inner_wire != LENGTH:
                        return FAIL
                    event.digest = inner_span
        else:  # 7: a field
            if event.nfields >= max_fields:
                return FAIL
            if event.nfields == capacity[0]:
                grown = <Field *>realloc(fields[0], (capacity[0] * 2 + 8) * sizeof(Field))
                if grown == NULL:
                    return FAIL
                fields[0] = grown
                capacity[0] = capacity[0] * 2 + 8
            if parse_field(span, &fields[0][event.nfields], max_value_bytes) != OK:
                return FAIL
            event.nfields += 1
    return OK


cdef bint valid_event_type(Span t, Py_ssize_t max_chars) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint8_t c
    cdef bint after_dot = False
    if t.n == 0 or t.n > max_chars or not (b'a' <= t.p[0] <= b'z'):
        return False
    for i in range(1, t.n):
        c = t.p[i]
        if c == b'.':
            if after_dot:
                return False
            after_dot = True
        elif b'a' <= c <= b'z' or b'0' <= c <= b'9' or c == b'_':
            after_dot = False
        else:
            return False
    return not after_dot


cdef struct Out:
    uint8_t *data
    Py_ssize_t size
    Py_ssize_t capacity
    bint fixed          # a window of an output object, sized to a proven bound: never grown


cdef int out_reserve(Out *out, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t wanted = out.size + extra, capacity = out.capacity
    cdef uint8_t *grown
    if wanted <= capacity:
        return OK
    if out.fixed:
        return FAIL
    while capacity < wanted:
        capacity = capacity * 2 + 4096
    grown = <uint8_t *>realloc(out.data, capacity)
    if grown == NULL:
        return FAIL
    out.data = grown
    out.capacity = capacity
    return OK


cdef inline void put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v


cdef inline void put_u64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (56 - 8 * i))


cdef inline uint64_t fnv1a(Span s) noexcept nogil:
    cdef uint64_t value = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(s.n):
        value = (value ^ s.p[i]) * 0x100000001B3ULL
    return value


cdef inline void put_u64_le(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline uint8_t *put_str(uint8_t *p, Span s) noexcept nogil:
    put_u32(p, <uint32_t>s.n)
    if s.n:
        memcpy(p + 4, s.p, s.n)
    return p + 4 + s.n


cdef struct Commitment:
    size_t head_at, head_len        # 0x02 || salt || u32 name length || name || kind, in Job.prefixes
    Span value
    size_t digest_at                # where the digest goes in Job.out
    const uint8_t *sent             # the commitment the client sent, to check, or NULL


cdef struct Job:
    # the input and the rules (shared, read-only)
    const Span *spans
    Py_ssize_t start, stop          # this job's events
    uint64_t first                  # the sequence of event 0
    int64_t now
    Span tenant, actor
    Py_ssize_t field_limit, id_limit
    uint64_t value_limit
    const uint8_t *salts            # salts drawn ahead (a test's salt source), or NULL: RAND_bytes
    Py_ssize_t salts_size, salts_at
    uint8_t pool[SALT_POOL]
    int pool_at
    # shared outputs, each job writing only its own events' slots
    unsigned long long *offsets     # offsets[i + 1], relative to this job's leaves until merged
    uint8_t *leaf_hashes
    uint8_t *id_hashes
    # this job's own outputs
    Out out, vals
    Py_ssize_t *run_starts
    Span *run_correlations
    Py_ssize_t nruns
    int64_t min_time, max_time
    Field *fields
    Py_ssize_t capacity
    # the chunk waiting to be hashed: its commitments (their first parts in ``prefixes``),
    # then its leaves, which hold the commitments
    Commitment *commitments
    Py_ssize_t ncommitments, commitments_capacity
    Out prefixes
    Py_ssize_t chunk_start
    size_t leaf_at[CHUNK_EVENTS + 1]
    planes_sha256_msg messages[CHUNK_COMMITMENTS]
    Py_ssize_t hashed               # events start .. hashed - 1 have their leaf hashes (atomic)
    Py_ssize_t finished             # set when encode_range has returned (atomic)
    int status


cdef int take_salt(Job *job, Span *salt) noexcept nogil:
    if job.salts != NULL:
        if job.salts_at + SALT > job.salts_size:
            return FAIL
        salt.p, salt.n = job.salts + job.salts_at, SALT
        job.salts_at += SALT
        return OK
    if job.pool_at >= SALT_POOL:
        if RAND_bytes(job.pool, SALT_POOL) != 1:
            return FAIL
        job.pool_at = 0
    salt.p, salt.n = &job.pool[job.pool_at], SALT
    job.pool_at += SALT
    return OK


cdef uint8_t LEAF_PREFIX = 0


cdef int queue_commitment(Job *job, Span salt, const Field *field, size_t digest_at) noexcept nogil:
    """Queue SHA-256(0x02 || salt || u32 name length || name || kind || value) for ``hash_chunk``."""
    cdef Commitment *grown
    cdef Commitment *c
    cdef uint8_t *h
    cdef size_t head_len = 1 + salt.n + 4 + field.name.n + 1
    if job.ncommitments == job.commitments_capacity:
        grown = <Commitment *>realloc(job.commitments, (job.commitments_capacity * 2 + 64) * sizeof(Commitment))
        if grown == NULL:
            return FAIL
        job.commitments = grown
        job.commitments_capacity = job.commitments_capacity * 2 + 64
    if out_reserve(&job.prefixes, head_len) != OK:
        return FAIL
    c = &job.commitments[job.ncommitments]
    job.ncommitments += 1
    c.head_at, c.head_len = job.prefixes.size, head_len
    h = job.prefixes.data + job.prefixes.size
    h[0] = 2
    if salt.n:
        memcpy(h + 1, salt.p, salt.n)
    h = put_str(h + 1 + salt.n, field.name)
    h[0] = <uint8_t>field.kind
    job.prefixes.size += head_len
    c.value = field.value
    c.digest_at = digest_at
    c.sent = field.commitment.p if field.commitment.n else NULL
    return OK


cdef int hash_chunk(Job *job, Py_ssize_t stop) noexcept nogil:
    """Hash the queued commitments into their leaves and check those the client sent, then the
    RFC 6962 leaf hashes (SHA-256(0x00 || leaf)) of events ``chunk_start .. stop - 1``.

    Each step hashes independent messages, side by side (multi-buffer SHA-256).
    """
    cdef Py_ssize_t i, n, done = 0
    cdef Commitment *c
    cdef planes_sha256_msg *m
    while done < job.ncommitments:
        n = min(<Py_ssize_t>CHUNK_COMMITMENTS, job.ncommitments - done)
        for i in range(n):
            c = &job.commitments[done + i]
            m = &job.messages[i]
            m.head, m.head_len = job.prefixes.data + c.head_at, c.head_len
            m.data, m.len = c.value.p, c.value.n
            m.out = job.out.data + c.digest_at
        planes_sha256_many(job.messages, n)
        done += n
    for i in range(job.ncommitments):
        c = &job.commitments[i]
        if c.sent != NULL and memcmp(c.sent, job.out.data + c.digest_at, H) != 0:
            return FAIL
    n = stop - job.chunk_start
    for i in range(n):
        m = &job.messages[i]
        m.head, m.head_len = &LEAF_PREFIX, 1
        m.data, m.len = job.out.data + job.leaf_at[i], job.leaf_at[i + 1] - job.leaf_at[i]
        m.out = job.leaf_hashes + (job.chunk_start + i) * H
    planes_sha256_many(job.messages, n)
    job.ncommitments = 0
    job.prefixes.size = 0
    job.chunk_start = stop
    job.leaf_at[0] = job.leaf_at[n]
    pe_store(&job.hashed, stop)
    return OK


cdef int encode_range(Job *job) noexcept nogil:
    """Parse, check, commit, encode and leaf-hash events ``start`` to ``stop``: OK or FAIL."""
    cdef Event event
    cdef Py_ssize_t index, i, j, leaf_size
    cdef Field *field
    cdef Span actor_used, salt
    cdef uint8_t *p
    cdef uint8_t *v
    cdef int64_t time_ns
    cdef uint64_t sequence
    job.nruns = 0
    job.chunk_start = job.start
    job.leaf_at[0] = 0
    for index in range(job.start, job.stop):
        if parse_event(job.spans[index], &event, &job.fields, &job.capacity, job.field_limit,
                       job.value_limit) != OK:
            return FAIL
        # The log's rules, in the log's order.
        if not valid_event_type(event.event_type, job.id_limit):
            return FAIL
        if event.event_id.n == 0 or chars(event.event_id) > job.id_limit or event.sequence:
            return FAIL
        if event.correlation[4].n and not same(event.correlation[4], job.tenant):
            return FAIL
        time_ns = job.now
        if event.has_time and pe_time_ns(event.seconds, event.nanos, &time_ns) != 0:
            return FAIL
        actor_used = event.correlation[5] if event.correlation[5].n else job.actor
        sequence = job.first + index
        leaf_size = (4 + 8 + 4 + event.event_id.n + 4 + job.tenant.n + 4 + event.correlation[0].n
                     + 4 + event.correlation[1].n + 4 + event.correlation[2].n + 4 + event.correlation[3].n
                     + 4 + actor_used.n + 8 + 4 + event.event_type.n + 8 + 4 + event.digest.n
                     + 4 + event.corrects.n + 4)
        for i in range(event.nfields):
            field = &job.fields[i]
            if field.name.n == 0 or chars(field.name) > job.id_limit:
                return FAIL
            for j in range(i):
                if same(job.fields[j].name, field.name):
                    return FAIL
            if not 0 <= field.classification <= 255:
                return FAIL
            if field.kind == 0 and field.commitment.n != H:
                return FAIL
            leaf_size += 4 + field.name.n + 2 + H
        if out_reserve(&job.out, leaf_size) != OK:
            return FAIL
        p = job.out.data + job.out.size
        memcpy(p, b"PEL1", 4)
        put_u64(p + 4, sequence)
        p = put_str(p + 12, event.event_id)
        p = put_str(p, job.tenant)
        for j in range(4):
            p = put_str(p, event.correlation[j])
        p = put_str(p, actor_used)
        put_u64(p, <uint64_t>time_ns)
        p = put_str(p + 8, event.event_type)
        put_u64(p, event.revision)
        p = put_str(p + 8, event.digest)
        p = put_str(p, event.corrects)
        put_u32(p, <uint32_t>event.nfields)
        p += 4
        for i in range(event.nfields):
            field = &job.fields[i]
            p = put_str(p, field.name)
            p[0] = <uint8_t>field.classification
            if field.kind == 0:
                p[1] = 2
                memcpy(p + 2, field.commitment.p, H)
                p += 2 + H
                continue
            p[1] = <uint8_t>field.kind
            if field.salt.n:
                salt = field.salt
            elif take_salt(job, &salt) != OK:
                return FAIL
            if field.commitment.n and field.commitment.n != H:
                return FAIL
            if queue_commitment(job, salt, field, p + 2 - job.out.data) != OK:
                return FAIL
            p += 2 + H
            if out_reserve(&job.vals, 8 + 12 + field.name.n + salt.n + field.value.n) != OK:
                return FAIL
            v = job.vals.data + job.vals.size
            put_u64(v, sequence)
            v = put_str(v + 8, field.name)
            v = put_str(v, salt)
            v = put_str(v, field.value)
            job.vals.size = v - job.vals.data
        job.out.size += leaf_size
        job.offsets[index + 1] = job.out.size
        job.leaf_at[index + 1 - job.chunk_start] = job.out.size
        put_u64_le(job.id_hashes + 8 * index, fnv1a(event.event_id))
        if index == job.start or time_ns < job.min_time:
            job.min_time = time_ns
        if index == job.start or time_ns > job.max_time:
            job.max_time = time_ns
        if job.nruns == 0 or not same(job.run_correlations[job.nruns - 1], event.correlation[0]):
            job.run_starts[job.nruns] = index
            job.run_correlations[job.nruns] = event.correlation[0]
            job.nruns += 1
        # Hash a chunk while its leaves are still in cache.
        if index + 1 - job.chunk_start == CHUNK_EVENTS or job.ncommitments >= CHUNK_COMMITMENTS:
            if hash_chunk(job, index + 1) != OK:
                return FAIL
    if job.chunk_start < job.stop:
        return hash_chunk(job, job.stop)
    return OK


cdef void *encode_thread(void *job) noexcept nogil:
    (<Job *>job).status = encode_range(<Job *>job)
    pe_store(&(<Job *>job).finished, 1)
    return NULL


cdef void link(const uint8_t *leaf_hashes, uint8_t *heads, const uint8_t *previous, Py_ssize_t start,
               Py_ssize_t stop) noexcept nogil:
    """Chain heads ``start .. stop - 1``: SHA-256(head before || leaf hash), one after the other."""
    cdef SHA256_CTX ctx
    cdef Py_ssize_t i
    for i in range(start, stop):
        SHA256_Init(&ctx)
        SHA256_Update(&ctx, previous if i == 0 else heads + H * (i - 1), H)
        SHA256_Update(&ctx, leaf_hashes + H * i, H)
        SHA256_Final(heads + H * i, &ctx)


cdef Py_ssize_t link_behind(Job *job, uint8_t *heads, const uint8_t *previous, Py_ssize_t linked) noexcept nogil:
    """Chain the events another thread encodes, as its chunks get their leaf hashes; how far it got
    (short of ``job.stop`` only when that thread failed)."""
    cdef Py_ssize_t ready
    cdef int spins = 0
    while linked < job.stop:
        ready = pe_load(&job.hashed)
        if ready > linked:
            link(job.leaf_hashes, heads, previous, linked, ready)
            linked, spins = ready, 0
        elif pe_load(&job.finished):
            if pe_load(&job.hashed) == linked:
                break
        else:
            spins += 1
            if spins < SPINS_BEFORE_YIELD:
                pe_pause()
            else:
                sched_yield()
    return linked


cdef enum:
    PARALLEL_EVENTS = 256       # a batch this large is encoded by two threads
    CHAINING_SHARE = 4          # ...and when this thread also chains, it encodes 1/CHAINING_SHARE of it


cdef Py_ssize_t _count_fields(const Span *spans, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """The EventField entries of events ``start .. stop - 1`` (-1: malformed): an upper bound of
    the salts they can need, and part of the bound of their leaves' and values' sizes."""
    cdef Reader r
    cdef uint32_t number
    cdef int wire
    cdef uint64_t scalar
    cdef Span span
    cdef Py_ssize_t index, total = 0
    for index in range(start, stop):
        r.p, r.end = spans[index].p, spans[index].p + spans[index].n
        while r.p < r.end:
            if next_field(&r, &number, &wire, &scalar, &span) != OK:
                return -1
            if number == 7:
                total += 1
    return total


cdef enum:
    # A leaf is its event's bytes rearranged (each string keeps its length, now 4 bytes instead of
    # a tag and a varint) plus at most this much: its fixed-size parts, the tenant and the actor
    # (which may not be in the event), and per field the commitment and kind, less the field's
    # 4 or more bytes of tag and lengths in the event...
    LEAF_EXTRA = 4 + 8 + 4 + 4 + 4 * 4 + 4 + 8 + 4 + 8 + 4 + 4 + 4
    LEAF_FIELD_EXTRA = 4 + 2 + H - 4
    # ...and a field's raw value record holds its name, salt and value (when sent, in the event
    # too) plus at most its sequence, three lengths and a salt drawn here.
    VALUE_FIELD_EXTRA = 8 + 3 * 4 + SALT


cdef PyObject *_window(Py_ssize_t size) except NULL:
    """A bytes object (bare reference) to write ``size`` bytes into, then shrink; never the empty singleton."""
    cdef PyObject *made = new_bytes(NULL, size + 1)
    if made == NULL:
        raise MemoryError()
    return made


cdef object _shrunk(PyObject **window, Py_ssize_t size):
    """The window shrunk in place to ``size`` bytes, as an object (the bare reference is released)."""
    _PyBytes_Resize(window, size)
    return <object>window[0]


cdef object _fail(args):
    """The one place a failure becomes an exception: the twin raises it."""
    _twin.encode_events(*args[0], **args[1])
    raise AssertionError("eventbatch: the compiled module refused a batch its twin accepts")


def encode_events(data, tenant, actor, first_sequence, now_ns, *, max_events, max_fields, max_value_bytes,
                  max_id_chars, salts=None, threads=None, previous_head=None):
    """Validate, commit and encode the events of a serialized append request (see the twin)."""
    call = ((data, tenant, actor, first_sequence, now_ns),
            dict(max_events=max_events, max_fields=max_fields, max_value_bytes=max_value_bytes,
                 max_id_chars=max_id_chars, salts=salts, threads=threads, previous_head=previous_head))
    cdef bytes head_before = None
    cdef const uint8_t[::1] buffer
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}") from None
    head_before = None if previous_head is None else _twin._head_arg(previous_head)  # after data, as the twin
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes == 0:
        return _twin.encode_events(*call[0], **call[1])
    buffer = view
    if first_sequence < 1:
        raise ValueError(f"first_sequence must be at least 1, got {first_sequence}")
    if (first_sequence > _twin.MAX_SEQUENCE or type(now_ns) is not int
            or not -(1 << 63) <= now_ns < (1 << 63)):
        # Arguments the C types cannot hold: the twin's verdict (an empty batch, a batch whose events all
        # carry their time, or its error) is the answer.
        return _twin.encode_events(*call[0], **call[1])
    cdef uint64_t first = first_sequence
    cdef int64_t now = now_ns
    limits = [int(max_events), int(max_fields), int(max_value_bytes), int(max_id_chars)]
    for label, given in zip(("max_events", "max_fields", "max_value_bytes", "max_id_chars"), limits):
        if given < 0:
            raise ValueError(f"{label} must not be negative, got {given}")
    cdef int wanted_threads = min(_twin._threads_arg(threads), 2)
    cdef Py_ssize_t event_limit = min(limits[0], 1 << 40), field_limit = min(limits[1], 1 << 40)
    cdef uint64_t value_limit = min(limits[2], 1 << 62)
    cdef Py_ssize_t id_limit = min(limits[3], 1 << 40)
    tenant_bytes = tenant.encode()
    actor_bytes = actor.encode()
    cdef Span tenant_span, actor_span
    tenant_span.p = <const uint8_t *>PyBytes_AS_STRING(tenant_bytes)
    tenant_span.n = len(tenant_bytes)
    actor_span.p = <const uint8_t *>PyBytes_AS_STRING(actor_bytes)
    actor_span.n = len(actor_bytes)

    # Pass 1: the top level; count the events (the limit is checked before any work).
    cdef Reader r
    cdef uint32_t number
    cdef int wire
    cdef uint64_t scalar
    cdef Span span
    cdef Py_ssize_t count = 0
    r.p, r.end = &buffer[0], &buffer[0] + buffer.shape[0]
    while r.p < r.end:
        if next_field(&r, &number, &wire, &scalar, &span) != OK:
            return _fail(call)
        if (number == 1 or number == 2) and wire != LENGTH:
            return _fail(call)
        if number == 2:
            count += 1
    if count > event_limit or first_sequence + count - 1 > _twin.MAX_SEQUENCE:
        return _fail(call)

    cdef Span *spans = <Span *>malloc((count + 1) * sizeof(Span))
    if spans == NULL:
        raise MemoryError()
    cdef Py_ssize_t index = 0, i, k, njobs, needed, end_index
    cdef Job jobs[2]
    cdef Job *job
    cdef array.array offsets = array.clone(_OFFSETS_TEMPLATE, count + 1, zero=False)
    cdef unsigned long long *offset = offsets.data.as_ulonglongs
    cdef unsigned long long shift
    leaf_hashes = PyBytes_FromStringAndSize(NULL, count * H)
    hashes = PyBytes_FromStringAndSize(NULL, count * 8)
    heads = None if head_before is None else PyBytes_FromStringAndSize(NULL, count * H)
    cdef bint chained = heads is not None
    cdef uint8_t *heads_at = <uint8_t *>PyBytes_AS_STRING(heads) if chained else NULL
    cdef const uint8_t *head_at = <const uint8_t *>PyBytes_AS_STRING(head_before) if chained else NULL
    cdef Py_ssize_t split, linked = 0, start, stop
    cdef Py_ssize_t nfields[2]
    cdef Py_ssize_t leaf_bound[2]
    cdef Py_ssize_t value_bound[2]
    cdef PyObject *leaves_window = NULL
    cdef PyObject *values_window = NULL
    cdef const uint8_t[::1] drawn
    cdef pthread_t helper
    cdef bint started = False
    cdef list runs = []
    cdef Span *run_spans = NULL
    cdef Py_ssize_t *run_first = NULL
    cdef Py_ssize_t *run_last = NULL
    cdef Py_ssize_t nruns
    cdef int64_t min_time, max_time
    pool = b""
    memset(jobs, 0, sizeof(jobs))
    try:
        r.p = &buffer[0]
        while r.p < r.end:
            next_field(&r, &number, &wire, &scalar, &span)
            if number == 2:
                spans[index] = span
                index += 1
        offset[0] = 0
        # A salt source given (tests) is called ahead, as the twin calls it (256 salts a call),
        # and then one thread runs, so that salts go to fields in order.
        njobs = 2 if count >= PARALLEL_EVENTS and salts is None and wanted_threads > 1 else 1
        # Two threads: the helper encodes the second part while this one encodes the first and then
        # chains behind the helper; chaining costs about half as much as encoding, hence the shares.
        split = (count // CHAINING_SHARE if chained else count // 2) if njobs == 2 else count
        # Leaves and values are written straight into the output objects, each job into its own
        # window sized to a bound of what its events can produce; the windows are then closed up.
        for k in range(2):
            start = 0 if k == 0 else split
            stop = split if k == 0 else count
            nfields[k] = _count_fields(spans, start, stop)
            if nfields[k] < 0:
                return _fail(call)
            leaf_bound[k] = nfields[k] * LEAF_FIELD_EXTRA + (stop - start) * (LEAF_EXTRA + tenant_span.n + actor_span.n)
            value_bound[k] = nfields[k] * VALUE_FIELD_EXTRA
            for i in range(start, stop):
                leaf_bound[k] += spans[i].n
                value_bound[k] += spans[i].n
        leaves_window = _window(leaf_bound[0] + leaf_bound[1])
        values_window = _window(value_bound[0] + value_bound[1])
        if salts is not None:
            needed = nfields[0] + nfields[1]
            pool = b"".join(bytes(salts(SALT_POOL)) for _ in range((needed + 255) // 256))
            if len(pool) != SALT_POOL * ((needed + 255) // 256):
                # Salts are drawn here for every field; the twin draws only for fields without their own,
                # and its verdict stands.
                return _twin.encode_events(*call[0], **call[1])
            drawn = pool if len(pool) else b"\0"
        for k in range(njobs):
            job = &jobs[k]
            job.spans = spans
            job.start = 0 if k == 0 else split
            job.stop = split if k == 0 else count
            job.first = first
            job.now = now
            job.tenant, job.actor = tenant_span, actor_span
            job.field_limit, job.id_limit, job.value_limit = field_limit, id_limit, value_limit
            job.pool_at = SALT_POOL
            if salts is not None:
                job.salts = &drawn[0]
                job.salts_size = len(pool)
            job.offsets = offset
            job.out.data = <uint8_t *>PyBytes_AS_STRING(<object>leaves_window) + (leaf_bound[0] if k else 0)
            job.out.capacity, job.out.fixed = leaf_bound[k], True
            job.vals.data = <uint8_t *>PyBytes_AS_STRING(<object>values_window) + (value_bound[0] if k else 0)
            job.vals.capacity, job.vals.fixed = value_bound[k], True
            job.leaf_hashes = <uint8_t *>PyBytes_AS_STRING(leaf_hashes)
            job.id_hashes = <uint8_t *>PyBytes_AS_STRING(hashes)
            job.run_starts = <Py_ssize_t *>malloc((job.stop - job.start + 1) * sizeof(Py_ssize_t))
            job.run_correlations = <Span *>malloc((job.stop - job.start + 1) * sizeof(Span))
            job.capacity = 8
            job.fields = <Field *>malloc(job.capacity * sizeof(Field))
            if job.run_starts == NULL or job.run_correlations == NULL or job.fields == NULL:
                raise MemoryError()
        with nogil:
            if njobs == 2 and pthread_create(&helper, NULL, encode_thread, &jobs[1]) == 0:
                started = True
            jobs[0].status = encode_range(&jobs[0])
            if chained and jobs[0].status == OK:
                link(jobs[0].leaf_hashes, heads_at, head_at, 0, split)
                linked = link_behind(&jobs[1], heads_at, head_at, split) if started else split
            if started:
                pthread_join(helper, NULL)
            elif njobs == 2:
                jobs[1].status = encode_range(&jobs[1])
            if chained and jobs[0].status == OK and jobs[1].status == OK:
                link(jobs[0].leaf_hashes, heads_at, head_at, linked, count)
        for k in range(njobs):
            if jobs[k].status != OK:
                return _fail(call)
        # Merge: the second job's leaves and values move down to follow the first job's, its
        # offsets with them.
        if njobs == 2:
            shift = jobs[0].out.size
            for i in range(jobs[1].start, jobs[1].stop):
                offset[i + 1] += shift
            memmove(jobs[0].out.data + jobs[0].out.size, jobs[1].out.data, jobs[1].out.size)
            memmove(jobs[0].vals.data + jobs[0].vals.size, jobs[1].vals.data, jobs[1].vals.size)
        leaves = _shrunk(&leaves_window, jobs[0].out.size + jobs[1].out.size)
        values = _shrunk(&values_window, jobs[0].vals.size + jobs[1].vals.size)
        # The runs of both jobs, one run where the split cut one in two, then grouped by correlation id.
        nruns = 0
        run_spans = <Span *>malloc((jobs[0].nruns + jobs[1].nruns + 1) * sizeof(Span))
        run_first = <Py_ssize_t *>malloc((jobs[0].nruns + jobs[1].nruns + 1) * sizeof(Py_ssize_t))
        run_last = <Py_ssize_t *>malloc((jobs[0].nruns + jobs[1].nruns + 1) * sizeof(Py_ssize_t))
        if run_spans == NULL or run_first == NULL or run_last == NULL:
            raise MemoryError()
        for k in range(njobs):
            for i in range(jobs[k].nruns):
                span = jobs[k].run_correlations[i]
                end_index = (jobs[k].run_starts[i + 1] if i + 1 < jobs[k].nruns else jobs[k].stop) - 1
                if nruns and same(run_spans[nruns - 1], span):
                    run_last[nruns - 1] = first + end_index
                else:
                    run_spans[nruns] = span
                    run_first[nruns] = first + jobs[k].run_starts[i]
                    run_last[nruns] = first + end_index
                    nruns += 1
        runs = _correlations(run_spans, run_first, run_last, nruns)
        min_time, max_time = jobs[0].min_time, jobs[0].max_time
        if njobs == 2 and jobs[1].stop > jobs[1].start:
            min_time = min(min_time, jobs[1].min_time)
            max_time = max(max_time, jobs[1].max_time)
    finally:
        Py_XDECREF(leaves_window)
        Py_XDECREF(values_window)
        free(spans)
        free(run_spans)
        free(run_first)
        free(run_last)
        for k in range(2):
            free(jobs[k].run_starts)
            free(jobs[k].run_correlations)
            free(jobs[k].fields)
            free(jobs[k].commitments)
            free(jobs[k].prefixes.data)
    return EncodedBatch(first, leaves, offsets, values, hashes, runs, min_time, max_time, leaf_hashes, heads)

cdef list _correlations(const Span *spans, const Py_ssize_t *run_first, const Py_ssize_t *run_last, Py_ssize_t n):
    """The twin's ``correlations`` of n runs (correlation span, first and last sequence): grouped by
    correlation id in C, so that a batch of interleaved requests makes a Python object per correlation,
    not per event."""
    cdef size_t size = 16, mask, at
    cdef Py_ssize_t r, g, j, ngroups = 0, a, b, count
    cdef Py_ssize_t *table = NULL
    cdef Py_ssize_t *group_of = NULL
    cdef Py_ssize_t *leader = NULL
    cdef Py_ssize_t *fill = NULL
    cdef Py_ssize_t *order = NULL
    cdef uint8_t *p
    cdef list found = []
    if n == 0:
        return found
    while size < <size_t>n * 2:
        size *= 2
    mask = size - 1
    try:
        table = <Py_ssize_t *>malloc(size * sizeof(Py_ssize_t))
        group_of = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
        leader = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))        # each group's first run
        fill = <Py_ssize_t *>calloc(n + 1, sizeof(Py_ssize_t))       # runs per group, then where each goes
        order = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))         # run indexes, group after group
        if table == NULL or group_of == NULL or leader == NULL or fill == NULL or order == NULL:
            raise MemoryError()
        memset(table, 0xFF, size * sizeof(Py_ssize_t))              # -1: empty
        for r in range(n):
            at = <size_t>fnv1a(spans[r]) & mask
            while table[at] >= 0 and not same(spans[leader[table[at]]], spans[r]):
                at = (at + 1) & mask
            if table[at] < 0:
                table[at] = ngroups
                leader[ngroups] = r
                ngroups += 1
            group_of[r] = table[at]
            fill[table[at] + 1] += 1
        for g in range(ngroups):
            fill[g + 1] += fill[g]
        for r in range(n):
            order[fill[group_of[r]]] = r
            fill[group_of[r]] += 1
        a = 0
        for g in range(ngroups):  # fill[g] is now where group g ends
            b = fill[g]
            count = b - a
            packed = None
            if count > 1:
                packed = PyBytes_FromStringAndSize(NULL, count * 16)
                p = <uint8_t *>PyBytes_AS_STRING(packed)
                for j in range(a, b):
                    put_u64_le(p, <uint64_t>(run_first[order[j]] - run_first[order[a]]))
                    put_u64_le(p + 8, <uint64_t>(run_last[order[j]] - run_first[order[j]] + 1))
                    p += 16
            found.append((PyUnicode_DecodeUTF8(<const char *>spans[order[a]].p, spans[order[a]].n, NULL),
                          run_first[order[a]], run_last[order[b - 1]], packed))
            a = b
    finally:
        free(table)
        free(group_of)
        free(leader)
        free(fill)
        free(order)
    return found


cdef inline size_t _slot(uint64_t key, size_t mask) noexcept nogil:
    # FNV-1a's low bits are well mixed already; one multiply spreads structured keys too.
    return <size_t>((key * 0x9E3779B97F4A7C15ULL) >> 17) & mask


cdef class IdIndex:
    """The replay index (see the twin): an open-addressing table of (hash, sequence),
    16 bytes a slot, at most half full; sequence 0 marks an empty slot."""

    cdef uint64_t *keys
    cdef uint64_t *values
    cdef size_t capacity
    cdef size_t count

    def __cinit__(self):
        self.capacity = 1024
        self.count = 0
        self.keys = <uint64_t *>calloc(self.capacity, sizeof(uint64_t))
        self.values = <uint64_t *>calloc(self.capacity, sizeof(uint64_t))
        if self.keys == NULL or self.values == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.keys)
        free(self.values)

    def __len__(self):
        return self.count

    cdef int _grow(self) except -1:
        cdef size_t old = self.capacity, i, at, mask = old * 2 - 1
        cdef uint64_t *keys = <uint64_t *>calloc(old * 2, sizeof(uint64_t))
        cdef uint64_t *values = <uint64_t *>calloc(old * 2, sizeof(uint64_t))
        if keys == NULL or values == NULL:
            free(keys)
            free(values)
            raise MemoryError()
        for i in range(old):
            if self.values[i]:
                at = _slot(self.keys[i], mask)
                while values[at]:
                    at = (at + 1) & mask
                keys[at] = self.keys[i]
                values[at] = self.values[i]
        free(self.keys)
        free(self.values)
        self.keys, self.values, self.capacity = keys, values, old * 2
        return 0

    cdef uint64_t _find(self, uint64_t key) noexcept nogil:
        cdef size_t mask = self.capacity - 1, at = _slot(key, mask)
        while self.values[at]:
            if self.keys[at] == key:
                return self.values[at]
            at = (at + 1) & mask
        return 0

    def add(self, id_hashes, first_sequence, scope=0):
        cdef const uint8_t[::1] raw = _id_hashes_view(id_hashes)
        if first_sequence < 1:
            raise ValueError(f"first_sequence must be at least 1, got {first_sequence}")
        cdef uint64_t sequence = first_sequence, key, mix = scope
        cdef Py_ssize_t n = raw.shape[0] // 8, i
        cdef size_t mask, at
        while (self.count + n) * 2 > self.capacity:
            self._grow()
        mask = self.capacity - 1
        for i in range(n):
            key = _le64(&raw[i * 8]) ^ mix
            at = _slot(key, mask)
            while self.values[at] and self.keys[at] != key:
                at = (at + 1) & mask
            if not self.values[at]:
                self.keys[at] = key
                self.values[at] = sequence + i
                self.count += 1

    def get(self, key):
        cdef uint64_t found = self._find(key)
        return found if found else None

    def unknown(self, id_hashes, scope=0):
        cdef const uint8_t[::1] raw = _id_hashes_view(id_hashes)
        cdef Py_ssize_t n = raw.shape[0] // 8, i
        cdef size_t size = 16, mask, at
        cdef uint64_t key, mix = scope
        cdef uint64_t *seen
        cdef uint8_t *used
        if n == 0:
            return True
        while size < <size_t>n * 2:
            size *= 2
        mask = size - 1
        seen = <uint64_t *>malloc(size * sizeof(uint64_t))
        used = <uint8_t *>calloc(size, 1)
        if seen == NULL or used == NULL:
            free(seen)
            free(used)
            raise MemoryError()
        try:
            for i in range(n):
                key = _le64(&raw[i * 8]) ^ mix
                if self._find(key):
                    return False
                at = _slot(key, mask)
                while used[at]:
                    if seen[at] == key:
                        return False
                    at = (at + 1) & mask
                used[at] = 1
                seen[at] = key
            return True
        finally:
            free(seen)
            free(used)


cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    for i in range(8):
        value |= (<uint64_t>p[i]) << (8 * i)
    return value


cdef object _id_hashes_view(object id_hashes):
    try:
        view = memoryview(id_hashes)
    except TypeError:
        raise TypeError(f"id_hashes must be a bytes-like object, not {type(id_hashes).__name__}") from None
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes % 8:
        raise ValueError(f"id_hashes must be a multiple of 8 bytes, got {view.nbytes}")
    if view.nbytes == 0:
        return memoryview(b"\0" * 8)[:0]
    return view
