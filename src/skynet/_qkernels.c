/* Quantized matmul kernels for skynet.quant: y = x @ W.T with W in GGML blocks.
 *
 * Activations x (N, K) are 8-bit blocks of 32: q (int8), d (float32), s = sum(q) (int32),
 * with x ~= d * q. Weight blocks are the GGML layouts (little-endian, fp16 scales):
 *
 *   Q4_0  (32 values,  18 B): d, qs[16]              w = d * (n - 8)
 *   Q4_1  (32 values,  20 B): d, m, qs[16]           w = d * n + m
 *   Q8_0  (32 values,  34 B): d, qs[32] (int8)       w = d * n
 *   Q4_K (256 values, 144 B): d, dmin, sc[12], qs[128]            w = d*sc_j*n - dmin*m_j
 *   Q5_K (256 values, 176 B): d, dmin, sc[12], qh[32], qs[128]    (n has a 5th bit in qh)
 *   Q6_K (256 values, 210 B): ql[128], qh[64], sc[16] (int8), d    w = d * sc_k * (n - 32)
 *
 * Nibbles: value i of a 32-run is the low nibble of byte i, value i + 16 (Q4_0/Q4_1) or the
 * next 32-run (K-quants) is the high nibble. K-quant sub-blocks hold 32 values (Q4_K, Q5_K) or 16
 * (Q6_K), so one activation block of 32 covers one or two of them.
 *
 * For each weight block b and activation block (dx, q, s) the integer sums are exact and the
 * float term is (in double; the same formula in every kernel):
 *   Q4_0, Q8_0:  (d*dx) * isum                 (Q4_0: isum = sum (n-8) q)
 *   Q4_1:        (d*dx) * isum + (m*dx) * s
 *   Q4_K, Q5_K:  (d*dx) * (sc_j*isum) - (dmin*dx) * (m_j*s)
 *   Q6_K:        (d*dx) * (sc_a*isum_a + sc_b*isum_b)
 * The terms are added in float64 in block order, and float32 output is (float) of that sum: one
 * canonical result per (weight row, activation row), the same in every kernel (generic, AVX2,
 * AVX-512 VNNI), whatever N, the tiling, or the thread count. SIMD kernels keep one pair per
 * float64 lane and compute that lane's term. Where a product is exact in double the kernels may
 * regroup it, which gives the same double: d*dx (11 x 24 bits), Q4_1's (d*dx)*isum (|isum| < 2^16)
 * and (m*dx)*s (|s| < 2^12), the K-quants' (dmin*dx)*(m_j*s) = (dmin*m_j)*(dx*s) (53 bits) and
 * sc_j*isum; an FMA a*b+c whose a*b is exact rounds once, like the add. (Non-finite scales aside:
 * which NaN payload survives may then differ.) Everything else runs the formula as written.
 *
 * Paths: generic C (any CPU), AVX2 and AVX-512 VNNI (x86-64, chosen at run time). All formats have
 * SIMD kernels: decode kernels for up to 8 (AVX2) or 16 (AVX-512) activation rows (lane = weight
 * row; Q4_0, Q4_1, Q8_0), 1..KDEC_MAX (6) for the K-quants, and tile kernels that
 * re-lay out the activations (lane = activation row; see struct tact).
 *
 * threads > 1: the calling thread and persistent POSIX workers (started on first use) take
 * activation units and then chunks of weight rows from atomic counters; small calls stay on the
 * calling thread. Idle workers spin ~200 µs after a job, then block: an idle process burns no core.
 *
 * Build with -ffp-contract=off: neither the reference dequantizers nor the terms may fuse a*b+c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#define SK_THREADS 1
#include <pthread.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
#include <immintrin.h>
#endif
#include "_qkernels.h"
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "GGML blocks are little-endian; big-endian hosts are not supported"
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_MAX = 15 };

static int block_values(int t) { return t >= T_Q4_K ? 256 : 32; }
static int block_bytes(int t)
{
    switch (t) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

/* ------------------------------------------------------------------ fp16 */
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline float h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_f(sign | 0x7f800000u | (m << 13));
    if (e) return bits_f(sign | ((e + 112) << 23) | (m << 13));
    return bits_f(sign | f_bits((float)m * 0x1p-24f));   /* zero or subnormal: exact */
}

static inline uint16_t f2h(float f)   /* round to nearest even, like numpy's astype(float16) */
{
    uint32_t x = f_bits(f), sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | (ax >> 13));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);           /* >= 65520: inf */
    if (ax < 0x38800000u) {                                             /* half subnormal */
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000, sh = 126 - e;
        uint32_t q = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ff), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* K-quant 6-bit scale and min of sub-block j from the 12 packed bytes. */
static inline void kscale(const uint8_t *s, int j, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ------------------------------------------------------------------ dequantize (reference) */
static void deq_block(int t, const uint8_t *b, float *y)
{
    switch (t) {
    case T_Q4_0: {
        float d = h2f(rd16(b));
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)((b[2 + i] & 15) - 8);
            y[i + 16] = d * (float)((b[2 + i] >> 4) - 8);
        }
        break;
    }
    case T_Q4_1: {
        float d = h2f(rd16(b)), m = h2f(rd16(b + 2));
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)(b[4 + i] & 15) + m;
            y[i + 16] = d * (float)(b[4 + i] >> 4) + m;
        }
        break;
    }
    case T_Q8_0: {
        float d = h2f(rd16(b));
        for (int i = 0; i < 32; i++) y[i] = (float)(int8_t)b[2 + i] * d;
        break;
    }
    case T_Q4_K:
    case T_Q5_K: {
        float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
        const uint8_t *qh = b + 16, *qs = b + (t == T_Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            kscale(b + 4, j, &sc, &m);
            float dj = d * (float)sc, mj = dmin * (float)m;
            const uint8_t *p = qs + 32 * (j >> 1);
            for (int i = 0; i < 32; i++) {
                int n = (j & 1) ? p[i] >> 4 : p[i] & 15;
                if (t == T_Q5_K) n |= ((qh[i] >> j) & 1) << 4;
                y[32 * j + i] = dj * (float)n - mj;
            }
        }
        break;
    }
    case T_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(rd16(b + 208));
        for (int v = 0; v < 256; v++) {
            int h = v >> 7, r = (v >> 5) & 3, i = v & 31;
            int lo = (ql[64 * h + 32 * (r & 1) + i] >> (4 * (r >> 1))) & 15;
            int hi = (qh[32 * h + i] >> (2 * r)) & 3;
            y[v] = (d * (float)sc[v >> 4]) * (float)((lo | (hi << 4)) - 32);
        }
        break;
    }
    }
}

/* ------------------------------------------------------------------ activations */
static void quant_act_rows_generic(const float *x, int n0, int n1, int K, int8_t *q, float *d, int32_t *s)
{
    int nb = K / 32;
    for (int n = n0; n < n1; n++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)n * K + 32 * b;
            int8_t *qb = q + (size_t)n * K + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) {
                float a = fabsf(xb[i]);
                amax = a > amax ? a : amax;
            }
            float db = amax / 127.0f;
            int sum = 0;
            if (db == 0.0f) {
                memset(qb, 0, 32);
            } else {
                for (int i = 0; i < 32; i++) {
                    /* round half to even: exact for |v| < 2^22 in the default rounding mode */
                    float v = (xb[i] / db + 12582912.0f) - 12582912.0f;
                    qb[i] = (int8_t)(int)v;
                    sum += (int)v;
                }
            }
            d[(size_t)n * nb + b] = db;
            s[(size_t)n * nb + b] = sum;
        }
    }
}

/* ------------------------------------------------------------------ matmul arguments */
typedef struct tact tact;

typedef struct {
    int type, rows, K, N, f64;
    size_t row_bytes;
    const uint8_t *w;
    const int8_t *q;      /* (N, K) */
    const float *dx;      /* (N, K/32) */
    const int32_t *sx;    /* (N, K/32) */
    void *out;            /* (N, rows) float32 or float64 */
    const tact *act;      /* activation rows [act->n0, N) re-laid out for the tile kernels, or NULL */
} mm_args;

typedef int (*mm_fn)(const mm_args *a, int r0, int r1);   /* 0, or -1 when out of memory */
typedef void (*qa_fn)(const float *x, int n0, int n1, int K, int8_t *q, float *d, int32_t *s);

static inline void store(const mm_args *a, int n, int r, double v)
{
    if (a->f64) ((double *)a->out)[(size_t)n * a->rows + r] = v;
    else ((float *)a->out)[(size_t)n * a->rows + r] = (float)v;
}

/* Activations re-laid out for the tile kernels: activation rows [n0, N) in tiles of L (8 or 16)
 * rows; 4L-byte vector t of block b of a tile holds bytes 4t..4t+3 of its L rows' blocks (lane j =
 * row n0 + L g + j), so one broadcast of 4 weight bytes times that vector adds into one int32 lane
 * per (weight row, activation row): no horizontal sums. Rows past N are zero lanes, never stored. */
struct tact {
    int L, n0, nt, nb;
    uint8_t *qT;          /* [nt][nb][8][4L] */
    float *dx;            /* [nt][nb][L] */
    int32_t *s, *sa;      /* [nt][nb][L]: block sums and sums of the first 16 values (Q6_K) */
    double *dxs;          /* [nt][nb][L]: dx * s, exact (Q4_1) */
    void *mem;
};

static int tact_alloc(tact *A, int L, int n0, int N, int nb)
{
    A->L = L;
    A->n0 = n0;
    A->nt = (N - n0 + L - 1) / L;
    A->nb = nb;
    size_t e = (size_t)A->nt * nb * L;
    char *mem = calloc(1, e * (32 + 8 + 12) + 64);
    if (!mem) return 0;
    A->mem = mem;
    A->dxs = (double *)mem;
    A->dx = (float *)(A->dxs + e);
    A->s = (int32_t *)(A->dx + e);
    A->sa = A->s + e;
    A->qT = (uint8_t *)(A->sa + e);
    return 1;
}

/* Fills tile rows [i0, i1) (activation rows n0 + i0 ...) from a->q, a->dx, a->sx. */
static void tact_fill(tact *A, const mm_args *a, int i0, int i1)
{
    int L = A->L, nb = A->nb, K = a->K;
    for (int i = i0; i < i1; i++) {
        int n = A->n0 + i, g = i / L, j = i % L;
        const int8_t *q = a->q + (size_t)n * K;
        for (int b = 0; b < nb; b++) {
            size_t tb = (size_t)g * nb + b, e = tb * L + j;
            uint8_t *dst = A->qT + tb * 32 * L + 4 * j;
            for (int t = 0; t < 8; t++) memcpy(dst + (size_t)t * 4 * L, q + 32 * b + 4 * t, 4);
            int sa = 0;
            for (int k = 0; k < 16; k++) sa += q[32 * b + k];
            float dx = a->dx[(size_t)n * nb + b];
            int32_t s = a->sx[(size_t)n * nb + b];
            A->dx[e] = dx;
            A->s[e] = s;
            A->sa[e] = sa;
            A->dxs[e] = (double)dx * (double)s;
        }
    }
}
/* ------------------------------------------------------------------ generic kernel
 * Each weight row is unpacked once into int8 values and per-block scales, then dotted with every
 * activation row. Plain C that the compiler vectorizes on any target. */
typedef struct {
    int8_t *v;            /* (K,) integer weights: n, n - 8 (Q4_0) or n - 32 (Q6_K) */
    float *da, *dm;       /* (nb,) d and, for Q4_1 m / for K-quants dmin, per 32-block */
    int32_t *c0, *c1, *cm;/* (nb,) integer scales of the two 16-halves, and m_j */
} urow;

static void unpack_row(int t, const uint8_t *w, int K, urow *u)
{
    int nb = K / 32;
    if (t <= T_Q8_0) {
        int bb = block_bytes(t);
        for (int b = 0; b < nb; b++) {
            const uint8_t *p = w + (size_t)b * bb;
            int8_t *v = u->v + 32 * b;
            u->da[b] = h2f(rd16(p));
            u->dm[b] = t == T_Q4_1 ? h2f(rd16(p + 2)) : 0.0f;
            u->c0[b] = u->c1[b] = 1;
            u->cm[b] = 1;
            if (t == T_Q8_0) {
                memcpy(v, p + 2, 32);
            } else {
                const uint8_t *qs = p + (t == T_Q4_1 ? 4 : 2);
                int off = t == T_Q4_0 ? 8 : 0;
                for (int i = 0; i < 16; i++) {
                    v[i] = (int8_t)((qs[i] & 15) - off);
                    v[i + 16] = (int8_t)((qs[i] >> 4) - off);
                }
            }
        }
        return;
    }
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *p = w + (size_t)sb * block_bytes(t);
        int8_t *v = u->v + 256 * sb;
        int b0 = 8 * sb;
        if (t == T_Q6_K) {
            const int8_t *sc = (const int8_t *)(p + 192);
            float d = h2f(rd16(p + 208));
            for (int i = 0; i < 256; i++) {
                int h = i >> 7, r = (i >> 5) & 3, k = i & 31;
                int lo = (p[64 * h + 32 * (r & 1) + k] >> (4 * (r >> 1))) & 15;
                int hi = (p[128 + 32 * h + k] >> (2 * r)) & 3;
                v[i] = (int8_t)((lo | (hi << 4)) - 32);
            }
            for (int j = 0; j < 8; j++) {
                u->da[b0 + j] = d;
                u->dm[b0 + j] = 0.0f;
                u->c0[b0 + j] = sc[2 * j];
                u->c1[b0 + j] = sc[2 * j + 1];
                u->cm[b0 + j] = 0;
            }
        } else {
            float d = h2f(rd16(p)), dmin = h2f(rd16(p + 2));
            const uint8_t *qh = p + 16, *qs = p + (t == T_Q5_K ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, m;
                kscale(p + 4, j, &sc, &m);
                u->da[b0 + j] = d;
                u->dm[b0 + j] = dmin;
                u->c0[b0 + j] = u->c1[b0 + j] = sc;
                u->cm[b0 + j] = m;
                const uint8_t *s = qs + 32 * (j >> 1);
                for (int i = 0; i < 32; i++) {
                    int n = (j & 1) ? s[i] >> 4 : s[i] & 15;
                    if (t == T_Q5_K) n |= ((qh[i] >> j) & 1) << 4;
                    v[32 * j + i] = (int8_t)n;
                }
            }
        }
    }
}

/* The per-block float term, shared by every kernel (see the header). */
static inline double term_simple(float d, float dx, int32_t isum)
{
    return ((double)d * (double)dx) * (double)isum;
}
static inline double term_q4_1(float d, float m, float dx, int32_t isum, int32_t s)
{
    return ((double)d * (double)dx) * (double)isum + ((double)m * (double)dx) * (double)s;
}
static inline double term_k(float d, float dmin, float dx, int32_t scisum, int32_t ms)
{
    return ((double)d * (double)dx) * (double)scisum - ((double)dmin * (double)dx) * (double)ms;
}

static inline int32_t dot16(const int8_t *a, const int8_t *b)
{
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += (int32_t)a[i] * (int32_t)b[i];
    return s;
}

static int mm_generic(const mm_args *a, int r0, int r1)
{
    int t = a->type, K = a->K, nb = K / 32;
    void *mem = malloc((size_t)K + (size_t)nb * 20);
    if (!mem) return -1;
    urow u = {(int8_t *)mem, (float *)((char *)mem + K), NULL, NULL, NULL, NULL};
    u.dm = u.da + nb;
    u.c0 = (int32_t *)(u.dm + nb);
    u.c1 = u.c0 + nb;
    u.cm = u.c1 + nb;
    for (int r = r0; r < r1; r++) {
        unpack_row(t, a->w + (size_t)r * a->row_bytes, K, &u);
        for (int n = 0; n < a->N; n++) {
            const int8_t *q = a->q + (size_t)n * K;
            const float *dx = a->dx + (size_t)n * nb;
            const int32_t *sx = a->sx + (size_t)n * nb;
            double acc = 0.0;
            for (int b = 0; b < nb; b++) {
                int32_t i0 = dot16(u.v + 32 * b, q + 32 * b), i1 = dot16(u.v + 32 * b + 16, q + 32 * b + 16);
                double term;
                if (t == T_Q4_1) term = term_q4_1(u.da[b], u.dm[b], dx[b], i0 + i1, sx[b]);
                else if (t == T_Q4_K || t == T_Q5_K)
                    term = term_k(u.da[b], u.dm[b], dx[b], u.c0[b] * (i0 + i1), u.cm[b] * sx[b]);
                else if (t == T_Q6_K) term = term_simple(u.da[b], dx[b], u.c0[b] * i0 + u.c1[b] * i1);
                else term = term_simple(u.da[b], dx[b], i0 + i1);
                acc += term;
            }
            store(a, n, r, acc);
        }
    }
    free(mem);
    return 0;
}

/* ------------------------------------------------------------------ AVX2 kernels */
#ifdef SK_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2I static inline __attribute__((always_inline, target("avx2,fma,f16c")))

AVX2I float h2f_x(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

AVX2I int32_t hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Decode tiles (activation rows before act->n0; Q4_0, Q4_1, Q8_0): 8 weight rows x each
 * activation row, lane k = row r + k; the integer sums of the 8 pairs are reduced into the lanes
 * of one vector, and each lane forms its pair's float64 term and adds it in block order exactly as
 * mm_generic does. Integer sums use maddubs (u8 x s8): Q4_0 as sum(n q) - 8 s, Q8_0 with the sign
 * trick (|w| x sign(q, w)), both exact. */
#define DEC_ROWS 16   /* most activation rows one decode tile takes together (tile_plan) */

typedef struct {
    const mm_args *a;
    int T, nb, bb, qoff;  /* qoff: byte offset of the quants in a block */
} lk_ctx;

AVX2I uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* A decode tile reads R rows at once: R interleaved streams, more than the hardware prefetcher runs
 * ahead on. The next tile's rows are contiguous, so each block step asks for a share of their cache
 * lines while it computes. Measured (default model's MLP, one row, one thread): 30 layers in turn
 * took 1.23-1.42x the time of one L2-resident layer before, 1.01-1.14x after. The K-quant decode
 * (kdec_run) asks for the next 8 rows as it unpacks these. */
static inline void prefetch_line(const void *p)
{
    /* asm volatile: GCC 12 drops _mm_prefetch loops it deems free of side effects */
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p));
}

/* Into L2 only: for the tile kernels, whose unpacked rows and activations fill L1. */
static inline void prefetch_line_l2(const void *p)
{
    __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)p));
}

static inline void prefetch_next(const mm_args *a, int r, int R, int rend, int b, int nb)
{
    int rows = rend - (r + R) < R ? rend - (r + R) : R;
    if (rows <= 0) return;
    const char *next = (const char *)(a->w + (size_t)(r + R) * a->row_bytes);
    int lines = (int)(((size_t)rows * a->row_bytes + 63) / 64), per = (lines + nb - 1) / nb;
    int i1 = (b + 1) * per < lines ? (b + 1) * per : lines;
    for (int i = b * per; i < i1; i++) prefetch_line(next + (size_t)i * 64);
}

/* Writes lane k of the results v[] to out[n][r + k] (r + k < rend). */
static void lk_store(const mm_args *a, const double *v, int lanes, int r, int rend, int n)
{
    for (int k = 0; k < lanes; k++)
        if (r + k < rend) store(a, n, r + k, v[k]);
}
AVX2I __m256i a2_pair(const uint8_t *p0, const uint8_t *p1)
{
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                   _mm_loadu_si128((const __m128i *)p1), 1);
}

/* Block values 0..15 (lo) and 16..31 (hi) of two rows' blocks, one row per 128-bit lane. */
AVX2I void a2_w(int T, int qoff, const uint8_t *p0, const uint8_t *p1, __m256i *lo, __m256i *hi)
{
    if (T == T_Q8_0) {
        *lo = a2_pair(p0 + 2, p1 + 2);
        *hi = a2_pair(p0 + 18, p1 + 18);
    } else {
        __m256i v = a2_pair(p0 + qoff, p1 + qoff), m = _mm256_set1_epi8(15);
        *lo = _mm256_and_si256(v, m);
        *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    }
}

/* Per 128-bit lane, 4 int32 partial sums of the lane's row block times activation block q. */
AVX2I __m256i a2_dot(int T, __m256i lo, __m256i hi, const int8_t *q)
{
    __m256i qlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    __m256i qhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 16)));
    const __m256i one = _mm256_set1_epi16(1);
    if (T == T_Q8_0)
        return _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(lo), _mm256_sign_epi8(qlo, lo)), one),
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(hi), _mm256_sign_epi8(qhi, hi)), one));
    /* nibbles: |each int16| <= 2 * 15 * 127, the sum of two fits */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo), _mm256_maddubs_epi16(hi, qhi)), one);
}

/* Per 128-bit lane L: [sum a0_L, sum a1_L, sum a2_L, sum a3_L] (exact int32). */
AVX2I __m256i a2_red4(__m256i a0, __m256i a1, __m256i a2, __m256i a3)
{
    __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
    __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

/* term_simple / term_q4_1 in 4 lanes, the same operations in the same order. */
AVX2I __m256d a2_term(int T, __m256d dw, __m256d dm, __m256d dx, __m256d isum, __m256d s)
{
    __m256d t = _mm256_mul_pd(_mm256_mul_pd(dw, dx), isum);
    if (T == T_Q4_1) t = _mm256_add_pd(t, _mm256_mul_pd(_mm256_mul_pd(dm, dx), s));
    return t;
}

/* Decode tile: rows r..r+7 (clamped to rend - 1) x activation rows [n0, n1) (at most DEC_ROWS).
 * The weight blocks are loaded, unpacked and their scales gathered once per block for all the
 * activation rows; each (weight row, activation row) lane still forms its own terms in block order,
 * so its float64 sum is the same whatever the number of rows taken together. */
AVX2I void a2_decode_n(const lk_ctx *c, int r, int rend, int n0, int na)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff;
    size_t bb = (size_t)c->bb;
    const uint8_t *w[8];
    for (int k = 0; k < 8; k++) w[k] = a->w + (size_t)(r + k < rend ? r + k : rend - 1) * a->row_bytes;
    __m256d acc[DEC_ROWS][2];
    for (int j = 0; j < na; j++) acc[j][0] = acc[j][1] = _mm256_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t o = (size_t)b * bb;
        prefetch_next(a, r, 8, rend, b, nb);
        __m256i lo[4], hi[4];
        for (int i = 0; i < 4; i++) a2_w(T, qoff, w[i] + o, w[i + 4] + o, &lo[i], &hi[i]);
        __m256i h = _mm256_setr_epi32((int)rd32(w[0] + o), (int)rd32(w[1] + o), (int)rd32(w[2] + o), (int)rd32(w[3] + o),
                                      (int)rd32(w[4] + o), (int)rd32(w[5] + o), (int)rd32(w[6] + o), (int)rd32(w[7] + o));
        /* per 128-bit lane: [d0..d3 | m0..m3] as 16-bit, then [d0..d7 | m0..m7] */
        __m256i dm16 = _mm256_packus_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(h, 16));
        dm16 = _mm256_permute4x64_epi64(dm16, 0xd8);
        __m256 dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dm16)), dm = _mm256_setzero_ps();
        if (T == T_Q4_1) dm = _mm256_cvtph_ps(_mm256_extracti128_si256(dm16, 1));
        __m256d dw0 = _mm256_cvtps_pd(_mm256_castps256_ps128(dw)), dw1 = _mm256_cvtps_pd(_mm256_extractf128_ps(dw, 1));
        __m256d dm0 = _mm256_cvtps_pd(_mm256_castps256_ps128(dm)), dm1 = _mm256_cvtps_pd(_mm256_extractf128_ps(dm, 1));
        for (int j = 0; j < na; j++) {
            size_t n = (size_t)(n0 + j);
            const int8_t *q = a->q + n * a->K + 32 * b;
            __m256i A[4];
            for (int i = 0; i < 4; i++) A[i] = a2_dot(T, lo[i], hi[i], q);
            __m256i u = a2_red4(A[0], A[1], A[2], A[3]);   /* lane k: row r + 4 (k / 4) + k % 4 = r + k */
            int32_t s = a->sx[n * nb + b];
            if (T == T_Q4_0) u = _mm256_sub_epi32(u, _mm256_set1_epi32(8 * s));
            __m256d dxd = _mm256_set1_pd((double)a->dx[n * nb + b]), sd = _mm256_set1_pd((double)s);
            acc[j][0] = _mm256_add_pd(acc[j][0], a2_term(T, dw0, dm0, dxd, _mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), sd));
            acc[j][1] = _mm256_add_pd(acc[j][1], a2_term(T, dw1, dm1, dxd, _mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1)), sd));
        }
    }
    for (int j = 0; j < na; j++) {
        int n = n0 + j;
        if (r + 8 <= rend && a->f64) {
            double *o = (double *)a->out + (size_t)n * a->rows + r;
            _mm256_storeu_pd(o, acc[j][0]);
            _mm256_storeu_pd(o + 4, acc[j][1]);
        } else if (r + 8 <= rend) {
            float *o = (float *)a->out + (size_t)n * a->rows + r;
            _mm_storeu_ps(o, _mm256_cvtpd_ps(acc[j][0]));
            _mm_storeu_ps(o + 4, _mm256_cvtpd_ps(acc[j][1]));
        } else {
            double v[8];
            _mm256_storeu_pd(v, acc[j][0]);
            _mm256_storeu_pd(v + 4, acc[j][1]);
            lk_store(a, v, 8, r, rend, n);
        }
    }
}

/* One row (a sequence's decode step) with its count known to the compiler: its accumulators stay
 * in registers (16 on AVX2). */
AVX2I void a2_decode(const lk_ctx *c, int r, int rend, int n0, int n1)
{
    if (n1 - n0 == 1) a2_decode_n(c, r, rend, n0, 1);
    else a2_decode_n(c, r, rend, n0, n1 - n0);
}

/* Tile kernels (every format): TR weight rows x L activation rows (the re-laid-out tact). Each
 * weight row is unpacked once per call to u8 values and per-block scales (wrow); per block, one
 * broadcast of 4 weight bytes times a vector of 4 bytes of L activation rows adds into one int32
 * lane per pair (AVX2: maddubs summed in int16 while that cannot overflow, then madd; AVX-512:
 * vpdpbusd). The lanes' integer sums are exact; the unsigned offsets are undone exactly (Q4_0:
 * - 8 s; Q8_0 on AVX-512: - 128 s; Q6_K: - 32 s per 16-half) and each lane forms the canonical
 * float64 term of its pair. Q4_1 uses that its products are exact (|isum| < 2^16, |s| < 2^12:
 * d dx isum and m dx s fit in 53 bits), so d * (dx isum) + m * (dx s) in one FMA is the same
 * double as the header's formula, with fewer operations (for finite scales). */
#define TR 8           /* most weight rows per tile */

typedef struct {
    uint8_t *u;           /* (K,) values as u8: n (Q4_0, Q4_1, K-quants), w (Q8_0 AVX2) or w + 128 (Q8_0 AVX-512) */
    double *d, *m;        /* (nb,) d (fp16, exact in double); Q4_1: m */
    double *ksc, *km;     /* (nb,) Q4_K, Q5_K: sc_j and dmin * m_j (exact) */
    int32_t *c0, *c1, *cm;/* (nb,) Q6_K: the scales of the two 16-halves (cm unused) */
    int st;               /* scale b is at [b * st] */
} wrow;

static void *wrows_alloc(wrow *W, int K, int rows)
{
    int nb = K / 32;
    size_t per = (size_t)nb * 44 + (((size_t)K + 7) & ~(size_t)7);
    char *mem = malloc((size_t)rows * per + 64);
    if (!mem) return NULL;
    char *p = mem;
    for (int k = 0; k < rows; k++) {
        W[k].d = (double *)p;
        W[k].m = W[k].d + nb;
        W[k].ksc = W[k].m + nb;
        W[k].km = W[k].ksc + nb;
        W[k].c0 = (int32_t *)(W[k].km + nb);
        W[k].c1 = W[k].c0 + nb;
        W[k].cm = W[k].c1 + nb;
        W[k].u = (uint8_t *)(W[k].cm + nb);
        W[k].st = 1;
        p += per;
    }
    return mem;
}

/* One weight row into W (flip8: Q8_0 as w + 128). */
AVX2I void w_unpack(int T, int flip8, const uint8_t *w, int nb, wrow *W)
{
    const __m256i m4 = _mm256_set1_epi8(15);
    if (T <= T_Q8_0) {
        int bb = block_bytes(T), qoff = T == T_Q4_1 ? 4 : 2;
        for (int b = 0; b < nb; b++) {
            const uint8_t *p = w + (size_t)b * bb;
            W->d[(size_t)(b) * W->st] = h2f(rd16(p));
            W->m[(size_t)(b) * W->st] = T == T_Q4_1 ? h2f(rd16(p + 2)) : 0.0f;
            if (T == T_Q8_0) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(p + 2));
                if (flip8) v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                _mm256_storeu_si256((__m256i *)(W->u + 32 * b), v);
            } else {
                __m128i v = _mm_loadu_si128((const __m128i *)(p + qoff)), m = _mm_set1_epi8(15);
                _mm_storeu_si128((__m128i *)(W->u + 32 * b), _mm_and_si128(v, m));
                _mm_storeu_si128((__m128i *)(W->u + 32 * b + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m));
            }
        }
        return;
    }
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *p = w + (size_t)sb * block_bytes(T);
        uint8_t *u = W->u + 256 * sb;
        int b0 = 8 * sb;
        if (T == T_Q6_K) {
            const int8_t *sc = (const int8_t *)(p + 192);
            float d = h2f(rd16(p + 208));
            for (int j = 0; j < 8; j++) {
                W->d[(size_t)(b0 + j) * W->st] = d;
                W->c0[(size_t)(b0 + j) * W->st] = sc[2 * j];
                W->c1[(size_t)(b0 + j) * W->st] = sc[2 * j + 1];
            }
            for (int h = 0; h < 2; h++) {
                __m256i L0 = _mm256_loadu_si256((const __m256i *)(p + 64 * h));
                __m256i L1 = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32));
                __m256i H = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
                __m256i m30 = _mm256_set1_epi8(0x30);
                __m256i v0 = _mm256_or_si256(_mm256_and_si256(L0, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
                __m256i v1 = _mm256_or_si256(_mm256_and_si256(L1, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
                __m256i v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4), _mm256_and_si256(H, m30));
                __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4),
                                             _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
                _mm256_storeu_si256((__m256i *)(u + 128 * h), v0);
                _mm256_storeu_si256((__m256i *)(u + 128 * h + 32), v1);
                _mm256_storeu_si256((__m256i *)(u + 128 * h + 64), v2);
                _mm256_storeu_si256((__m256i *)(u + 128 * h + 96), v3);
            }
        } else {
            float d = h2f(rd16(p)), dmin = h2f(rd16(p + 2));
            for (int j = 0; j < 8; j++) {
                int sc, m;
                kscale(p + 4, j, &sc, &m);
                W->d[(size_t)(b0 + j) * W->st] = d;
                W->ksc[(size_t)(b0 + j) * W->st] = sc;
                W->km[(size_t)(b0 + j) * W->st] = (double)dmin * m;
            }
            const uint8_t *qs = p + (T == T_Q5_K ? 48 : 16);
            __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16)), x10 = _mm256_set1_epi8(0x10);
            for (int i = 0; i < 4; i++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (T == T_Q5_K) {
                    __m256i bl = _mm256_set1_epi8((char)(1 << (2 * i))), bh = _mm256_set1_epi8((char)(2 << (2 * i)));
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bl), bl), x10));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bh), bh), x10));
                }
                _mm256_storeu_si256((__m256i *)(u + 64 * i), lo);
                _mm256_storeu_si256((__m256i *)(u + 64 * i + 32), hi);
            }
        }
    }
}

/* Row blocks: RB weight rows are unpacked at a time and each activation tile runs against all of
 * them before the next, its results gathered in ob[L][OBS] (activation row j, weight row) and then
 * written out in contiguous runs. */
#define RB 64
#define OBS (RB + TR)

/* Writes ob's activation rows j (n + j < N) for weight rows [r, rend). */
static void tile_flush(const mm_args *a, const double *ob, int L, int n, int r, int rend)
{
    int nn = a->N - n < L ? a->N - n : L, w = rend - r;
    for (int j = 0; j < nn; j++) {
        const double *v = ob + (size_t)j * OBS;
        if (a->f64) {
            memcpy((double *)a->out + (size_t)(n + j) * a->rows + r, v, sizeof(double) * w);
        } else {
            float *o = (float *)a->out + (size_t)(n + j) * a->rows + r;
            for (int i = 0; i < w; i++) o[i] = (float)v[i];
        }
    }
}

/* AVX2 tile: TR weight rows x 8 activation rows (tile g). */
AVX2I void t8_tile(const tact *A, const wrow *W, int T, int R, int g, double *ob)
{
    int nb = A->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256d F[TR][2];
    for (int k = 0; k < R; k++) F[k][0] = F[k][1] = _mm256_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t tb = (size_t)g * nb + b;
        const uint8_t *Q = A->qT + tb * 256;
        __m256i I[TR], J[TR];   /* int32 sums (Q6_K: I of values 0..15, J of 16..31) */
        for (int k = 0; k < R; k++) I[k] = J[k] = _mm256_setzero_si256();
        if (T == T_Q8_0) {
            for (int t = 0; t < 8; t++) {
                __m256i qv = _mm256_loadu_si256((const __m256i *)(Q + 32 * t));
                for (int k = 0; k < R; k++) {
                    __m256i wb = _mm256_set1_epi32((int)rd32(W[k].u + 32 * b + 4 * t));
                    I[k] = _mm256_add_epi32(I[k], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wb),
                                                                                         _mm256_sign_epi8(qv, wb)), ones));
                }
            }
        } else {
            /* int16 lanes sum 2 products per group of 4 values: |n q| <= 15 * 127 (8 groups),
             * 31 * 127 (Q5_K, 4 groups), 63 * 127 (Q6_K, 2 groups) stay below 2^15 */
            const int G = T == T_Q6_K ? 2 : T == T_Q5_K ? 4 : 8;
            for (int t0 = 0; t0 < 8; t0 += G) {
                __m256i H[TR];
                for (int k = 0; k < R; k++) H[k] = _mm256_setzero_si256();
                for (int t = t0; t < t0 + G; t++) {
                    __m256i qv = _mm256_loadu_si256((const __m256i *)(Q + 32 * t));
                    for (int k = 0; k < R; k++)
                        H[k] = _mm256_add_epi16(H[k], _mm256_maddubs_epi16(
                                                          _mm256_set1_epi32((int)rd32(W[k].u + 32 * b + 4 * t)), qv));
                }
                for (int k = 0; k < R; k++) {
                    if (T == T_Q6_K && t0 >= 4) J[k] = _mm256_add_epi32(J[k], _mm256_madd_epi16(H[k], ones));
                    else I[k] = _mm256_add_epi32(I[k], _mm256_madd_epi16(H[k], ones));
                }
            }
        }
        __m256 dx8 = _mm256_loadu_ps(A->dx + tb * 8);
        __m256d dx0 = _mm256_cvtps_pd(_mm256_castps256_ps128(dx8)), dx1 = _mm256_cvtps_pd(_mm256_extractf128_ps(dx8, 1));
        __m256i s8 = _mm256_loadu_si256((const __m256i *)(A->s + tb * 8));
        for (int k = 0; k < R; k++) {
            __m256d d = _mm256_set1_pd(W[k].d[b]), t0, t1;
            if (T == T_Q4_1) {
                __m256d m = _mm256_set1_pd(W[k].m[b]);
                const double *dxs = A->dxs + tb * 8;
                t0 = _mm256_fmadd_pd(d, _mm256_mul_pd(dx0, _mm256_cvtepi32_pd(_mm256_castsi256_si128(I[k]))),
                                     _mm256_mul_pd(m, _mm256_loadu_pd(dxs)));
                t1 = _mm256_fmadd_pd(d, _mm256_mul_pd(dx1, _mm256_cvtepi32_pd(_mm256_extracti128_si256(I[k], 1))),
                                     _mm256_mul_pd(m, _mm256_loadu_pd(dxs + 4)));
            } else {
                __m256i u = I[k];
                if (T == T_Q4_0) u = _mm256_sub_epi32(u, _mm256_slli_epi32(s8, 3));

                if (T == T_Q6_K) {
                    __m256i sa = _mm256_loadu_si256((const __m256i *)(A->sa + tb * 8));
                    __m256i ia = _mm256_sub_epi32(u, _mm256_slli_epi32(sa, 5));
                    __m256i ib = _mm256_sub_epi32(J[k], _mm256_slli_epi32(_mm256_sub_epi32(s8, sa), 5));
                    u = _mm256_add_epi32(_mm256_mullo_epi32(ia, _mm256_set1_epi32(W[k].c0[b])),
                                         _mm256_mullo_epi32(ib, _mm256_set1_epi32(W[k].c1[b])));
                }
                __m256d i0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), i1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1));
                if (T == T_Q4_K || T == T_Q5_K) {   /* sc isum exact in double */
                    __m256d sc = _mm256_set1_pd(W[k].ksc[b]);
                    i0 = _mm256_mul_pd(i0, sc);
                    i1 = _mm256_mul_pd(i1, sc);
                }
                t0 = _mm256_mul_pd(_mm256_mul_pd(d, dx0), i0);
                t1 = _mm256_mul_pd(_mm256_mul_pd(d, dx1), i1);
                if (T == T_Q4_K || T == T_Q5_K) {   /* (dmin dx) (m s) = (dmin m) (dx s): exact (53 bits) */
                    __m256d km = _mm256_set1_pd(W[k].km[b]);
                    const double *dxs = A->dxs + tb * 8;
                    t0 = _mm256_sub_pd(t0, _mm256_mul_pd(km, _mm256_loadu_pd(dxs)));
                    t1 = _mm256_sub_pd(t1, _mm256_mul_pd(km, _mm256_loadu_pd(dxs + 4)));
                }
            }
            F[k][0] = _mm256_add_pd(F[k][0], t0);
            F[k][1] = _mm256_add_pd(F[k][1], t1);
        }
    }
    for (int k = 0; k < R; k++) {
        double v[8];
        _mm256_storeu_pd(v, F[k][0]);
        _mm256_storeu_pd(v + 4, F[k][1]);
        for (int j = 0; j < 8; j++) ob[j * OBS + k] = v[j];
    }
}

/* The row loop every tile kernel shares: unpack RB weight rows (VNNI layout or not), pad a partial
 * tile by repeating its last row, run TILE over R rows at a time for each group of L activation
 * rows, and flush each group's float64 sums. A macro, so that each kernel's copy is compiled for
 * its own target (AVX2 or AVX-512) with its tile function inlined. */
#define TILE_ROWS(a, T, r0, r1, VNNI, L, R, TILE) do {                                          \
    const tact *A_ = (a)->act;                                                                   \
    wrow W[RB];                                                                                  \
    void *mem = wrows_alloc(W, (a)->K, RB);                                                      \
    if (!mem) return -1;                                                                         \
    double ob[(L) * OBS];                                                                        \
    for (int rb = (r0); rb < (r1); rb += RB) {                                                   \
        int re = rb + RB < (r1) ? rb + RB : (r1);                                                \
        for (int i = 0; rb + i < re; i++) {                                                      \
            w_unpack(T, VNNI, (a)->w + (size_t)(rb + i) * (a)->row_bytes, A_->nb, &W[i]);        \
            if (rb + RB + i < (r1)) { /* the next block's row i arrives while these tiles compute */ \
                const uint8_t *nx_ = (a)->w + (size_t)(rb + RB + i) * (a)->row_bytes;            \
                for (size_t o_ = 0; o_ < (a)->row_bytes; o_ += 64) prefetch_line_l2(nx_ + o_);   \
            }                                                                                    \
        }                                                                                        \
        wrow Wt[RB];                                                                             \
        for (int i = 0; i < RB; i++) Wt[i] = W[rb + i < re ? i : re - rb - 1];                   \
        for (int g = 0; g < A_->nt; g++) {                                                       \
            for (int r = rb; r < re; r += (R)) TILE(A_, Wt + (r - rb), T, R, g, ob + (r - rb));   \
            tile_flush(a, ob, L, A_->n0 + (L) * g, rb, re);                                      \
        }                                                                                        \
    }                                                                                            \
    free(mem);                                                                                   \
    return 0;                                                                                    \
} while (0)

/* Rows [r0, r1) against the tiled activation rows, AVX2 tiles. */
AVX2I int t8_run(const mm_args *a, int T, int r0, int r1)
{
    TILE_ROWS(a, T, r0, r1, 0, 8, 4, t8_tile);
}

/* K-quant decode (activation rows <= KDEC_MAX): the roles swap, lanes are 8 weight rows. Their unpacked
 * values are re-laid out like the activation tiles (vector t of block b = bytes 4t..4t+3 of the 8
 * rows' blocks) and their scales put in lane order; one broadcast of 4 activation bytes times that
 * vector adds into one lane per weight row. Same integer sums, same float64 term per lane. */
typedef struct {
    uint8_t *wT;                  /* [nb][8][32] */
    double *d, *m, *ksc, *km;     /* [nb][8] */
    int32_t *c0, *c1, *cm;        /* [nb][8] */
    void *mem;
} kdec;

static int kdec_alloc(kdec *D, int nb)
{
    char *mem = malloc((size_t)nb * (256 + 8 * 32 + 8 * 12) + 64);
    if (!mem) return 0;
    D->mem = mem;
    D->d = (double *)mem;
    D->m = D->d + 8 * (size_t)nb;
    D->ksc = D->m + 8 * (size_t)nb;
    D->km = D->ksc + 8 * (size_t)nb;
    D->c0 = (int32_t *)(D->km + 8 * (size_t)nb);
    D->c1 = D->c0 + 8 * (size_t)nb;
    D->cm = D->c1 + 8 * (size_t)nb;
    D->wT = (uint8_t *)(D->cm + 8 * (size_t)nb);
    return 1;
}

/* Lane k's scales go straight into D (stride 8); values to u[k], transposed by kdec_fill. */
static void kdec_rows(kdec *D, wrow *W, uint8_t *u, int K)
{
    for (int k = 0; k < 8; k++)
        W[k] = (wrow){u + (size_t)k * K, D->d + k, D->m + k, D->ksc + k, D->km + k, D->c0 + k, D->c1 + k, D->cm + k, 8};
}

/* 8 rows' u8 values [8][K] -> wT: per block an 8 x 8 transpose of 4-byte groups. */
AVX2I void kdec_fill(kdec *D, const uint8_t *u, int K)
{
    for (int b = 0; b < K / 32; b++) {
        __m256i r[8], t[8], v[8];
        for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_si256((const __m256i *)(u + (size_t)k * K + 32 * b));
        for (int k = 0; k < 8; k += 2) {
            t[k] = _mm256_unpacklo_epi32(r[k], r[k + 1]);
            t[k + 1] = _mm256_unpackhi_epi32(r[k], r[k + 1]);
        }
        for (int h = 0; h < 8; h += 4) {
            v[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);       /* groups 0 | 4 of rows h..h+3 */
            v[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);   /* 1 | 5 */
            v[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]); /* 2 | 6 */
            v[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]); /* 3 | 7 */
        }
        uint8_t *o = D->wT + (size_t)b * 256;
        for (int g = 0; g < 4; g++) {
            _mm256_storeu_si256((__m256i *)(o + 32 * g), _mm256_permute2x128_si256(v[g], v[g + 4], 0x20));
            _mm256_storeu_si256((__m256i *)(o + 32 * (g + 4)), _mm256_permute2x128_si256(v[g], v[g + 4], 0x31));
        }
    }
}

/* Rows r..r+7 (D) x activation row n; lanes past rend are not stored. */
AVX2I void kdec_row(const mm_args *a, const kdec *D, int T, int r, int rend, int n)
{
    int nb = a->K / 32;
    const int8_t *q = a->q + (size_t)n * a->K;
    const float *dxr = a->dx + (size_t)n * nb;
    const int32_t *sr = a->sx + (size_t)n * nb;
    const __m256i ones = _mm256_set1_epi16(1);
    const int G = T == T_Q6_K ? 2 : T == T_Q5_K ? 4 : 8;
    __m256d F0 = _mm256_setzero_pd(), F1 = _mm256_setzero_pd();
    for (int b = 0; b < nb; b++) {
        const uint8_t *Wv = D->wT + (size_t)b * 256;
        __m256i I = _mm256_setzero_si256(), J = _mm256_setzero_si256();
        for (int t0 = 0; t0 < 8; t0 += G) {
            __m256i H = _mm256_setzero_si256();
            for (int t = t0; t < t0 + G; t++)
                H = _mm256_add_epi16(H, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(Wv + 32 * t)),
                                                             _mm256_set1_epi32((int)rd32((const uint8_t *)q + 32 * b + 4 * t))));
            if (T == T_Q6_K && t0 >= 4) J = _mm256_add_epi32(J, _mm256_madd_epi16(H, ones));
            else I = _mm256_add_epi32(I, _mm256_madd_epi16(H, ones));
        }
        size_t e = (size_t)b * 8;
        float dxf = dxr[b];
        int32_t s = sr[b];
        __m256d dx = _mm256_set1_pd((double)dxf);
        __m256d d0 = _mm256_loadu_pd(D->d + e), d1 = _mm256_loadu_pd(D->d + e + 4), i0, i1, t0, t1;
        if (T == T_Q6_K) {
            int sa = 0;
            for (int k = 0; k < 16; k++) sa += q[32 * b + k];
            __m256i ia = _mm256_sub_epi32(I, _mm256_set1_epi32(32 * sa)), ib = _mm256_sub_epi32(J, _mm256_set1_epi32(32 * (s - sa)));
            __m256i u = _mm256_add_epi32(_mm256_mullo_epi32(ia, _mm256_loadu_si256((const __m256i *)(D->c0 + e))),
                                         _mm256_mullo_epi32(ib, _mm256_loadu_si256((const __m256i *)(D->c1 + e))));
            i0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(u));
            i1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1));
        } else {
            i0 = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(I)), _mm256_loadu_pd(D->ksc + e));
            i1 = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(I, 1)), _mm256_loadu_pd(D->ksc + e + 4));
        }
        t0 = _mm256_mul_pd(_mm256_mul_pd(d0, dx), i0);
        t1 = _mm256_mul_pd(_mm256_mul_pd(d1, dx), i1);
        if (T != T_Q6_K) {   /* (dmin m) (dx s), exact */
            __m256d dxs = _mm256_set1_pd((double)dxf * (double)s);
            t0 = _mm256_sub_pd(t0, _mm256_mul_pd(_mm256_loadu_pd(D->km + e), dxs));
            t1 = _mm256_sub_pd(t1, _mm256_mul_pd(_mm256_loadu_pd(D->km + e + 4), dxs));
        }
        F0 = _mm256_add_pd(F0, t0);
        F1 = _mm256_add_pd(F1, t1);
    }
    double v[8];
    _mm256_storeu_pd(v, F0);
    _mm256_storeu_pd(v + 4, F1);
    lk_store(a, v, 8, r, rend, n);
}

AVX2I int kdec_run(const mm_args *a, int T, int r0, int r1)
{
    int nb = a->K / 32;
    kdec D;
    wrow W[8];
    uint8_t *u = malloc((size_t)8 * a->K + 64);
    if (!u) return -1;
    if (!kdec_alloc(&D, nb)) {
        free(u);
        return -1;
    }
    kdec_rows(&D, W, u, a->K);
    for (int r = r0; r < r1; r += 8) {
        for (int k = 0; k < 8; k++) {
            w_unpack(T, 0, a->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * a->row_bytes, nb, &W[k]);
            if (r + 8 + k < r1) {   /* the next group's row k arrives while this group computes */
                const uint8_t *next = a->w + (size_t)(r + 8 + k) * a->row_bytes;
                for (size_t o = 0; o < a->row_bytes; o += 64) prefetch_line(next + o);
            }
        }
        kdec_fill(&D, u, a->K);
        for (int n = 0; n < a->N; n++) kdec_row(a, &D, T, r, r1, n);
    }
    free(D.mem);
    free(u);
    return 0;
}

AVX2I int simple_avx2(const mm_args *a, int T, int r0, int r1)
{
    lk_ctx c = {a, T, a->K / 32, block_bytes(T), T == T_Q4_1 ? 4 : 2};
    int n0 = a->act ? a->act->n0 : a->N;
    for (int n = 0; n < n0; n += DEC_ROWS)
        for (int r = r0; r < r1; r += 8) a2_decode(&c, r, r1, n, n + DEC_ROWS < n0 ? n + DEC_ROWS : n0);
    return a->act ? t8_run(a, T, r0, r1) : 0;
}

AVX2 static int mm_avx2_q4_0(const mm_args *a, int r0, int r1) { return simple_avx2(a, T_Q4_0, r0, r1); }
AVX2 static int mm_avx2_q4_1(const mm_args *a, int r0, int r1) { return simple_avx2(a, T_Q4_1, r0, r1); }
AVX2 static int mm_avx2_q8_0(const mm_args *a, int r0, int r1) { return simple_avx2(a, T_Q8_0, r0, r1); }
AVX2 static int mm_avx2_q4_k(const mm_args *a, int r0, int r1) { return a->act ? t8_run(a, T_Q4_K, r0, r1) : kdec_run(a, T_Q4_K, r0, r1); }
AVX2 static int mm_avx2_q5_k(const mm_args *a, int r0, int r1) { return a->act ? t8_run(a, T_Q5_K, r0, r1) : kdec_run(a, T_Q5_K, r0, r1); }
AVX2 static int mm_avx2_q6_k(const mm_args *a, int r0, int r1) { return a->act ? t8_run(a, T_Q6_K, r0, r1) : kdec_run(a, T_Q6_K, r0, r1); }
AVX2 static void quant_act_rows_avx2(const float *x, int n0, int n1, int K, int8_t *q, float *d, int32_t *s)
{
    int nb = K / 32;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int n = n0; n < n1; n++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)n * K + 32 * b;
            int8_t *qb = q + (size_t)n * K + 32 * b;
            __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
            __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                      _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float db = _mm_cvtss_f32(m4) / 127.0f;
            d[(size_t)n * nb + b] = db;
            if (db == 0.0f) {
                memset(qb, 0, 32);
                s[(size_t)n * nb + b] = 0;
                continue;
            }
            __m256 vd = _mm256_set1_ps(db);
#define RND(v) _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
            __m256i i0 = RND(v0), i1 = RND(v1), i2 = RND(v2), i3 = RND(v3);
#undef RND
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            s[(size_t)n * nb + b] = hsum_i32(sum);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)qb, p);
        }
    }
}

static int have_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* ------------------------------------------------------------------ AVX-512 VNNI kernels
 * The AVX2 scheme on 512-bit vectors with vpdpbusd (u8 x s8 -> int32, no 16-bit saturation):
 * decode tiles are 16 weight rows x 1 activation row (lane k = row r + k), tiles 8 weight rows (4
 * for Q6_K) x 16 activation rows. Signed weights become unsigned with an exact correction: Q4_0
 * sum(n q) - 8 s, Q8_0 sum((w + 128) q) - 128 s. K-quant decode uses the AVX2 kernel. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define AVX512I static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

AVX512I __m512i a5_quad(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3)
{
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p0));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)p1), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)p2), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)p3), 3);
}

/* Block values 0..15 (lo) and 16..31 (hi) of four rows' blocks as u8, one row per 128-bit lane. */
AVX512I void a5_w(int T, int qoff, const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3,
                  __m512i *lo, __m512i *hi)
{
    if (T == T_Q8_0) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        *lo = _mm512_xor_si512(a5_quad(p0 + 2, p1 + 2, p2 + 2, p3 + 2), flip);
        *hi = _mm512_xor_si512(a5_quad(p0 + 18, p1 + 18, p2 + 18, p3 + 18), flip);
    } else {
        __m512i v = a5_quad(p0 + qoff, p1 + qoff, p2 + qoff, p3 + qoff), m = _mm512_set1_epi8(15);
        *lo = _mm512_and_si512(v, m);
        *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
    }
}

AVX512I __m512i a5_dot(__m512i lo, __m512i hi, const int8_t *q)
{
    __m512i qlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)q));
    __m512i qhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(q + 16)));
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, qlo), hi, qhi);
}

AVX512I __m512i a5_red4(__m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* Undo the unsigned shift: Q4_0 - 8 s, Q8_0 - 128 s (s per lane). */
AVX512I __m512i a5_fix(int T, __m512i u, __m512i s)
{
    if (T == T_Q4_0) return _mm512_sub_epi32(u, _mm512_slli_epi32(s, 3));
    if (T == T_Q8_0) return _mm512_sub_epi32(u, _mm512_slli_epi32(s, 7));
    return u;
}

AVX512I __m512d a5_term(int T, __m512d dw, __m512d dm, __m512d dx, __m512d isum, __m512d s)
{
    __m512d t = _mm512_mul_pd(_mm512_mul_pd(dw, dx), isum);
    if (T == T_Q4_1) t = _mm512_add_pd(t, _mm512_mul_pd(_mm512_mul_pd(dm, dx), s));
    return t;
}

AVX512I __m512d a5_lo_pd(__m512 f) { return _mm512_cvtps_pd(_mm512_castps512_ps256(f)); }
AVX512I __m512d a5_hi_pd(__m512 f)
{
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
}

AVX512I void a5_store(const mm_args *a, __m512d acc0, __m512d acc1, int r, int rend, int n)
{
    if (r + 16 <= rend && a->f64) {
        double *o = (double *)a->out + (size_t)n * a->rows + r;
        _mm512_storeu_pd(o, acc0);
        _mm512_storeu_pd(o + 8, acc1);
    } else if (r + 16 <= rend) {
        float *o = (float *)a->out + (size_t)n * a->rows + r;
        _mm256_storeu_ps(o, _mm512_cvtpd_ps(acc0));
        _mm256_storeu_ps(o + 8, _mm512_cvtpd_ps(acc1));
    } else {
        double v[16];
        _mm512_storeu_pd(v, acc0);
        _mm512_storeu_pd(v + 8, acc1);
        lk_store(a, v, 16, r, rend, n);
    }
}

/* Decode tile: rows r..r+15 (clamped to rend - 1) x activation rows [n0, n1) (at most DEC_ROWS),
 * the weights unpacked once per block for all of them (as a2_decode). */
AVX512I void a5_decode_n(const lk_ctx *c, int r, int rend, int n0, int na)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff;
    size_t bb = (size_t)c->bb;
    const uint8_t *w[16];
    for (int k = 0; k < 16; k++) w[k] = a->w + (size_t)(r + k < rend ? r + k : rend - 1) * a->row_bytes;
    __m512d acc[DEC_ROWS][2];
    for (int j = 0; j < na; j++) acc[j][0] = acc[j][1] = _mm512_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t o = (size_t)b * bb;
        prefetch_next(a, r, 16, rend, b, nb);
        __m512i lo[4], hi[4];
        for (int i = 0; i < 4; i++) a5_w(T, qoff, w[i] + o, w[i + 4] + o, w[i + 8] + o, w[i + 12] + o, &lo[i], &hi[i]);
        __m512i h = _mm512_setr_epi32((int)rd32(w[0] + o), (int)rd32(w[1] + o), (int)rd32(w[2] + o), (int)rd32(w[3] + o),
                                      (int)rd32(w[4] + o), (int)rd32(w[5] + o), (int)rd32(w[6] + o), (int)rd32(w[7] + o),
                                      (int)rd32(w[8] + o), (int)rd32(w[9] + o), (int)rd32(w[10] + o), (int)rd32(w[11] + o),
                                      (int)rd32(w[12] + o), (int)rd32(w[13] + o), (int)rd32(w[14] + o), (int)rd32(w[15] + o));
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)), dm = _mm512_setzero_ps();
        if (T == T_Q4_1) dm = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
        __m512d dw0 = a5_lo_pd(dw), dw1 = a5_hi_pd(dw), dm0 = a5_lo_pd(dm), dm1 = a5_hi_pd(dm);
        for (int j = 0; j < na; j++) {
            size_t n = (size_t)(n0 + j);
            const int8_t *q = a->q + n * a->K + 32 * b;
            __m512i A[4];
            for (int i = 0; i < 4; i++) A[i] = a5_dot(lo[i], hi[i], q);
            int32_t s = a->sx[n * nb + b];
            __m512i u = a5_fix(T, a5_red4(A[0], A[1], A[2], A[3]), _mm512_set1_epi32(s));   /* lane k: row r + k */
            __m512d dxd = _mm512_set1_pd((double)a->dx[n * nb + b]), sd = _mm512_set1_pd((double)s);
            acc[j][0] = _mm512_add_pd(acc[j][0], a5_term(T, dw0, dm0, dxd, _mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), sd));
            acc[j][1] = _mm512_add_pd(acc[j][1], a5_term(T, dw1, dm1, dxd, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1)), sd));
        }
    }
    for (int j = 0; j < na; j++) a5_store(a, acc[j][0], acc[j][1], r, rend, n0 + j);
}

AVX512I void a5_decode(const lk_ctx *c, int r, int rend, int n0, int n1)
{
    if (n1 - n0 == 1) a5_decode_n(c, r, rend, n0, 1);
    else a5_decode_n(c, r, rend, n0, n1 - n0);
}

/* AVX-512 tile: TR weight rows x 16 activation rows (tile g), vpdpbusd into int32 lanes. */
AVX512I void t16_tile(const tact *A, const wrow *W, int T, int R, int g, double *ob)
{
    int nb = A->nb;
    __m512d F[TR][2];
    for (int k = 0; k < R; k++) F[k][0] = F[k][1] = _mm512_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t tb = (size_t)g * nb + b;
        const uint8_t *Q = A->qT + tb * 512;
        __m512i I[TR], J[TR];   /* int32 sums (Q6_K: I of values 0..15, J of 16..31) */
        for (int k = 0; k < R; k++) I[k] = J[k] = _mm512_setzero_si512();
        for (int t = 0; t < 8; t++) {
            __m512i qv = _mm512_loadu_si512((const void *)(Q + 64 * t));
            for (int k = 0; k < R; k++) {
                __m512i wb = _mm512_set1_epi32((int)rd32(W[k].u + 32 * b + 4 * t));
                if (T == T_Q6_K && t >= 4) J[k] = _mm512_dpbusd_epi32(J[k], wb, qv);
                else I[k] = _mm512_dpbusd_epi32(I[k], wb, qv);
            }
        }
        __m512 dx16 = _mm512_loadu_ps(A->dx + tb * 16);
        __m512d dx0 = a5_lo_pd(dx16), dx1 = a5_hi_pd(dx16);
        __m512i s16 = _mm512_loadu_si512((const void *)(A->s + tb * 16));
        for (int k = 0; k < R; k++) {
            __m512d d = _mm512_set1_pd(W[k].d[b]), t0, t1;
            if (T == T_Q4_1) {
                __m512d m = _mm512_set1_pd(W[k].m[b]);
                const double *dxs = A->dxs + tb * 16;
                t0 = _mm512_fmadd_pd(d, _mm512_mul_pd(dx0, _mm512_cvtepi32_pd(_mm512_castsi512_si256(I[k]))),
                                     _mm512_mul_pd(m, _mm512_loadu_pd(dxs)));
                t1 = _mm512_fmadd_pd(d, _mm512_mul_pd(dx1, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(I[k], 1))),
                                     _mm512_mul_pd(m, _mm512_loadu_pd(dxs + 8)));
            } else {
                __m512i u = I[k];
                if (T == T_Q4_0) u = _mm512_sub_epi32(u, _mm512_slli_epi32(s16, 3));
                if (T == T_Q8_0) u = _mm512_sub_epi32(u, _mm512_slli_epi32(s16, 7));

                if (T == T_Q6_K) {
                    __m512i sa = _mm512_loadu_si512((const void *)(A->sa + tb * 16));
                    __m512i ia = _mm512_sub_epi32(u, _mm512_slli_epi32(sa, 5));
                    __m512i ib = _mm512_sub_epi32(J[k], _mm512_slli_epi32(_mm512_sub_epi32(s16, sa), 5));
                    u = _mm512_add_epi32(_mm512_mullo_epi32(ia, _mm512_set1_epi32(W[k].c0[b])),
                                         _mm512_mullo_epi32(ib, _mm512_set1_epi32(W[k].c1[b])));
                }
                __m512d i0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), i1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1));
                if (T == T_Q4_K || T == T_Q5_K) {   /* sc isum exact in double */
                    __m512d sc = _mm512_set1_pd(W[k].ksc[b]);
                    i0 = _mm512_mul_pd(i0, sc);
                    i1 = _mm512_mul_pd(i1, sc);
                }
                t0 = _mm512_mul_pd(_mm512_mul_pd(d, dx0), i0);
                t1 = _mm512_mul_pd(_mm512_mul_pd(d, dx1), i1);
                if (T == T_Q4_K || T == T_Q5_K) {   /* (dmin dx) (m s) = (dmin m) (dx s): exact (53 bits) */
                    __m512d km = _mm512_set1_pd(W[k].km[b]);
                    const double *dxs = A->dxs + tb * 16;
                    t0 = _mm512_sub_pd(t0, _mm512_mul_pd(km, _mm512_loadu_pd(dxs)));
                    t1 = _mm512_sub_pd(t1, _mm512_mul_pd(km, _mm512_loadu_pd(dxs + 8)));
                }
            }
            F[k][0] = _mm512_add_pd(F[k][0], t0);
            F[k][1] = _mm512_add_pd(F[k][1], t1);
        }
    }
    for (int k = 0; k < R; k++) {
        double v[16];
        _mm512_storeu_pd(v, F[k][0]);
        _mm512_storeu_pd(v + 8, F[k][1]);
        for (int j = 0; j < 16; j++) ob[j * OBS + k] = v[j];
    }
}

/* Rows [r0, r1) against the tiled activation rows: 16-row tiles, or the AVX2 8-row ones. */
AVX512I int t16_run(const mm_args *a, int T, int r0, int r1)
{
    if (a->act->L == 8) return t8_run(a, T, r0, r1);   /* K-quants below 12 rows */
    const int R = T == T_Q6_K ? 4 : 8;   /* Q6_K keeps two int accumulators per row: 4 rows fit the registers */
    TILE_ROWS(a, T, r0, r1, 1, 16, R, t16_tile);
}

AVX512I int simple_avx512(const mm_args *a, int T, int r0, int r1)
{
    lk_ctx c = {a, T, a->K / 32, block_bytes(T), T == T_Q4_1 ? 4 : 2};
    int n0 = a->act ? a->act->n0 : a->N;
    for (int n = 0; n < n0; n += DEC_ROWS)
        for (int r = r0; r < r1; r += 16) a5_decode(&c, r, r1, n, n + DEC_ROWS < n0 ? n + DEC_ROWS : n0);
    return a->act ? t16_run(a, T, r0, r1) : 0;
}

AVX512 static int mm_avx512_q4_0(const mm_args *a, int r0, int r1) { return simple_avx512(a, T_Q4_0, r0, r1); }
AVX512 static int mm_avx512_q4_1(const mm_args *a, int r0, int r1) { return simple_avx512(a, T_Q4_1, r0, r1); }
AVX512 static int mm_avx512_q8_0(const mm_args *a, int r0, int r1) { return simple_avx512(a, T_Q8_0, r0, r1); }
AVX512 static int mm_avx512_q4_k(const mm_args *a, int r0, int r1) { return a->act ? t16_run(a, T_Q4_K, r0, r1) : kdec_run(a, T_Q4_K, r0, r1); }
AVX512 static int mm_avx512_q5_k(const mm_args *a, int r0, int r1) { return a->act ? t16_run(a, T_Q5_K, r0, r1) : kdec_run(a, T_Q5_K, r0, r1); }
AVX512 static int mm_avx512_q6_k(const mm_args *a, int r0, int r1) { return a->act ? t16_run(a, T_Q6_K, r0, r1) : kdec_run(a, T_Q6_K, r0, r1); }
static int have_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512vnni");
}
#endif /* SK_X86 */

/* ------------------------------------------------------------------ dispatch */
static struct {
    const char *name;
    int level;            /* 0 generic, 1 AVX2, 2 AVX-512 VNNI */
    mm_fn mm[T_MAX];
    qa_fn qa;
} K_ = {"generic", 0, {0}, quant_act_rows_generic};

/* level: 0 generic, 1 AVX2 at most, 2 AVX-512 VNNI at most (what the CPU has). */
static void select_kernels(int level)
{
    static const int types[] = {T_Q4_0, T_Q4_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K};
    K_.name = "generic";
    K_.level = 0;
    K_.qa = quant_act_rows_generic;
    for (int i = 0; i < 6; i++) K_.mm[types[i]] = mm_generic;
#ifdef SK_X86
    if (level >= 1 && have_avx2()) {
        K_.name = "avx2";
        K_.level = 1;
        K_.qa = quant_act_rows_avx2;
        K_.mm[T_Q4_0] = mm_avx2_q4_0;
        K_.mm[T_Q4_1] = mm_avx2_q4_1;
        K_.mm[T_Q8_0] = mm_avx2_q8_0;
        K_.mm[T_Q4_K] = mm_avx2_q4_k;
        K_.mm[T_Q5_K] = mm_avx2_q5_k;
        K_.mm[T_Q6_K] = mm_avx2_q6_k;
        if (level >= 2 && have_avx512()) {
            K_.name = "avx512";
            K_.level = 2;
            K_.mm[T_Q4_0] = mm_avx512_q4_0;
            K_.mm[T_Q4_1] = mm_avx512_q4_1;
            K_.mm[T_Q8_0] = mm_avx512_q8_0;
            K_.mm[T_Q4_K] = mm_avx512_q4_k;
            K_.mm[T_Q5_K] = mm_avx512_q5_k;
            K_.mm[T_Q6_K] = mm_avx512_q6_k;
        }
    }
#else
    (void)level;
#endif
}

/* Which activation rows go to the tile kernels: rows [*n0, N) in tiles of *L (0: none). Q4_0, Q4_1
 * and Q8_0 run up to DEC_MAX_AVX2 (8) or DEC_MAX_AVX512 (24) rows in their decode tiles, which
 * unpack each weight block once for up to DEC_ROWS (16) of them, and a tiled call's remainder of
 * 1..3 rows too; more rows go to 8-row (AVX2) or 16-row (AVX-512) tiles. Measured on AVX-512,
 * SmolLM2's MLP, 30 layers, 1 thread: 8 rows 10.9-12.6 ms decoded against 20-25 in 8-row tiles,
 * 16 rows 17.6-22 against 24-34 in a 16-row tile; 20 rows 23.5-26.5 against 29.6-30.6, 24 rows
 * 28.4-29.2 against 30.1-31.2, 28 rows level. On AVX2 the 8-row tile ties with the decode tile
 * from 8 rows on.
 * The K-quants run their decode kernel (kdec: 8 weight rows unpacked once, then each activation
 * row) up to KDEC_MAX rows, else tile every row (8-row tiles below 12 rows on AVX-512): a 1536 x
 * 1024 Q4_K, Q5_K or Q6_K took ~32 µs more per decoded row from 137-154 µs at 1 row, against a
 * flat 325-397 for 4-16 rows in tiles on AVX-512 (333-354 for 4-8 in one 8-row tile on AVX2). */
#define DEC_MAX_AVX2 8           /* Q4_0, Q4_1, Q8_0 calls of up to this many rows: decode tiles */
#define DEC_MAX_AVX512 24        /* in chunks of DEC_ROWS */
#define KDEC_MAX 6               /* K-quant calls of up to this many rows run kdec (tile_plan) */
static void tile_plan(int T, int N, int *L, int *n0)
{
    *L = 0;
    *n0 = N;
    if (!K_.level) return;
    if (T <= T_Q8_0) {
        int l = K_.level == 2 ? 16 : 8;
        if (N <= (K_.level == 2 ? DEC_MAX_AVX512 : DEC_MAX_AVX2)) return;
        *L = l;
        *n0 = N % l < 4 ? N % l : 0;
    } else if (N > KDEC_MAX) {
        *L = K_.level == 2 && N >= 12 ? 16 : 8;
        *n0 = 0;
    }
}

/* One matmul call's work: phase 1 quantizes activation rows (if x) and lays out the tiles, in
 * units; phase 2, once every unit is done, runs the kernel over chunks of weight rows. Threads
 * take units and chunks from atomic counters (no fixed split: a thread the OS descheduled holds
 * nothing up). */
typedef struct {
    mm_args *a;
    tact *act;
    const float *x;
    mm_fn fn;
    qa_fn qa;
    int units, unit_rows, chunks, chunk_rows;
    int next_unit, next_chunk, units_done, err;
    sk_task task;         /* or, instead of a matmul, parts 0..chunks-1 of a task (sk_parallel) */
    void *ctx;
} job_t;

static void job_unit(job_t *j, int u)
{
    mm_args *a = j->a;
    int n0 = j->act ? j->act->n0 : a->N, s, e;
    if (u == 0) {
        s = 0;
        e = n0;
    } else {
        s = n0 + (u - 1) * j->unit_rows;
        e = s + j->unit_rows < a->N ? s + j->unit_rows : a->N;
    }
    if (j->x && e > s) j->qa(j->x, s, e, a->K, (int8_t *)a->q, (float *)a->dx, (int32_t *)a->sx);
    if (j->act && e > s && u > 0) tact_fill(j->act, a, s - n0, e - n0);
}

static int job_chunks(job_t *j)
{
    int ran = 0;
    for (;; ran++) {
        int c = __atomic_fetch_add(&j->next_chunk, 1, __ATOMIC_RELAXED);
        if (c >= j->chunks) break;
        if (j->task) {
            if (j->task(j->ctx, c)) __atomic_store_n(&j->err, 1, __ATOMIC_RELAXED);
            continue;
        }
        int r0 = c * j->chunk_rows, r1 = r0 + j->chunk_rows < j->a->rows ? r0 + j->chunk_rows : j->a->rows;
        if (j->fn(j->a, r0, r1)) __atomic_store_n(&j->err, 1, __ATOMIC_RELAXED);
    }
    return ran;
}

#ifdef SK_THREADS
#include <sched.h>
#include <time.h>

static inline void cpu_relax(void)
{
#ifdef SK_X86
    _mm_pause();
#endif
}

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

/* Wait until *v == want: spin a little, then yield the core (a peer the OS descheduled). */
static void wait_eq(int *v, int want)
{
    for (int i = 0; __atomic_load_n(v, __ATOMIC_ACQUIRE) != want; i++) {
        if (i < 256) cpu_relax();
        else sched_yield();
    }
}

static int job_run(job_t *j)
{
    for (;;) {
        int u = __atomic_fetch_add(&j->next_unit, 1, __ATOMIC_RELAXED);
        if (u >= j->units) break;
        job_unit(j, u);
        __atomic_fetch_add(&j->units_done, 1, __ATOMIC_ACQ_REL);
    }
    wait_eq(&j->units_done, j->units);
    return job_chunks(j);
}

/* The persistent workers of this process: started on the first call that asks for threads, kept
 * for the next ones. A worker that finds no new job spins for up to POOL_SPIN_US (a decode step
 * calls the kernels every few tens of µs; past POOL_PAUSE_US it yields the core at each turn, so
 * on a busy machine it does not keep the caller from running), then blocks on a condition variable: an idle server
 * burns no core. A job is open while its caller works on it; a worker enters it (refs) only while
 * it is open, and the caller, once every unit and chunk is taken and its own are done, closes it
 * and waits only for the workers inside (so never for one still asleep). One call at a time uses
 * the pool (`busy`); a concurrent caller runs alone. A forked child starts with no workers. */
#define POOL_SPIN_US 200.0
#define POOL_PAUSE_US 20.0   /* then spin with sched_yield */
#define MAX_THREADS 64
#define POOL_OPEN 256u

static struct {
    pthread_mutex_t mu, busy;
    pthread_cond_t cv;
    int started;          /* workers started */
    unsigned gen;         /* job counter << 9 | POOL_OPEN while open | helper count (workers 0..count-1) */
    int refs;             /* workers inside the current job */
    int sleeping;         /* workers blocked on cv */
    job_t *job;
    long long jobs, joined, chunks;   /* counters for pool_stats(): jobs, workers entering them, chunks they ran */
} P_ = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Spin until P_.gen differs from `seen`, then block; returns the new value. */
static unsigned pool_next(unsigned seen)
{
    unsigned g;
    double t0 = now_us();
    int yielding = 0;
    for (int i = 0; (g = __atomic_load_n(&P_.gen, __ATOMIC_ACQUIRE)) == seen; i++) {
        if (yielding) sched_yield();   /* a thread waiting for this core (the caller?) runs first */
        else cpu_relax();
        if ((i & 63) != 63 && !yielding) continue;
        double dt = now_us() - t0;
        yielding = dt > POOL_PAUSE_US;
        if (dt > POOL_SPIN_US) {
            pthread_mutex_lock(&P_.mu);
            __atomic_fetch_add(&P_.sleeping, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&P_.gen, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&P_.cv, &P_.mu);
            __atomic_fetch_sub(&P_.sleeping, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&P_.mu);
            t0 = now_us();
        }
    }
    return g;
}

static void *pool_worker(void *arg)
{
    int me = (int)(intptr_t)arg;
    unsigned g = __atomic_load_n(&P_.gen, __ATOMIC_ACQUIRE);
    for (;;) {
        g = pool_next(g);
        if (!(g & POOL_OPEN) || me >= (int)(g & 255)) continue;
        __atomic_fetch_add(&P_.refs, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&P_.gen, __ATOMIC_SEQ_CST) == g) {   /* still open: the caller waits for us */
            int ran = job_run(P_.job);
            __atomic_fetch_add(&P_.joined, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&P_.chunks, ran, __ATOMIC_RELAXED);
        }
        __atomic_fetch_sub(&P_.refs, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void pool_atfork_child(void)
{
    pthread_mutex_init(&P_.mu, NULL);
    pthread_mutex_init(&P_.busy, NULL);
    pthread_cond_init(&P_.cv, NULL);
    P_.started = P_.sleeping = P_.refs = 0;
    P_.jobs = P_.joined = P_.chunks = 0;
}

/* Run j on the calling thread and up to `helpers` pool workers; alone when the pool is busy. */
static void pool_run(job_t *j, int helpers)
{
    static int atfork_set;
    if (pthread_mutex_trylock(&P_.busy)) {
        job_run(j);
        return;
    }
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, pool_atfork_child);
        atfork_set = 1;
    }
    while (P_.started < helpers) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &at, pool_worker, (void *)(intptr_t)P_.started);
        pthread_attr_destroy(&at);
        if (rc) break;   /* fewer threads: still correct */
        P_.started++;
    }
    if (helpers > P_.started) helpers = P_.started;
    P_.jobs++;
    unsigned next = ((P_.gen >> 9) + 1) << 9 | (unsigned)helpers;
    P_.job = j;
    __atomic_store_n(&P_.gen, next | POOL_OPEN, __ATOMIC_SEQ_CST);
    if (helpers && __atomic_load_n(&P_.sleeping, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&P_.mu);
        pthread_cond_broadcast(&P_.cv);
        pthread_mutex_unlock(&P_.mu);
    }
    job_run(j);   /* returns once every unit and chunk is taken and its own are done */
    __atomic_store_n(&P_.gen, next, __ATOMIC_SEQ_CST);
    wait_eq(&P_.refs, 0);
    pthread_mutex_unlock(&P_.busy);
}
#else
#define MAX_THREADS 1
#endif

#ifndef RB
#define RB 64
#endif

/* task(ctx, part) for parts 0..parts-1 on the calling thread and up to threads - 1 pool workers,
 * which take parts from an atomic counter (so a descheduled thread holds nothing up): -1 if a part
 * failed. The workers are the matmuls' (no thread is started per call); when the pool is busy
 * (another thread's call) the caller runs every part itself. */
int sk_parallel(sk_task task, void *ctx, int parts, int threads)
{
    job_t j = {.task = task, .ctx = ctx, .chunks = parts};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > parts) threads = parts;
#ifdef SK_THREADS
    if (threads > 1) {
        pool_run(&j, threads - 1);
        return j.err ? -1 : 0;
    }
#endif
    job_chunks(&j);
    return j.err ? -1 : 0;
}

/* Below this many multiply-adds (or 64 weight rows) a call stays on the calling thread: handing
 * a share to a spinning worker costs ~1 µs, to a sleeping one ~20-50 µs. */
#define MIN_THREAD_WORK (256u << 10)

/* Quantize x (if given) into a->q/dx/sx, then run the kernel, on up to `threads` threads (each
 * output is computed by one thread in the canonical way: the split does not change any bit).
 * 0, or -1 when out of memory. */
static int run_matmul(mm_args *a, const float *x, int threads)
{
    int L, n0;
    tact act;
    tile_plan(a->type, a->N, &L, &n0);
    a->act = NULL;
    if (L) {
        if (!tact_alloc(&act, L, n0, a->N, a->K / 32)) return -1;
        a->act = &act;
    }
    job_t j = {.a = a, .act = L ? &act : NULL, .x = x, .fn = K_.mm[a->type], .qa = K_.qa};
    if ((double)a->rows * a->K * (a->N ? a->N : 1) < MIN_THREAD_WORK || a->rows < 64) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        if (x) K_.qa(x, 0, a->N, a->K, (int8_t *)a->q, (float *)a->dx, (int32_t *)a->sx);
        if (L) tact_fill(&act, a, 0, a->N - n0);
        j.err = j.fn(a, 0, a->rows);
    } else {
#ifdef SK_THREADS
        j.unit_rows = L ? L : 16;
        j.units = 1 + (a->N - n0 + j.unit_rows - 1) / j.unit_rows;
        /* tile kernels: one row block per chunk; else about 4 chunks per thread, multiples of 16 rows */
        j.chunk_rows = L ? RB : (a->rows / (4 * threads) + 15) & ~15;
        if (j.chunk_rows < 16) j.chunk_rows = 16;
        j.chunks = (a->rows + j.chunk_rows - 1) / j.chunk_rows;
        pool_run(&j, threads - 1);
#endif
    }
    if (L) free(act.mem);
    return j.err ? -1 : 0;
}
/* ------------------------------------------------------------------ Python glue */
static int get_buf(PyObject *o, Py_buffer *v, int writable, Py_ssize_t need, const char *what)
{
    if (PyObject_GetBuffer(o, v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    if (v->len != need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, v->len, need);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static int get_ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const int *idx, int n, long long *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[idx[i]]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static int check_shape(int t, long long rows, long long cols, long long n)
{
    if (t < 0 || t >= T_MAX || !block_bytes(t)) {
        PyErr_Format(PyExc_ValueError, "unsupported ggml type %d", t);
        return -1;
    }
    if (rows < 0 || n < 0 || cols <= 0 || cols % block_values(t) || rows > INT32_MAX || n > INT32_MAX
        || cols > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "bad shape rows=%lld cols=%lld n=%lld", rows, cols, n);
        return -1;
    }
    return 0;
}

#define ACT_BYTES(n, k) ((size_t)(n) * (size_t)(k) + (size_t)(n) * (size_t)((k) / 32) * 8)
#define STACK_SCRATCH 32768

/* mm(type, w_ptr, rows, cols, x, out, n, f64, threads): x float32 (n, cols) -> out (n, rows). */
static PyObject *py_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {0, 1, 2, 3, 6, 7, 8};
    long long v[7];
    if (get_ints(args, nargs, 9, idx, 7, v) < 0 || check_shape((int)v[0], v[2], v[3], v[4]) < 0) return NULL;
    long long rows = v[2], K = v[3], N = v[4];
    Py_buffer xb, ob;
    if (get_buf(args[4], &xb, 0, (Py_ssize_t)(N * K * 4), "x") < 0) return NULL;
    if (get_buf(args[5], &ob, 1, (Py_ssize_t)(N * rows * (v[5] ? 8 : 4)), "out") < 0) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    mm_args a = {(int)v[0], (int)rows, (int)K, (int)N, (int)v[5], (size_t)(K / block_values((int)v[0]) * block_bytes((int)v[0])),
                 (const uint8_t *)PyLong_AsVoidPtr(args[1]), NULL, NULL, NULL, ob.buf, NULL};
    size_t need = ACT_BYTES(N, K);
    _Alignas(64) char stack[STACK_SCRATCH];
    char *scratch = need <= sizeof stack ? stack : malloc(need);
    if (!scratch) {
        PyBuffer_Release(&xb);
        PyBuffer_Release(&ob);
        return PyErr_NoMemory();
    }
    a.dx = (const float *)scratch;
    a.sx = (const int32_t *)(scratch + (size_t)N * (K / 32) * 4);
    a.q = (const int8_t *)(scratch + (size_t)N * (K / 32) * 8);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_matmul(&a, (const float *)xb.buf, (int)v[6]);
    Py_END_ALLOW_THREADS
    if (scratch != stack) free(scratch);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* mmq(type, w_ptr, rows, cols, q, d, s, out, n, f64, threads): quantized activations. */
static PyObject *py_mmq(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {0, 1, 2, 3, 8, 9, 10};
    long long v[7];
    if (get_ints(args, nargs, 11, idx, 7, v) < 0 || check_shape((int)v[0], v[2], v[3], v[4]) < 0) return NULL;
    long long rows = v[2], K = v[3], N = v[4];
    Py_buffer qb, db, sb, ob;
    if (get_buf(args[4], &qb, 0, (Py_ssize_t)(N * K), "q") < 0) return NULL;
    if (get_buf(args[5], &db, 0, (Py_ssize_t)(N * (K / 32) * 4), "d") < 0) goto e1;
    if (get_buf(args[6], &sb, 0, (Py_ssize_t)(N * (K / 32) * 4), "s") < 0) goto e2;
    if (get_buf(args[7], &ob, 1, (Py_ssize_t)(N * rows * (v[5] ? 8 : 4)), "out") < 0) goto e3;
    mm_args a = {(int)v[0], (int)rows, (int)K, (int)N, (int)v[5], (size_t)(K / block_values((int)v[0]) * block_bytes((int)v[0])),
                 (const uint8_t *)PyLong_AsVoidPtr(args[1]), qb.buf, db.buf, sb.buf, ob.buf, NULL};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_matmul(&a, NULL, (int)v[6]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&db);
    PyBuffer_Release(&qb);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
e3:
    PyBuffer_Release(&sb);
e2:
    PyBuffer_Release(&db);
e1:
    PyBuffer_Release(&qb);
    return NULL;
}

/* quantize_act(x, q, d, s, n, k) */
static PyObject *py_quantize_act(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {4, 5};
    long long v[2];
    if (get_ints(args, nargs, 6, idx, 2, v) < 0) return NULL;
    long long N = v[0], K = v[1];
    if (N < 0 || K <= 0 || K % 32 || N > INT32_MAX || K > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad activation shape");
        return NULL;
    }
    Py_buffer xb, qb, db, sb;
    if (get_buf(args[0], &xb, 0, (Py_ssize_t)(N * K * 4), "x") < 0) return NULL;
    if (get_buf(args[1], &qb, 1, (Py_ssize_t)(N * K), "q") < 0) goto e1;
    if (get_buf(args[2], &db, 1, (Py_ssize_t)(N * (K / 32) * 4), "d") < 0) goto e2;
    if (get_buf(args[3], &sb, 1, (Py_ssize_t)(N * (K / 32) * 4), "s") < 0) goto e3;
    Py_BEGIN_ALLOW_THREADS
    K_.qa(xb.buf, 0, (int)N, (int)K, qb.buf, db.buf, sb.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&sb);
    PyBuffer_Release(&db);
    PyBuffer_Release(&qb);
    PyBuffer_Release(&xb);
    Py_RETURN_NONE;
e3:
    PyBuffer_Release(&db);
e2:
    PyBuffer_Release(&qb);
e1:
    PyBuffer_Release(&xb);
    return NULL;
}

/* dequantize(type, data, out, rows, cols) */
static PyObject *py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {0, 3, 4};
    long long v[3];
    if (get_ints(args, nargs, 5, idx, 3, v) < 0 || check_shape((int)v[0], v[1], v[2], 0) < 0) return NULL;
    int t = (int)v[0];
    long long nblk = v[1] * (v[2] / block_values(t));
    Py_buffer ib, ob;
    if (get_buf(args[1], &ib, 0, (Py_ssize_t)(nblk * block_bytes(t)), "data") < 0) return NULL;
    if (get_buf(args[2], &ob, 1, (Py_ssize_t)(v[1] * v[2] * 4), "out") < 0) {
        PyBuffer_Release(&ib);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < nblk; i++)
        deq_block(t, (const uint8_t *)ib.buf + i * block_bytes(t), (float *)ob.buf + i * block_values(t));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ib);
    PyBuffer_Release(&ob);
    Py_RETURN_NONE;
}

/* quantize_q8_0(x, out, nvalues): gguf-py's rounding (half away from zero of x * (1/d)). */
static PyObject *py_quantize_q8_0(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {2};
    long long nv;
    if (get_ints(args, nargs, 3, idx, 1, &nv) < 0) return NULL;
    if (nv < 0 || nv % 32) {
        PyErr_SetString(PyExc_ValueError, "value count must be a multiple of 32");
        return NULL;
    }
    Py_buffer ib, ob;
    if (get_buf(args[0], &ib, 0, (Py_ssize_t)(nv * 4), "x") < 0) return NULL;
    if (get_buf(args[1], &ob, 1, (Py_ssize_t)(nv / 32 * 34), "out") < 0) {
        PyBuffer_Release(&ib);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *x = ib.buf;
    uint8_t *o = ob.buf;
    for (long long b = 0; b < nv / 32; b++, x += 32, o += 34) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(x[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
        uint16_t h = f2h(d);
        memcpy(o, &h, 2);
        for (int i = 0; i < 32; i++) o[2 + i] = (uint8_t)(int8_t)(int)roundf(x[i] * id);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ib);
    PyBuffer_Release(&ob);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ silu (sk_expf: _qkernels.h) */
/* g = silu(g) * u = g / (1 + e^-g) * u, one rounding per operation. GCC vectorizes the loop
 * only if it may evaluate both sides of the clamps: setup.py builds with -fno-trapping-math
 * (floating-point exception flags may differ, never a value). On x86-64 Linux it is compiled
 * for AVX-512, AVX2 and the baseline and picked at load time: the vector width changes, the
 * operations (no FMA: -ffp-contract=off) and so the bits do not. */
#if defined(SK_X86) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void silu_mul_f32(float *restrict g, const float *restrict u, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float t = sk_expf(-g[i]) + 1.0f;
        g[i] = g[i] / t * u[i];
    }
}

/* ------------------------------------------------------------------ one MLP slice
 * partial(x) = down[:, r] @ (silu(gate[r] @ x) * (up[r] @ x)) for neurons r of one layer, x (N, H)
 * float32 -> out (N, H) float64: x quantized once for gate and up, silu(g) * u in float32 as
 * g / (1 + sk_expf(-g)) * u (one rounding per operation), the product quantized again for down.
 * Every caller (the server's own ranges, a node's Python path, a node's link loop) runs this one
 * function, so a range's partial has the same bits wherever it is computed (and, with sk_expf,
 * on whatever CPU). */
int sk_qmlp(const sk_qslice *s, const float *x, int N, double *out, int threads)
{
    int H = s->H, n = s->n;
    if (N <= 0) return 0;
    if (n <= 0) {
        memset(out, 0, (size_t)N * H * sizeof(double));
        return 0;
    }
    size_t act = ACT_BYTES(N, H), gu = (size_t)N * n * sizeof(float), dact = ACT_BYTES(N, n);
    size_t need = act + 2 * gu + dact + 8 * 64;   /* + each piece rounded up to 64 bytes */
    _Alignas(64) char stack[STACK_SCRATCH];
    char *mem = need <= sizeof stack ? stack : malloc(need), *p = mem;
    if (!mem) return -1;
#define TAKE(bytes) (p += ((bytes) + 63) & ~(size_t)63, p - (((bytes) + 63) & ~(size_t)63))
    int nb = H / 32;
    float *dx = (float *)TAKE((size_t)N * nb * 4);
    int32_t *sx = (int32_t *)TAKE((size_t)N * nb * 4);
    int8_t *q = (int8_t *)TAKE((size_t)N * H);
    float *g = (float *)TAKE(gu), *u = (float *)TAKE(gu);
    char *dscratch = TAKE(dact);
#undef TAKE
    K_.qa(x, 0, N, H, q, dx, sx);
    mm_args a = {s->gt, n, H, N, 0, (size_t)(H / block_values(s->gt) * block_bytes(s->gt)), s->gate, q, dx, sx, g, NULL};
    int rc = run_matmul(&a, NULL, threads);
    mm_args b = {s->ut, n, H, N, 0, (size_t)(H / block_values(s->ut) * block_bytes(s->ut)), s->up, q, dx, sx, u, NULL};
    if (!rc) rc = run_matmul(&b, NULL, threads);
    if (!rc) {
        silu_mul_f32(g, u, (size_t)N * n);
        int dnb = n / 32;
        mm_args c = {s->dt, H, n, N, 1, (size_t)(n / block_values(s->dt) * block_bytes(s->dt)), s->down,
                     (const int8_t *)(dscratch + (size_t)N * dnb * 8), (const float *)dscratch,
                     (const int32_t *)(dscratch + (size_t)N * dnb * 4), out, NULL};
        rc = run_matmul(&c, g, threads);
    }
    if (mem != stack) free(mem);
    return rc;
}

/* qmlp(x, out, N, H, n, gate_ptr, gt, up_ptr, ut, down_ptr, dt, threads): sk_qmlp for Python. */
static PyObject *py_qmlp(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    long long v[10];
    if (get_ints(args, nargs, 12, idx, 10, v) < 0) return NULL;
    long long N = v[0], H = v[1], n = v[2];
    if (check_shape((int)v[4], n, H, N) < 0 || check_shape((int)v[6], n, H, N) < 0
        || check_shape((int)v[8], H, n ? n : block_values((int)v[8]), N) < 0) return NULL;
    if (n % block_values((int)v[8])) {
        PyErr_Format(PyExc_ValueError, "%lld neurons: not whole blocks of down's type", n);
        return NULL;
    }
    sk_qslice sl = {(int)v[4], (int)v[6], (int)v[8], (int)n, (int)H, (const uint8_t *)(uintptr_t)v[3],
                    (const uint8_t *)(uintptr_t)v[5], (const uint8_t *)(uintptr_t)v[7]};
    Py_buffer xb, ob;
    if (get_buf(args[0], &xb, 0, (Py_ssize_t)(N * H * 4), "x") < 0) return NULL;
    if (get_buf(args[1], &ob, 1, (Py_ssize_t)(N * H * 8), "out") < 0) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sk_qmlp(&sl, xb.buf, (int)N, ob.buf, (int)v[9]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* silu_mul(g, u, n): g = silu(g) * u in place, float32, as sk_qmlp computes it (tests). */
static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const int idx[] = {2};
    long long n;
    if (get_ints(args, nargs, 3, idx, 1, &n) < 0) return NULL;
    Py_buffer gb, ub;
    if (get_buf(args[0], &gb, 1, (Py_ssize_t)(n * 4), "g") < 0) return NULL;
    if (get_buf(args[1], &ub, 0, (Py_ssize_t)(n * 4), "u") < 0) {
        PyBuffer_Release(&gb);
        return NULL;
    }
    silu_mul_f32(gb.buf, ub.buf, (size_t)n);
    PyBuffer_Release(&ub);
    PyBuffer_Release(&gb);
    Py_RETURN_NONE;
}

/* pool_stats() -> (workers, jobs, joined, chunks): how much the persistent workers took part. */
static PyObject *py_pool_stats(PyObject *self, PyObject *unused)
{
#ifdef SK_THREADS
    return Py_BuildValue("(iLLL)", P_.started, P_.jobs, __atomic_load_n(&P_.joined, __ATOMIC_RELAXED),
                         __atomic_load_n(&P_.chunks, __ATOMIC_RELAXED));
#else
    return Py_BuildValue("(iLLL)", 0, 0LL, 0LL, 0LL);
#endif
}

static PyObject *py_kernel_name(PyObject *self, PyObject *unused) { return PyUnicode_FromString(K_.name); }

int sk_kernel_level(void) { return K_.level; }

/* "generic" 0, "avx2" 1, "avx512" or "auto" 2; -1 otherwise. */
static int kernel_level(const char *s)
{
    if (!strcmp(s, "generic")) return 0;
    if (!strcmp(s, "avx2")) return 1;
    if (!strcmp(s, "avx512") || !strcmp(s, "auto")) return 2;
    return -1;
}

/* set_kernel(name): "generic", "avx2", "avx512" (each at most: what the CPU has) or "auto";
 * returns the name now in use (tests and benchmarks). */
static PyObject *py_set_kernel(PyObject *self, PyObject *arg)
{
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    int level = kernel_level(s);
    if (level < 0) {
        PyErr_Format(PyExc_ValueError, "unknown kernel %R", arg);
        return NULL;
    }
    select_kernels(level);
    return PyUnicode_FromString(K_.name);
}

static PyMethodDef methods[] = {
    {"mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL, "mm(type, w_ptr, rows, cols, x, out, n, f64, threads)"},
    {"mmq", (PyCFunction)(void (*)(void))py_mmq, METH_FASTCALL,
     "mmq(type, w_ptr, rows, cols, q, d, s, out, n, f64, threads)"},
    {"quantize_act", (PyCFunction)(void (*)(void))py_quantize_act, METH_FASTCALL, "quantize_act(x, q, d, s, n, k)"},
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL, "dequantize(type, data, out, rows, cols)"},
    {"quantize_q8_0", (PyCFunction)(void (*)(void))py_quantize_q8_0, METH_FASTCALL, "quantize_q8_0(x, out, nvalues)"},
    {"qmlp", (PyCFunction)(void (*)(void))py_qmlp, METH_FASTCALL,
     "qmlp(x, out, N, H, n, gate_ptr, gt, up_ptr, ut, down_ptr, dt, threads): one MLP slice, float64 out"},
    {"link_serve", (PyCFunction)(void (*)(void))sk_py_link_serve, METH_FASTCALL, SK_LINK_SERVE_DOC},
    {"link_send", (PyCFunction)(void (*)(void))sk_py_link_send, METH_FASTCALL, "link_send(fd, head, x, timeout_s) -> None or why"},
    {"link_gather", (PyCFunction)(void (*)(void))sk_py_link_gather, METH_FASTCALL,
     "link_gather(fds, bufs, pos, subs, status, t, out, step, epoch, layer, N, H, version, f64, max_frame,"
     " timeout_s, spin_s) -> errors: see _link.c"},
    {"link_call", (PyCFunction)(void (*)(void))sk_py_link_call, METH_FASTCALL,
     "link_call(fds, bufs, conns, subs, status, t, out, heads, x, y, step, epoch, layer, N, H, version, f64,"
     " max_frame, send_timeout_s, wait_timeout_s, spin_s) -> None (y is the sum) or errors: see _link.c"},
    {"rmsnorm", (PyCFunction)(void (*)(void))sk_py_rmsnorm, METH_FASTCALL, "rmsnorm(x, w, out, N, H, eps): see _attn.c"},
    {"attn_rows", (PyCFunction)(void (*)(void))sk_py_attn_rows, METH_FASTCALL,
     "attn_rows(h, att, rows, cos, sin, layer, layers, nh, kvh, D, scale, threads): see _attn.c"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, "silu_mul(g, u, n): g = silu(g) * u in place"},
    {"kernel_name", py_kernel_name, METH_NOARGS, "the kernel set in use"},
    {"pool_stats", py_pool_stats, METH_NOARGS, "(workers, jobs, joined, chunks) of the persistent workers"},
    {"set_kernel", py_set_kernel, METH_O, "set_kernel('generic' | 'avx2' | 'avx512' | 'auto')"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", "GGML block matmul kernels", -1, methods};

PyMODINIT_FUNC PyInit__qkernels(void)
{
    const char *env = getenv("SKYNET_KERNEL");
    int level = env && *env ? kernel_level(env) : 2;
    select_kernels(level < 0 ? 2 : level);
    return PyModule_Create(&module);
}

