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
 * float64 output adds those terms in block order. float32 output: the generic kernel rounds the
 * float64 result; the AVX2 kernels accumulate (d*dx) * isum in 8 float lanes with FMA. Every
 * (weight row, activation row) result is computed by the same instruction sequence whatever N,
 * the tiling, or the thread count, so it is bit-identical across those.
 *
 * Build with -ffp-contract=off: the reference dequantizers must not fuse a*b+c.
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

AVX2I __m256i unpack_nib(const uint8_t *p)   /* 16 bytes -> 32 nibbles: low halves then high */
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(t, _mm256_set1_epi8(15));
}

AVX2I __m256i dot_us(__m256i w, __m256i q)   /* unsigned w (<= 128) x signed q -> 8 int32 */
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, q), _mm256_set1_epi16(1));
}

AVX2I int32_t hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

AVX2I float hsum_f32(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Simple formats (one fp16 d, Q4_1 also m, per 32-block). Per weight row the scales are first
 * converted to float arrays wd, wm (zero-padded to a multiple of 8). Per (row, activation row)
 * pair: dd[b] = wd[b] * dx[b]; float32 output is hsum(sum_b fma(isum8_b, dd[b])) + hsum(Q4_1's
 * sum_b (wm[b]*dx[b]) * s[b] in 8 lanes); float64 output adds term_*() per block in order. Tiles
 * of RT weight rows x NT activation rows only interleave independent pairs. */
#define NB_STACK 512

AVX2I __m256i tail_mask(int cnt) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

AVX2I uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

AVX2I void prep_simple(int T, const uint8_t *wr, int nb, float *wd, float *wm)
{
    size_t bb = (size_t)block_bytes(T);
    const __m128i lo = _mm_set1_epi32(0xffff);
    for (int g = 0; g < nb; g += 8) {
        const uint8_t *p = wr + g * bb;
        __m128i v0, v1;
        if (nb - g >= 8) {
            v0 = _mm_setr_epi32(rd32(p), rd32(p + bb), rd32(p + 2 * bb), rd32(p + 3 * bb));
            v1 = _mm_setr_epi32(rd32(p + 4 * bb), rd32(p + 5 * bb), rd32(p + 6 * bb), rd32(p + 7 * bb));
        } else {
            uint32_t t[8] = {0};
            for (int i = 0; i < nb - g; i++) t[i] = rd32(p + i * bb);
            v0 = _mm_setr_epi32(t[0], t[1], t[2], t[3]);
            v1 = _mm_setr_epi32(t[4], t[5], t[6], t[7]);
        }
        _mm256_storeu_ps(wd + g, _mm256_cvtph_ps(_mm_packus_epi32(_mm_and_si128(v0, lo), _mm_and_si128(v1, lo))));
        if (T == T_Q4_1)
            _mm256_storeu_ps(wm + g, _mm256_cvtph_ps(_mm_packus_epi32(_mm_srli_epi32(v0, 16), _mm_srli_epi32(v1, 16))));
    }
}

/* dd[b] = wd[b] * dx[b]; returns Q4_1's min term of the pair (0 otherwise). */
AVX2I float pair_prep(int T, const float *wd, const float *wm, const float *dx, const int32_t *sx, int nb, float *dd)
{
    __m256 macc = _mm256_setzero_ps();
    for (int g = 0; g < nb; g += 8) {
        __m256 x8;
        __m256i s8;
        if (nb - g >= 8) {
            x8 = _mm256_loadu_ps(dx + g);
            s8 = _mm256_loadu_si256((const __m256i *)(sx + g));
        } else {
            __m256i m = tail_mask(nb - g);
            x8 = _mm256_maskload_ps(dx + g, m);
            s8 = _mm256_maskload_epi32((const int *)(sx + g), m);
        }
        _mm256_storeu_ps(dd + g, _mm256_mul_ps(_mm256_loadu_ps(wd + g), x8));
        if (T == T_Q4_1) macc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(wm + g), x8), _mm256_cvtepi32_ps(s8), macc);
    }
    return T == T_Q4_1 ? hsum_f32(macc) : 0.0f;
}

/* The unsigned operand of block p, and in *S the sign source (Q4_0, Q8_0: signed weights). */
AVX2I __m256i load_w(int T, const uint8_t *p, __m256i *S)
{
    if (T == T_Q4_1) return unpack_nib(p + 4);
    *S = T == T_Q8_0 ? _mm256_loadu_si256((const __m256i *)(p + 2)) : _mm256_sub_epi8(unpack_nib(p + 2), _mm256_set1_epi8(8));
    return _mm256_sign_epi8(*S, *S);
}

AVX2I __m256i dot_w(int T, __m256i W, __m256i S, const int8_t *q)
{
    __m256i Q = _mm256_loadu_si256((const __m256i *)q);
    return dot_us(W, T == T_Q4_1 ? Q : _mm256_sign_epi8(Q, S));
}

typedef struct {
    const mm_args *a;
    int T, nb, nbp, bb;
    float *wd, *wm, *dd;   /* wd, wm: [2][nbp]; dd: [8][nbp] */
} simple_ctx;

AVX2I void tile_f32(const simple_ctx *c, int r, int RT, int n0, int NT)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, nbp = c->nbp, K = a->K;
    float mt[2][4];
    __m256 acc[2][4];
    const uint8_t *wr[2];
    for (int rr = 0; rr < RT; rr++) {
        wr[rr] = a->w + (size_t)(r + rr) * a->row_bytes;
        for (int j = 0; j < NT; j++) {
            size_t n = (size_t)(n0 + j);
            mt[rr][j] = pair_prep(T, c->wd + rr * nbp, c->wm + rr * nbp, a->dx + n * nb, a->sx + n * nb, nb,
                                  c->dd + (rr * NT + j) * nbp);
            acc[rr][j] = _mm256_setzero_ps();
        }
    }
    for (int b = 0; b < nb; b++) {
        __m256i W[2], S[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int rr = 0; rr < RT; rr++) W[rr] = load_w(T, wr[rr] + (size_t)b * c->bb, &S[rr]);
        for (int j = 0; j < NT; j++) {
            const int8_t *q = a->q + (size_t)(n0 + j) * K + 32 * b;
            for (int rr = 0; rr < RT; rr++)
                acc[rr][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_w(T, W[rr], S[rr], q)),
                                             _mm256_broadcast_ss(c->dd + (rr * NT + j) * nbp + b), acc[rr][j]);
        }
    }
    for (int rr = 0; rr < RT; rr++)
        for (int j = 0; j < NT; j++)
            ((float *)a->out)[(size_t)(n0 + j) * a->rows + r + rr] = hsum_f32(acc[rr][j]) + mt[rr][j];
}

AVX2I __m128i hsum4_i32(__m256i v0, __m256i v1, __m256i v2, __m256i v3)   /* 4 blocks' sums */
{
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* One pair, float64: the per-block terms of 4 blocks at a time in double lanes, added in order. */
AVX2I double pair_f64(const simple_ctx *c, const uint8_t *wr, const float *wd, const float *wm, size_t n)
{
    const mm_args *a = c->a;
    int T = c->T, nb = c->nb, bb = c->bb;
    const int8_t *q = a->q + n * a->K;
    const float *dx = a->dx + n * nb;
    const int32_t *sx = a->sx + n * nb;
    double acc = 0.0;
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m256i v[4], S = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            __m256i W = load_w(T, wr + (size_t)(b + k) * bb, &S);
            v[k] = dot_w(T, W, S, q + 32 * (b + k));
        }
        __m128i is4 = hsum4_i32(v[0], v[1], v[2], v[3]);
        __m256d x4 = _mm256_cvtps_pd(_mm_loadu_ps(dx + b));
        __m256d t = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(wd + b)), x4), _mm256_cvtepi32_pd(is4));
        if (T == T_Q4_1)
            t = _mm256_add_pd(t, _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(wm + b)), x4),
                                               _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(sx + b)))));
        __m128d lo = _mm256_castpd256_pd128(t), hi = _mm256_extractf128_pd(t, 1);
        acc += _mm_cvtsd_f64(lo);
        acc += _mm_cvtsd_f64(_mm_unpackhi_pd(lo, lo));
        acc += _mm_cvtsd_f64(hi);
        acc += _mm_cvtsd_f64(_mm_unpackhi_pd(hi, hi));
    }
    for (; b < nb; b++) {
        __m256i S = _mm256_setzero_si256(), W = load_w(T, wr + (size_t)b * bb, &S);
        int32_t isum = hsum_i32(dot_w(T, W, S, q + 32 * b));
        acc += T == T_Q4_1 ? term_q4_1(wd[b], wm[b], dx[b], isum, sx[b]) : term_simple(wd[b], dx[b], isum);
    }
    return acc;
}

AVX2I void tile_f64(const simple_ctx *c, int r, int RT, int n0, int NT)
{
    const mm_args *a = c->a;
    double res[2][4];
    for (int rr = 0; rr < RT; rr++)
        for (int j = 0; j < NT; j++)
            res[rr][j] = pair_f64(c, a->w + (size_t)(r + rr) * a->row_bytes, c->wd + rr * c->nbp, c->wm + rr * c->nbp,
                                  (size_t)(n0 + j));
    for (int rr = 0; rr < RT; rr++)
        for (int j = 0; j < NT; j++) ((double *)a->out)[(size_t)(n0 + j) * a->rows + r + rr] = res[rr][j];
}

AVX2I void rows_tile(const simple_ctx *c, int r, int RT)
{
    int N = c->a->N, n = 0;
    for (int rr = 0; rr < RT; rr++)
        prep_simple(c->T, c->a->w + (size_t)(r + rr) * c->a->row_bytes, c->nb, c->wd + rr * c->nbp, c->wm + rr * c->nbp);
    if (c->a->f64) {
        for (; n + 4 <= N; n += 4) tile_f64(c, r, RT, n, 4);
        for (; n < N; n++) tile_f64(c, r, RT, n, 1);
    } else if (RT == 2) {
        for (; n + 4 <= N; n += 4) tile_f32(c, r, 2, n, 4);
        for (; n < N; n++) tile_f32(c, r, 2, n, 1);
    } else {
        for (; n + 4 <= N; n += 4) tile_f32(c, r, 1, n, 4);
        for (; n < N; n++) tile_f32(c, r, 1, n, 1);
    }
}

AVX2I void simple_avx2(const mm_args *a, int T, int r0, int r1)
{
    int nb = a->K / 32, nbp = (nb + 7) & ~7;
    float stack[12 * NB_STACK], *mem = nbp <= NB_STACK ? stack : malloc(sizeof(float) * 12 * (size_t)nbp);
    if (!mem) return;
    simple_ctx c = {a, T, nb, nbp, block_bytes(T), mem, mem + 2 * nbp, mem + 4 * nbp};
    int r = r0;
    for (; r + 2 <= r1; r += 2) rows_tile(&c, r, 2);
    if (r < r1) rows_tile(&c, r, 1);
    if (mem != stack) free(mem);
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
#endif /* SK_X86 */

/* ------------------------------------------------------------------ dispatch */
static struct {
    const char *name;
    mm_fn mm[T_MAX];
    qa_fn qa;
} K_ = {"generic", {0}, quant_act_rows_generic};

static void select_kernels(int want_avx2)
{
    static const int types[] = {T_Q4_0, T_Q4_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K};
    K_.name = "generic";
    K_.qa = quant_act_rows_generic;
    for (int i = 0; i < 6; i++) K_.mm[types[i]] = mm_generic;
#ifdef SK_X86
    if (want_avx2 && have_avx2()) {
        K_.name = "avx2";
        K_.qa = quant_act_rows_avx2;
        K_.mm[T_Q4_0] = mm_avx2_q4_0;
        K_.mm[T_Q4_1] = mm_avx2_q4_1;
        K_.mm[T_Q8_0] = mm_avx2_q8_0;
    }
#else
    (void)want_avx2;
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

/* set_kernel(name): "generic", "avx2" or "auto"; returns the name now in use (tests only). */
static PyObject *py_set_kernel(PyObject *self, PyObject *arg)
{
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    if (strcmp(s, "generic") && strcmp(s, "avx2") && strcmp(s, "auto")) {
        PyErr_Format(PyExc_ValueError, "unknown kernel %R", arg);
        return NULL;
    }
    select_kernels(strcmp(s, "generic") != 0);
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
    {"set_kernel", py_set_kernel, METH_O, "set_kernel('generic' | 'avx2' | 'auto')"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", "GGML block matmul kernels", -1, methods};

PyMODINIT_FUNC PyInit__qkernels(void)
{
    const char *env = getenv("SKYNET_KERNEL");
    select_kernels(!(env && strcmp(env, "generic") == 0));
    return PyModule_Create(&module);
}
