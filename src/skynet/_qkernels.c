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
 * float64 lane and run exactly the scalar operations in that lane.
 *
 * Build with -ffp-contract=off: neither the reference dequantizers nor the terms may fuse a*b+c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
#include <immintrin.h>
#endif
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
typedef struct {
    int type, rows, K, N, f64;
    size_t row_bytes;
    const uint8_t *w;
    const int8_t *q;      /* (N, K) */
    const float *dx;      /* (N, K/32) */
    const int32_t *sx;    /* (N, K/32) */
    void *out;            /* (N, rows) float32 or float64 */
} mm_args;

typedef void (*mm_fn)(const mm_args *a, int r0, int r1);
typedef void (*qa_fn)(const float *x, int n0, int n1, int K, int8_t *q, float *d, int32_t *s);

static inline void store(const mm_args *a, int n, int r, double v)
{
    if (a->f64) ((double *)a->out)[(size_t)n * a->rows + r] = v;
    else ((float *)a->out)[(size_t)n * a->rows + r] = (float)v;
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

static void mm_generic(const mm_args *a, int r0, int r1)
{
    int t = a->type, K = a->K, nb = K / 32;
    void *mem = malloc((size_t)K + (size_t)nb * 20);
    if (!mem) return;   /* the caller checked sizes; K is small */
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

/* Simple formats (Q4_0, Q4_1, Q8_0: one fp16 d, Q4_1 also m, per 32-block), canonical arithmetic.
 * The integer sums of several (weight row, activation row) pairs are reduced into the lanes of one
 * vector, and each lane then forms its pair's float64 term and adds it in block order exactly as
 * mm_generic does (the lanes are independent: no lane ever sees another's values). Decode tiles
 * are 8 weight rows x 1 activation row (lane k = row r + k); prefill tiles are 2 weight rows x 4
 * activation rows (lane 4L + i = row r + L, activation row n + i), each weight block unpacked once
 * for the 4 activation rows. Integer sums use maddubs (u8 x s8): Q4_0 as sum(n q) - 8 s, Q8_0 with
 * the sign trick (|w| x sign(q, w)), both exact. */
typedef struct {
    const mm_args *a;
    int T, nb, bb, qoff;  /* qoff: byte offset of the quants in a block */
    int N4;               /* activation rows in prefill tiles (a multiple of 4) */
    float *wd, *wm;       /* prefill: the tile's weight scales, per row [rows_per_tile][nb] */
    float *dxT;           /* prefill: activation scales transposed, [nb][N4] */
    int32_t *sT;          /* prefill: activation block sums transposed, [nb][N4] */
    double *wl;           /* prefill (AVX-512): the tile's weight scales in lane order, [nb][64] */
    void *mem;
} lk_ctx;

AVX2I uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void lk_transpose_act(lk_ctx *c)
{
    const mm_args *a = c->a;
    int nb = c->nb;
    for (int n = 0; n < c->N4; n++)
        for (int b = 0; b < nb; b++) {
            c->dxT[(size_t)b * c->N4 + n] = a->dx[(size_t)n * nb + b];
            c->sT[(size_t)b * c->N4 + n] = a->sx[(size_t)n * nb + b];
        }
}

/* Writes lane k of the 8 (f32 or f64) results v[] to out[n][r + k] or, prefill, out[n + k % 4][r + k / 4]. */
static void lk_store(const mm_args *a, const double *v, int lanes, int r, int rend, int n, int prefill)
{
    for (int k = 0; k < lanes; k++) {
        int rr = prefill ? r + k / 4 : r + k, nn = prefill ? n + k % 4 : n;
        if (rr < rend) store(a, nn, rr, v[k]);
    }
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

/* Decode tile: rows r..r+7 (clamped to rend - 1) x activation row n. */
AVX2I void a2_decode(const lk_ctx *c, int r, int rend, int n)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff;
    size_t bb = (size_t)c->bb;
    const uint8_t *w[8];
    for (int k = 0; k < 8; k++) w[k] = a->w + (size_t)(r + k < rend ? r + k : rend - 1) * a->row_bytes;
    const int8_t *q = a->q + (size_t)n * a->K;
    const float *dx = a->dx + (size_t)n * nb;
    const int32_t *sx = a->sx + (size_t)n * nb;
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t o = (size_t)b * bb;
        __m256i A[4];
        for (int i = 0; i < 4; i++) {
            __m256i lo, hi;
            a2_w(T, qoff, w[i] + o, w[i + 4] + o, &lo, &hi);
            A[i] = a2_dot(T, lo, hi, q + 32 * b);
        }
        __m256i u = a2_red4(A[0], A[1], A[2], A[3]);   /* lane k: row r + 4 (k / 4) + k % 4 = r + k */
        int32_t s = sx[b];
        if (T == T_Q4_0) u = _mm256_sub_epi32(u, _mm256_set1_epi32(8 * s));
        __m256i h = _mm256_setr_epi32((int)rd32(w[0] + o), (int)rd32(w[1] + o), (int)rd32(w[2] + o), (int)rd32(w[3] + o),
                                      (int)rd32(w[4] + o), (int)rd32(w[5] + o), (int)rd32(w[6] + o), (int)rd32(w[7] + o));
        /* per 128-bit lane: [d0..d3 | m0..m3] as 16-bit, then [d0..d7 | m0..m7] */
        __m256i dm16 = _mm256_packus_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(h, 16));
        dm16 = _mm256_permute4x64_epi64(dm16, 0xd8);
        __m256 dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dm16)), dm = _mm256_setzero_ps();
        if (T == T_Q4_1) dm = _mm256_cvtph_ps(_mm256_extracti128_si256(dm16, 1));
        __m256d dxd = _mm256_set1_pd((double)dx[b]), sd = _mm256_set1_pd((double)s);
        acc0 = _mm256_add_pd(acc0, a2_term(T, _mm256_cvtps_pd(_mm256_castps256_ps128(dw)),
                                           _mm256_cvtps_pd(_mm256_castps256_ps128(dm)), dxd,
                                           _mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), sd));
        acc1 = _mm256_add_pd(acc1, a2_term(T, _mm256_cvtps_pd(_mm256_extractf128_ps(dw, 1)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(dm, 1)), dxd,
                                           _mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1)), sd));
    }
    if (r + 8 <= rend && a->f64) {
        double *o = (double *)a->out + (size_t)n * a->rows + r;
        _mm256_storeu_pd(o, acc0);
        _mm256_storeu_pd(o + 4, acc1);
    } else if (r + 8 <= rend) {
        float *o = (float *)a->out + (size_t)n * a->rows + r;
        _mm_storeu_ps(o, _mm256_cvtpd_ps(acc0));
        _mm_storeu_ps(o + 4, _mm256_cvtpd_ps(acc1));
    } else {
        double v[8];
        _mm256_storeu_pd(v, acc0);
        _mm256_storeu_pd(v + 4, acc1);
        lk_store(a, v, 8, r, rend, n, 0);
    }
}

/* Prefill tile: rows r, r + 1 (clamped) x activation rows n..n+3 (all < N4); c->wd, c->wm hold the
 * two rows' scales. */
AVX2I void a2_prefill(const lk_ctx *c, int r, int rend, int n)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff, N4 = c->N4, K = a->K;
    size_t bb = (size_t)c->bb;
    const uint8_t *w0 = a->w + (size_t)r * a->row_bytes, *w1 = r + 1 < rend ? w0 + a->row_bytes : w0;
    const int8_t *q = a->q + (size_t)n * K;
    const float *wd0 = c->wd, *wd1 = c->wd + nb, *wm0 = c->wm, *wm1 = c->wm + nb;
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int b = 0; b < nb; b++) {
        __m256i lo, hi;
        a2_w(T, qoff, w0 + b * bb, w1 + b * bb, &lo, &hi);
        const int8_t *qb = q + 32 * b;
        __m256i u = a2_red4(a2_dot(T, lo, hi, qb), a2_dot(T, lo, hi, qb + K), a2_dot(T, lo, hi, qb + 2 * K),
                            a2_dot(T, lo, hi, qb + 3 * K));
        __m128i s4 = _mm_loadu_si128((const __m128i *)(c->sT + (size_t)b * N4 + n));
        if (T == T_Q4_0) u = _mm256_sub_epi32(u, _mm256_broadcastsi128_si256(_mm_slli_epi32(s4, 3)));
        __m256d dxd = _mm256_cvtps_pd(_mm_loadu_ps(c->dxT + (size_t)b * N4 + n)), sd = _mm256_cvtepi32_pd(s4);
        acc0 = _mm256_add_pd(acc0, a2_term(T, _mm256_set1_pd((double)wd0[b]), _mm256_set1_pd((double)wm0[b]), dxd,
                                           _mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), sd));
        acc1 = _mm256_add_pd(acc1, a2_term(T, _mm256_set1_pd((double)wd1[b]), _mm256_set1_pd((double)wm1[b]), dxd,
                                           _mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1)), sd));
    }
    double v[8];
    _mm256_storeu_pd(v, acc0);
    _mm256_storeu_pd(v + 4, acc1);
    lk_store(a, v, 8, r, rend, n, 1);
}

/* A row's fp16 d (and m) per block as float. */
static void lk_row_scales(int T, const uint8_t *w, int nb, int bb, float *wd, float *wm)
{
    for (int b = 0; b < nb; b++) {
        wd[b] = h2f(rd16(w + (size_t)b * bb));
        wm[b] = T == T_Q4_1 ? h2f(rd16(w + (size_t)b * bb + 2)) : 0.0f;
    }
}

/* Sets up c and its prefill buffers; 0 on allocation failure. */
static int lk_init(lk_ctx *c, const mm_args *a, int T)
{
    int nb = a->K / 32, N4 = a->N >= 4 ? a->N & ~3 : 0;
    *c = (lk_ctx){a, T, nb, block_bytes(T), T == T_Q4_1 ? 4 : 2, N4, NULL, NULL, NULL, NULL, NULL, NULL};
    if (!N4) return 1;
    double *mem = malloc(sizeof(double) * ((size_t)64 * nb + (size_t)nb * N4) + sizeof(float) * (size_t)4 * nb);
    if (!mem) return 0;
    c->mem = mem;
    c->wl = mem;
    c->dxT = (float *)(mem + (size_t)64 * nb);
    c->sT = (int32_t *)(c->dxT + (size_t)nb * N4);
    c->wd = (float *)(c->sT + (size_t)nb * N4);
    c->wm = c->wd + 2 * nb;
    lk_transpose_act(c);
    return 1;
}

static void lk_free(lk_ctx *c) { free(c->mem); }

AVX2I void simple_avx2(const mm_args *a, int T, int r0, int r1)
{
    lk_ctx c;
    if (!lk_init(&c, a, T)) return;
    for (int r = r0; r < r1; r += 2) {
        if (!c.N4) break;
        for (int k = 0; k < 2; k++)
            lk_row_scales(T, a->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * a->row_bytes, c.nb, c.bb, c.wd + k * c.nb,
                          c.wm + k * c.nb);
        for (int n = 0; n < c.N4; n += 4) a2_prefill(&c, r, r1, n);
    }
    for (int n = c.N4; n < a->N; n++)
        for (int r = r0; r < r1; r += 8) a2_decode(&c, r, r1, n);
    lk_free(&c);
}

AVX2 static void mm_avx2_q4_0(const mm_args *a, int r0, int r1) { simple_avx2(a, T_Q4_0, r0, r1); }
AVX2 static void mm_avx2_q4_1(const mm_args *a, int r0, int r1) { simple_avx2(a, T_Q4_1, r0, r1); }
AVX2 static void mm_avx2_q8_0(const mm_args *a, int r0, int r1) { simple_avx2(a, T_Q8_0, r0, r1); }

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
 * decode tiles are 16 weight rows x 1 activation row (lane k = row r + k), prefill tiles 4 weight
 * rows x 4 activation rows (lane 4L + i = row r + L, activation row n + i). Signed weights become
 * unsigned with an exact correction: Q4_0 sum(n q) - 8 s, Q8_0 sum((w + 128) q) - 128 s. */
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

AVX512I void a5_store(const mm_args *a, __m512d acc0, __m512d acc1, int r, int rend, int n, int prefill)
{
    if (!prefill && r + 16 <= rend && a->f64) {
        double *o = (double *)a->out + (size_t)n * a->rows + r;
        _mm512_storeu_pd(o, acc0);
        _mm512_storeu_pd(o + 8, acc1);
    } else if (!prefill && r + 16 <= rend) {
        float *o = (float *)a->out + (size_t)n * a->rows + r;
        _mm256_storeu_ps(o, _mm512_cvtpd_ps(acc0));
        _mm256_storeu_ps(o + 8, _mm512_cvtpd_ps(acc1));
    } else {
        double v[16];
        _mm512_storeu_pd(v, acc0);
        _mm512_storeu_pd(v + 8, acc1);
        for (int k = 0; k < 16; k++) {
            int rr = prefill ? r + k / 4 : r + k, nn = prefill ? n + k % 4 : n;
            if (rr < rend) store(a, nn, rr, v[k]);
        }
    }
}

/* Decode tile: rows r..r+15 (clamped to rend - 1) x activation row n. */
AVX512I void a5_decode(const lk_ctx *c, int r, int rend, int n)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff;
    size_t bb = (size_t)c->bb;
    const uint8_t *w[16];
    for (int k = 0; k < 16; k++) w[k] = a->w + (size_t)(r + k < rend ? r + k : rend - 1) * a->row_bytes;
    const int8_t *q = a->q + (size_t)n * a->K;
    const float *dx = a->dx + (size_t)n * nb;
    const int32_t *sx = a->sx + (size_t)n * nb;
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t o = (size_t)b * bb;
        __m512i A[4];
        for (int i = 0; i < 4; i++) {
            __m512i lo, hi;
            a5_w(T, qoff, w[i] + o, w[i + 4] + o, w[i + 8] + o, w[i + 12] + o, &lo, &hi);
            A[i] = a5_dot(lo, hi, q + 32 * b);
        }
        int32_t s = sx[b];
        __m512i u = a5_fix(T, a5_red4(A[0], A[1], A[2], A[3]), _mm512_set1_epi32(s));   /* lane k: row r + k */
        __m512i h = _mm512_setr_epi32((int)rd32(w[0] + o), (int)rd32(w[1] + o), (int)rd32(w[2] + o), (int)rd32(w[3] + o),
                                      (int)rd32(w[4] + o), (int)rd32(w[5] + o), (int)rd32(w[6] + o), (int)rd32(w[7] + o),
                                      (int)rd32(w[8] + o), (int)rd32(w[9] + o), (int)rd32(w[10] + o), (int)rd32(w[11] + o),
                                      (int)rd32(w[12] + o), (int)rd32(w[13] + o), (int)rd32(w[14] + o), (int)rd32(w[15] + o));
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)), dm = _mm512_setzero_ps();
        if (T == T_Q4_1) dm = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
        __m512d dxd = _mm512_set1_pd((double)dx[b]), sd = _mm512_set1_pd((double)s);
        acc0 = _mm512_add_pd(acc0, a5_term(T, a5_lo_pd(dw), a5_lo_pd(dm), dxd,
                                           _mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), sd));
        acc1 = _mm512_add_pd(acc1, a5_term(T, a5_hi_pd(dw), a5_hi_pd(dm), dxd,
                                           _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1)), sd));
    }
    a5_store(a, acc0, acc1, r, rend, n, 0);
}

/* Prefill tile: rows r..r+7 (clamped) x activation rows n..n+3 (< N4), as two quads of 4 rows
 * sharing each activation block; c->wl holds the rows' d and m per block in lane order, [nb][64]
 * doubles (per quad 16 d, then 16 m). */
AVX512I void a5_prefill(const lk_ctx *c, int r, int rend, int n)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, qoff = c->qoff, N4 = c->N4, K = a->K;
    size_t bb = (size_t)c->bb, rb = a->row_bytes;
    const uint8_t *w[8];
    for (int k = 0; k < 8; k++) w[k] = a->w + (size_t)(r + k < rend ? r + k : rend - 1) * rb;
    const int8_t *q = a->q + (size_t)n * K;
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    for (int b = 0; b < nb; b++) {
        size_t o = (size_t)b * bb;
        const int8_t *qb = q + 32 * b;
        __m128i s4 = _mm_loadu_si128((const __m128i *)(c->sT + (size_t)b * N4 + n));
        __m512i s16 = _mm512_broadcast_i32x4(s4);
        __m512d dxd = _mm512_broadcast_f64x4(_mm256_cvtps_pd(_mm_loadu_ps(c->dxT + (size_t)b * N4 + n)));
        __m512d sd = _mm512_broadcast_f64x4(_mm256_cvtepi32_pd(s4));
        const double *wl = c->wl + (size_t)b * 64;
        for (int g = 0; g < 2; g++) {
            __m512i lo, hi;
            a5_w(T, qoff, w[4 * g] + o, w[4 * g + 1] + o, w[4 * g + 2] + o, w[4 * g + 3] + o, &lo, &hi);
            __m512i u = a5_fix(T, a5_red4(a5_dot(lo, hi, qb), a5_dot(lo, hi, qb + K), a5_dot(lo, hi, qb + 2 * K),
                                          a5_dot(lo, hi, qb + 3 * K)), s16);
            const double *wg = wl + 32 * g;
            acc[2 * g] = _mm512_add_pd(acc[2 * g], a5_term(T, _mm512_loadu_pd(wg), _mm512_loadu_pd(wg + 16), dxd,
                                                           _mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), sd));
            acc[2 * g + 1] = _mm512_add_pd(acc[2 * g + 1],
                                           a5_term(T, _mm512_loadu_pd(wg + 8), _mm512_loadu_pd(wg + 24), dxd,
                                                   _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1)), sd));
        }
    }
    a5_store(a, acc[0], acc[1], r, rend, n, 1);
    if (r + 4 < rend) a5_store(a, acc[2], acc[3], r + 4, rend, n, 1);
}

/* Prefill, 16 activation rows per tile: the activation quants are transposed once per call so that
 * 64-byte vector t of block b holds bytes 4t..4t+3 of the 16 rows' blocks (lane j = row n0 + j),
 * and each weight row is unpacked once to u8 values. One vpdpbusd per 4 values then adds into one
 * int32 lane per (weight row, activation row): no horizontal reduction. Tiles are 4 weight rows x
 * 16 activation rows; missing activation rows are zero lanes that are never stored. */
typedef struct {
    int nt;               /* tiles of 16 activation rows */
    uint8_t *qT;          /* [nt][nb][8][64] */
    float *dxT;           /* [nt][nb][16] */
    int32_t *sT;          /* [nt][nb][16] */
    uint8_t *wu;          /* [4][K] unpacked u8 weights of the current rows */
    float *wd, *wm;       /* [4][nb] */
    void *mem;
} p16_ctx;

static int p16_init(p16_ctx *p, const mm_args *a, int n0)
{
    int K = a->K, nb = K / 32, N = a->N - n0, nt = (N + 15) / 16;
    size_t qn = (size_t)nt * nb * 512, fn = (size_t)nt * nb * 16;
    char *mem = malloc(qn + 8 * fn + 4 * (size_t)K + 32 * (size_t)nb + 64);
    if (!mem) return 0;
    p->nt = nt;
    p->mem = mem;
    p->qT = (uint8_t *)mem;
    p->dxT = (float *)(mem + qn);
    p->sT = (int32_t *)(p->dxT + fn);
    p->wu = (uint8_t *)(p->sT + fn);
    p->wd = (float *)(p->wu + 4 * (size_t)K);
    p->wm = p->wd + 4 * (size_t)nb;
    memset(mem, 0, qn + 8 * fn);
    for (int n = 0; n < N; n++) {
        int g = n / 16, j = n % 16;
        const int8_t *q = a->q + (size_t)(n0 + n) * K;
        for (int b = 0; b < nb; b++) {
            size_t tb = (size_t)g * nb + b;
            for (int t = 0; t < 8; t++) memcpy(p->qT + (tb * 8 + t) * 64 + 4 * j, q + 32 * b + 4 * t, 4);
            p->dxT[tb * 16 + j] = a->dx[(size_t)(n0 + n) * nb + b];
            p->sT[tb * 16 + j] = a->sx[(size_t)(n0 + n) * nb + b];
        }
    }
    return 1;
}

/* Row w's values as u8 (Q4_0, Q4_1: n; Q8_0: w + 128) and its d, m per block. */
AVX512I void p16_unpack(int T, const uint8_t *w, int nb, int bb, uint8_t *u, float *wd, float *wm)
{
    int qoff = T == T_Q4_1 ? 4 : 2;
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = w + (size_t)b * bb;
        wd[b] = h2f(rd16(p));
        wm[b] = T == T_Q4_1 ? h2f(rd16(p + 2)) : 0.0f;
        if (T == T_Q8_0) {
            _mm256_storeu_si256((__m256i *)(u + 32 * b),
                                _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 2)), _mm256_set1_epi8((char)0x80)));
        } else {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + qoff)), m = _mm_set1_epi8(15);
            _mm_storeu_si128((__m128i *)(u + 32 * b), _mm_and_si128(v, m));
            _mm_storeu_si128((__m128i *)(u + 32 * b + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        }
    }
}

AVX512I void p16_tile(const mm_args *a, const p16_ctx *p, int T, int r, int rend, int n0, int g)
{
    int nb = a->K / 32, K = a->K;
    __m512d A[4][2];
    for (int k = 0; k < 4; k++) A[k][0] = A[k][1] = _mm512_setzero_pd();
    for (int b = 0; b < nb; b++) {
        size_t tb = (size_t)g * nb + b;
        const uint8_t *Q = p->qT + tb * 512;
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int t = 0; t < 8; t++) {
            __m512i qv = _mm512_loadu_si512((const void *)(Q + 64 * t));
            for (int k = 0; k < 4; k++)
                acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_set1_epi32((int)rd32(p->wu + (size_t)k * K + 32 * b + 4 * t)), qv);
        }
        __m512i s16 = _mm512_loadu_si512((const void *)(p->sT + tb * 16));
        __m512 dx16 = _mm512_loadu_ps(p->dxT + tb * 16);
        __m512d dxl = a5_lo_pd(dx16), dxh = a5_hi_pd(dx16);
        __m512d sl = _mm512_cvtepi32_pd(_mm512_castsi512_si256(s16)), sh = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(s16, 1));
        for (int k = 0; k < 4; k++) {
            __m512i u = a5_fix(T, acc[k], s16);
            __m512d dw = _mm512_set1_pd((double)p->wd[k * nb + b]), dm = _mm512_set1_pd((double)p->wm[k * nb + b]);
            A[k][0] = _mm512_add_pd(A[k][0], a5_term(T, dw, dm, dxl, _mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), sl));
            A[k][1] = _mm512_add_pd(A[k][1], a5_term(T, dw, dm, dxh, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1)), sh));
        }
    }
    int nn = a->N - (n0 + 16 * g);
    if (nn > 16) nn = 16;
    for (int k = 0; k < 4 && r + k < rend; k++) {
        double v[16];
        _mm512_storeu_pd(v, A[k][0]);
        _mm512_storeu_pd(v + 8, A[k][1]);
        for (int j = 0; j < nn; j++) store(a, n0 + 16 * g + j, r + k, v[j]);
    }
}

/* Activation rows [n0, N) against rows [r0, r1). */
AVX512I int p16_run(const mm_args *a, int T, int r0, int r1, int n0)
{
    p16_ctx p;
    if (!p16_init(&p, a, n0)) return 0;
    int nb = a->K / 32, bb = block_bytes(T);
    for (int r = r0; r < r1; r += 4) {
        for (int k = 0; k < 4; k++)
            p16_unpack(T, a->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * a->row_bytes, nb, bb, p.wu + (size_t)k * a->K,
                       p.wd + (size_t)k * nb, p.wm + (size_t)k * nb);
        for (int g = 0; g < p.nt; g++) p16_tile(a, &p, T, r, r1, n0, g);
    }
    free(p.mem);
    return 1;
}

AVX512I void simple_avx512(const mm_args *a, int T, int r0, int r1)
{
    /* 16-row tiles for all activation rows but a remainder of 1..3 (decode tiles); the 4-row
     * prefill tiles are the fallback when memory is short */
    int n16 = a->N >= 4 ? (a->N % 16 < 4 ? a->N & ~15 : a->N) : 0;
    if (n16 && p16_run(a, T, r0, r1, a->N - n16)) {   /* rows [N - n16, N) */
        lk_ctx d = {a, T, a->K / 32, block_bytes(T), T == T_Q4_1 ? 4 : 2, 0, NULL, NULL, NULL, NULL, NULL, NULL};
        for (int n = 0; n < a->N - n16; n++)
            for (int r = r0; r < r1; r += 16) a5_decode(&d, r, r1, n);
        return;
    }
    lk_ctx c;
    if (!lk_init(&c, a, T)) return;
    for (int r = r0; r < r1 && c.N4; r += 8) {
        for (int k = 0; k < 8; k++) {
            const uint8_t *w = a->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * a->row_bytes;
            double *wl = c.wl + 32 * (k / 4) + 4 * (k % 4);
            for (int b = 0; b < c.nb; b++) {
                double d = (double)h2f(rd16(w + (size_t)b * c.bb));
                double m = T == T_Q4_1 ? (double)h2f(rd16(w + (size_t)b * c.bb + 2)) : 0.0;
                for (int i = 0; i < 4; i++) {
                    wl[(size_t)b * 64 + i] = d;
                    wl[(size_t)b * 64 + 16 + i] = m;
                }
            }
        }
        for (int n = 0; n < c.N4; n += 4) a5_prefill(&c, r, r1, n);
    }
    for (int n = c.N4; n < a->N; n++)
        for (int r = r0; r < r1; r += 16) a5_decode(&c, r, r1, n);
    lk_free(&c);
}

AVX512 static void mm_avx512_q4_0(const mm_args *a, int r0, int r1) { simple_avx512(a, T_Q4_0, r0, r1); }
AVX512 static void mm_avx512_q4_1(const mm_args *a, int r0, int r1) { simple_avx512(a, T_Q4_1, r0, r1); }
AVX512 static void mm_avx512_q8_0(const mm_args *a, int r0, int r1) { simple_avx512(a, T_Q8_0, r0, r1); }

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
    mm_fn mm[T_MAX];
    qa_fn qa;
} K_ = {"generic", {0}, quant_act_rows_generic};

/* level: 0 generic, 1 AVX2 at most, 2 AVX-512 VNNI at most (what the CPU has). */
static void select_kernels(int level)
{
    static const int types[] = {T_Q4_0, T_Q4_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K};
    K_.name = "generic";
    K_.qa = quant_act_rows_generic;
    for (int i = 0; i < 6; i++) K_.mm[types[i]] = mm_generic;
#ifdef SK_X86
    if (level >= 1 && have_avx2()) {
        K_.name = "avx2";
        K_.qa = quant_act_rows_avx2;
        K_.mm[T_Q4_0] = mm_avx2_q4_0;
        K_.mm[T_Q4_1] = mm_avx2_q4_1;
        K_.mm[T_Q8_0] = mm_avx2_q8_0;
        if (level >= 2 && have_avx512()) {
            K_.name = "avx512";
            K_.mm[T_Q4_0] = mm_avx512_q4_0;
            K_.mm[T_Q4_1] = mm_avx512_q4_1;
            K_.mm[T_Q8_0] = mm_avx512_q8_0;
        }
    }
#else
    (void)level;
#endif
}

/* Rows [r0, r1) of the split of `rows` into `parts` nearly equal chunks. */
static void chunk(int rows, int parts, int i, int *r0, int *r1)
{
    *r0 = (int)((long long)rows * i / parts);
    *r1 = (int)((long long)rows * (i + 1) / parts);
}

/* Quantize x (if given) into a->q/dx/sx, then run the kernel, on `threads` threads. */
static void run_matmul(mm_args *a, const float *x, int threads)
{
    mm_fn fn = K_.mm[a->type];
    qa_fn qa = K_.qa;
#ifdef _OPENMP
    if (threads > 1) {
        if (threads > a->rows) threads = a->rows > 0 ? a->rows : 1;
#pragma omp parallel num_threads(threads)
        {
            int nt = omp_get_num_threads(), i = omp_get_thread_num(), r0, r1;
            if (x) {
                chunk(a->N, nt, i, &r0, &r1);
                qa(x, r0, r1, a->K, (int8_t *)a->q, (float *)a->dx, (int32_t *)a->sx);
#pragma omp barrier
            }
            chunk(a->rows, nt, i, &r0, &r1);
            fn(a, r0, r1);
        }
        return;
    }
#endif
    (void)threads;
    if (x) qa(x, 0, a->N, a->K, (int8_t *)a->q, (float *)a->dx, (int32_t *)a->sx);
    fn(a, 0, a->rows);
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
                 (const uint8_t *)PyLong_AsVoidPtr(args[1]), NULL, NULL, NULL, ob.buf};
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
    Py_BEGIN_ALLOW_THREADS
    run_matmul(&a, (const float *)xb.buf, (int)v[6]);
    Py_END_ALLOW_THREADS
    if (scratch != stack) free(scratch);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
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
                 (const uint8_t *)PyLong_AsVoidPtr(args[1]), qb.buf, db.buf, sb.buf, ob.buf};
    Py_BEGIN_ALLOW_THREADS
    run_matmul(&a, NULL, (int)v[6]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&db);
    PyBuffer_Release(&qb);
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

static PyObject *py_kernel_name(PyObject *self, PyObject *unused) { return PyUnicode_FromString(K_.name); }

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
    {"kernel_name", py_kernel_name, METH_NOARGS, "the kernel set in use"},
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
