/* Multi-buffer SHA-256: many independent messages hashed side by side in vector lanes.
 *
 * This CPU family may lack SHA extensions, where OpenSSL runs one message at a
 * time. SHA-256 on 16 messages at once maps each message to one 32-bit lane of
 * a 512-bit register (AVX-512F: rotates are one vprord, the choice and majority
 * functions one vpternlogd each), or to two 256-bit halves under AVX2. The
 * lanes code is written once with GCC vector extensions and compiled twice,
 * for each target, by function attributes: the build needs no -march flag and
 * the module still runs on CPUs without AVX (it then uses OpenSSL).
 *
 * A message is ``head || data`` (head: a short domain prefix such as RFC 6962's
 * 0x00 or 0x01, possibly empty). ``planes_sha256_many`` hashes ``count`` of
 * them and writes each digest to its ``out``; results equal SHA-256 of the
 * concatenation whatever the implementation. ``PLANES_SHA256=openssl|avx2``
 * caps the implementation (read once per module); the fastest supported one
 * is the default.
 */
#ifndef PLANES_SHA256_MB_H
#define PLANES_SHA256_MB_H

#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *head;
    size_t head_len;
    const uint8_t *data;
    size_t len;
    uint8_t *out;       /* 32 bytes */
} planes_sha256_msg;

enum { PLANES_SHA256_OPENSSL = 0, PLANES_SHA256_AVX2 = 1, PLANES_SHA256_AVX512 = 2 };

/* A group costs the same with 1 lane busy or 16, so fewer messages than this left over after
 * the full groups go to OpenSSL: 16 over the speed-up measured on 256-byte messages (AVX-512
 * 4.6x, AVX2 1.8x OpenSSL one message at a time), rounded up. */
#define PLANES_SHA256_MIN_LANES_AVX512 4
#define PLANES_SHA256_MIN_LANES_AVX2 9

static const uint32_t planes_sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t planes_sha256_iv[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

static inline size_t planes_sha256_blocks(const planes_sha256_msg *m) {
    return (m->head_len + m->len + 8) / 64 + 1;     /* the message, 0x80, the 64-bit length */
}

static inline uint32_t planes_be32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

/* Block ``k`` of the padded message into ``block`` (64 bytes); a pointer to it,
 * or straight into the data when the block lies wholly inside it. */
static inline const uint8_t *planes_sha256_block(const planes_sha256_msg *m, size_t k, uint8_t *block) {
    size_t start = 64 * k, end = start + 64, total = m->head_len + m->len, from, to;
    if (start >= m->head_len && end <= total)
        return m->data + (start - m->head_len);
    memset(block, 0, 64);
    if (start < m->head_len) {
        to = m->head_len < end ? m->head_len : end;
        memcpy(block, m->head + start, to - start);
    }
    from = start > m->head_len ? start : m->head_len;
    to = total < end ? total : end;
    if (from < to)
        memcpy(block + (from - start), m->data + (from - m->head_len), to - from);
    if (start <= total && total < end)
        block[total - start] = 0x80;
    if (k + 1 == planes_sha256_blocks(m)) {
        uint64_t bits = (uint64_t)total * 8;
        for (int i = 0; i < 8; i++)
            block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    }
    return block;
}

/* 16 lanes of 32-bit words. Under AVX-512F one register; under AVX2 GCC splits it in two. */
typedef uint32_t planes_u32x16 __attribute__((vector_size(64), aligned(64)));

#define PLANES_ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define PLANES_ROUND(a, b, c, d, e, f, g, h, t)                                                         \
    do {                                                                                                \
        planes_u32x16 t1 = h + (PLANES_ROR(e, 6) ^ PLANES_ROR(e, 11) ^ PLANES_ROR(e, 25))               \
                           + ((e & f) ^ (~e & g)) + planes_sha256_k[t] + w[t];                          \
        planes_u32x16 t2 = (PLANES_ROR(a, 2) ^ PLANES_ROR(a, 13) ^ PLANES_ROR(a, 22))                   \
                           + ((a & b) ^ (a & c) ^ (b & c));                                             \
        d += t1;                                                                                        \
        h = t1 + t2;                                                                                    \
    } while (0)

/* Rows of 16 big-endian words (one block a lane) to 16 vectors of word t, byte-swapped:
 * four butterfly stages, each swapping one bit of the row index with that of the column. */
static inline __attribute__((always_inline)) void planes_sha256_transpose(planes_u32x16 *w) {
    static const planes_u32x16 low[4] = {
        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    };
    static const planes_u32x16 high[4] = {
        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    };
    for (int stage = 0; stage < 4; stage++) {
        int d = 1 << stage;
        for (int i = 0; i < 16; i++) {
            if (i & d)
                continue;
            planes_u32x16 x = w[i], y = w[i | d];
            w[i] = __builtin_shuffle(x, y, low[stage]);
            w[i | d] = __builtin_shuffle(x, y, high[stage]);
        }
    }
    for (int t = 0; t < 16; t++)
        w[t] = PLANES_ROR(w[t] & 0x00ff00ff, 8) | PLANES_ROR(w[t] & 0xff00ff00, 24);
}

/* Up to 16 messages, one per lane; lanes whose message has ended keep their state.
 * Inlined into each target-specific caller, so it is compiled once per target. The blocks go
 * into lanes by a shuffle transpose (``by_shuffle``: one vpermt2d each under AVX-512) or word by
 * word (AVX2, where GCC splits 64-byte shuffles badly: 1.1 against 1.8 M hashes/s measured). */
static inline __attribute__((always_inline)) void planes_sha256_lanes(const planes_sha256_msg *m, int count,
                                                                      int by_shuffle) {
    uint32_t blocks[16], words[16][16] __attribute__((aligned(64))), digest[8][16] __attribute__((aligned(64)));
    uint8_t scratch[16][64];
    planes_u32x16 state[8], w[64], a, b, c, d, e, f, g, h, active, index, limit;
    size_t most = 0, k;
    int lane, t;
    memset(w, 0, 16 * sizeof(w[0]));    /* idle lanes hash zeros, their state masked off */
    memset(words, 0, sizeof(words));
    for (lane = 0; lane < 16; lane++) {
        blocks[lane] = lane < count ? (uint32_t)planes_sha256_blocks(&m[lane]) : 0;
        if (blocks[lane] > most)
            most = blocks[lane];
    }
    memcpy(&limit, blocks, sizeof(limit));
    for (t = 0; t < 8; t++)
        state[t] = (planes_u32x16){0} + planes_sha256_iv[t];
    for (k = 0; k < most; k++) {
        if (by_shuffle) {
            for (lane = 0; lane < count; lane++)
                if (k < blocks[lane])
                    memcpy(&w[lane], planes_sha256_block(&m[lane], k, scratch[lane]), 64);
            planes_sha256_transpose(w);
        } else {
            for (lane = 0; lane < count; lane++) {
                if (k < blocks[lane]) {
                    const uint8_t *block = planes_sha256_block(&m[lane], k, scratch[lane]);
                    for (t = 0; t < 16; t++)
                        words[t][lane] = planes_be32(block + 4 * t);
                }
            }
            memcpy(w, words, sizeof(words));
        }
        for (t = 16; t < 64; t++) {
            planes_u32x16 s0 = PLANES_ROR(w[t - 15], 7) ^ PLANES_ROR(w[t - 15], 18) ^ (w[t - 15] >> 3);
            planes_u32x16 s1 = PLANES_ROR(w[t - 2], 17) ^ PLANES_ROR(w[t - 2], 19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        a = state[0], b = state[1], c = state[2], d = state[3];
        e = state[4], f = state[5], g = state[6], h = state[7];
        for (t = 0; t < 64; t += 8) {
            PLANES_ROUND(a, b, c, d, e, f, g, h, t);
            PLANES_ROUND(h, a, b, c, d, e, f, g, t + 1);
            PLANES_ROUND(g, h, a, b, c, d, e, f, t + 2);
            PLANES_ROUND(f, g, h, a, b, c, d, e, t + 3);
            PLANES_ROUND(e, f, g, h, a, b, c, d, t + 4);
            PLANES_ROUND(d, e, f, g, h, a, b, c, t + 5);
            PLANES_ROUND(c, d, e, f, g, h, a, b, t + 6);
            PLANES_ROUND(b, c, d, e, f, g, h, a, t + 7);
        }
        index = (planes_u32x16){0} + (uint32_t)k;
        active = (planes_u32x16)(index < limit);
        state[0] += a & active, state[1] += b & active, state[2] += c & active, state[3] += d & active;
        state[4] += e & active, state[5] += f & active, state[6] += g & active, state[7] += h & active;
    }
    memcpy(digest, state, sizeof(digest));
    for (lane = 0; lane < count; lane++)
        for (t = 0; t < 8; t++) {
            uint32_t v = __builtin_bswap32(digest[t][lane]);
            memcpy(m[lane].out + 4 * t, &v, 4);
        }
}

static void planes_sha256_openssl(const planes_sha256_msg *m, size_t count) {
    SHA256_CTX ctx;
    for (size_t i = 0; i < count; i++) {
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, m[i].head, m[i].head_len);
        SHA256_Update(&ctx, m[i].data, m[i].len);
        SHA256_Final(m[i].out, &ctx);
    }
}

__attribute__((target("avx512f,avx512vl"))) static void planes_sha256_avx512(const planes_sha256_msg *m, size_t count) {
    for (; count >= 16; m += 16, count -= 16)
        planes_sha256_lanes(m, 16, 1);
    if (count >= PLANES_SHA256_MIN_LANES_AVX512)
        planes_sha256_lanes(m, (int)count, 1);
    else
        planes_sha256_openssl(m, count);
}

__attribute__((target("avx2"))) static void planes_sha256_avx2(const planes_sha256_msg *m, size_t count) {
    for (; count >= 16; m += 16, count -= 16)
        planes_sha256_lanes(m, 16, 0);
    if (count >= PLANES_SHA256_MIN_LANES_AVX2)
        planes_sha256_lanes(m, (int)count, 0);
    else
        planes_sha256_openssl(m, count);
}

/* The fastest implementation this CPU runs, capped by PLANES_SHA256 (openssl, avx2, avx512). */
static int planes_sha256_detect(void) {
    int best = PLANES_SHA256_OPENSSL;
    const char *cap = getenv("PLANES_SHA256");
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        best = PLANES_SHA256_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        best = PLANES_SHA256_AVX512;
    if (cap != NULL && strcmp(cap, "openssl") == 0)
        best = PLANES_SHA256_OPENSSL;
    else if (cap != NULL && strcmp(cap, "avx2") == 0 && best > PLANES_SHA256_AVX2)
        best = PLANES_SHA256_AVX2;
    return best;
}

static int planes_sha256_chosen = -1;

static inline int planes_sha256_implementation(void) {
    int chosen = __atomic_load_n(&planes_sha256_chosen, __ATOMIC_RELAXED);
    if (chosen < 0) {   /* a race here is harmless: every thread computes the same value */
        chosen = planes_sha256_detect();
        __atomic_store_n(&planes_sha256_chosen, chosen, __ATOMIC_RELAXED);
    }
    return chosen;
}

/* Hash ``count`` messages with ``implementation`` (one this CPU supports). */
static void planes_sha256_many_with(const planes_sha256_msg *m, size_t count, int implementation) {
    if (implementation == PLANES_SHA256_AVX512)
        planes_sha256_avx512(m, count);
    else if (implementation == PLANES_SHA256_AVX2)
        planes_sha256_avx2(m, count);
    else
        planes_sha256_openssl(m, count);
}

static inline void planes_sha256_many(const planes_sha256_msg *m, size_t count) {
    planes_sha256_many_with(m, count, planes_sha256_implementation());
}

#endif
