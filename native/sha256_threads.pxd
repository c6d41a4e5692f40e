# OpenSSL's SHA-256 and POSIX threads, as the native modules use them.
# Declarations only: cimporting this adds no runtime import.

cdef extern from *:
    """
    /* SHA256_Init/Update/Final are deprecated in OpenSSL 3 yet faster than EVP for small inputs. */
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    #include <openssl/sha.h>
    #include <pthread.h>
    """
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c) nogil
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t length) nogil
    int SHA256_Final(unsigned char *md, SHA256_CTX *c) nogil

    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef void *(*thread_main)(void *) noexcept nogil
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr, thread_main start, void *arg) nogil
    int pthread_join(pthread_t thread, void **result) nogil
