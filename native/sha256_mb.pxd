# The multi-buffer SHA-256 of sha256_mb.h, as the native modules use it.
# Declarations only: cimporting this adds no runtime import.

from libc.stdint cimport uint8_t


cdef extern from "sha256_mb.h":
    ctypedef struct planes_sha256_msg:
        const uint8_t *head
        size_t head_len
        const uint8_t *data
        size_t len
        uint8_t *out
    enum:
        PLANES_SHA256_OPENSSL
        PLANES_SHA256_AVX2
        PLANES_SHA256_AVX512
    void planes_sha256_many(const planes_sha256_msg *m, size_t count) nogil
    void planes_sha256_many_with(const planes_sha256_msg *m, size_t count, int implementation) nogil
    int planes_sha256_implementation() nogil
