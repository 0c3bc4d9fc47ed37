/* The server's per-row float32 work in the fast precision, in C: RMSNorm of whole rows and each
 * row's attention (RoPE, the KV-cache write, scores, softmax, the weighted values).
 *
 * In numpy each of these is several calls of a few µs for a vector of 576 values; per decode
 * token that was ~60 µs a layer, more than the layer's quantized matmuls. Here they are one call
 * per layer for all the step's rows, prompt chunks included (on several threads when large).
 *
 * Canonical arithmetic, as in _qkernels.c: the bits do not depend on the CPU or the vector width.
 * Built with -ffp-contract=off (no FMA). A score is its dot product summed over d in order (the
 * lanes run over keys: the cache keeps keys transposed); a weighted value sums the even and the odd
 * keys apart, each in order, then adds the two (lanes over d); the sums of squares and of e^x keep a fixed number of lanes, lane l taking the
 * elements i with i % lanes == l in order, folded in a fixed tree. GCC vectorizes all of it without
 * reassociating anything, so the AVX-512, AVX2 and baseline clones give the same bits. e^x is
 * sk_expf (IEEE + - * / only). RoPE is x1*cos - x2*sin and x2*cos + x1*sin in float32, one
 * rounding per operation: the same bits as the numpy expression in model._rope.
 *
 * A row's result depends only on that row (and its own sequence's cache), never on the other rows
 * in the call, so a sequence's tokens do not depend on what shares its batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_qkernels.h"
/* key x head x D products below which one thread does it all: ~2^17 is ~50 µs of work here, and
 * handing rows to the pool's workers costs ~1 µs when they spin (right after a matmul), 20-50 µs
 * when they sleep */
#define ATTN_THREAD_WORK (1LL << 17)

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define SK_X86_CLONES 1
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_CLONES
#endif

#define LANES 16

static inline float fold(float *acc)
{
    for (int w = LANES / 2; w; w >>= 1)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w for N rows of H. The sum of squares is in
 * double (x^2 is exact there), 8 lanes folded in a fixed tree; sqrt is IEEE (correctly rounded). */
SK_CLONES
static void rmsnorm_rows(const float *restrict x, const float *restrict w, int N, int H, double eps,
                         float *restrict out)
{
    for (int r = 0; r < N; r++) {
        const float *xr = x + (size_t)r * H;
        double acc[8] = {0};
        int i = 0;
        for (; i + 8 <= H; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += (double)xr[i + l] * (double)xr[i + l];
        for (int l = 0; i + l < H; l++) acc[l] += (double)xr[i + l] * (double)xr[i + l];
        for (int s = 4; s; s >>= 1)
            for (int l = 0; l < s; l++) acc[l] += acc[l + s];
        float inv = (float)(1.0 / sqrt(acc[0] / H + eps));
        float *o = out + (size_t)r * H;
        for (int j = 0; j < H; j++) o[j] = xr[j] * inv * w[j];
    }
}

/* HF's rotate-half RoPE of one head of D values at one position (half = D / 2). */
static inline void rope_head(const float *restrict x, const float *restrict c, const float *restrict s,
                             int half, float *restrict y)
{
    for (int i = 0; i < half; i++) {
        float a = x[i] * c[i], b = x[i + half] * s[i];
        y[i] = a - b;
    }
    for (int i = 0; i < half; i++) {
        float a = x[i + half] * c[i], b = x[i] * s[i];
        y[i + half] = a + b;
    }
}

typedef struct {
    int nh, kvh, D, cap, layer;
    float scale;
} attn_shape;

#define KEYS 128   /* keys scored at once: independent lanes, so the adds do not wait on each other */

#if defined(__GNUC__)
#define SK_VEC 1   /* GCC vectors: each operation is elementwise and rounds once, on any target;
                    * aligned(4) lets one load from any float address */
#endif

/* Row h (q: nh heads, then k, v: kvh heads) at position p: rope its k and write k, v to the
 * cache at p. kc: the sequence's keys, transposed (layers, kvh, D, cap); vc: its values
 * (layers, kvh, cap, D). */
static void store_row(const attn_shape *a, const float *restrict h, const float *restrict cs,
                      const float *restrict sn, int p, float *kc, float *vc)
{
    int D = a->D;
    size_t plane = (size_t)a->cap * D;
    float k[1024];
    for (int g = 0; g < a->kvh; g++) {
        float *K = kc + ((size_t)a->layer * a->kvh + g) * plane;
        float *V = vc + ((size_t)a->layer * a->kvh + g) * plane;
        rope_head(h + (size_t)(a->nh + g) * D, cs, sn, D / 2, k);
        for (int d = 0; d < D; d++) K[(size_t)d * a->cap + p] = k[d];
        memcpy(V + (size_t)p * D, h + (size_t)(a->nh + a->kvh + g) * D, (size_t)D * 4);
    }
}

/* attend_head, once per vector width (_attn_vec.h): 16 lanes for AVX-512, 8 for AVX2 and the rest. */
#if defined(SK_VEC) && defined(SK_X86_CLONES)
#define SK_V16 1
#define VL 16
#define VT vf16
#define FN(name) name##_v16
#define VEC_TARGET __attribute__((target("avx512f")))
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
#include "_attn_vec.h"
#undef VL
#undef VT
#undef FN
#undef VEC_TARGET
#endif
#define VL 8
#define VT vf8
#define FN(name) name##_v8
#ifdef SK_X86_CLONES
#define VEC_TARGET __attribute__((target_clones("avx2", "default")))
#else
#define VEC_TARGET
#endif
#ifdef SK_VEC
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
#endif
#include "_attn_vec.h"
#undef VL
#undef VT
#undef FN
#undef VEC_TARGET

typedef void (*head_fn)(const attn_shape *, const float *, const float *, const float *, int, int, const float *,
                        const float *, float *, float *);

typedef void (*group_fn)(const attn_shape *, const float *, const float *, const float *, int, int, const float *,
                         const float *, float *, size_t, float *);

/* The widest attend_head (and attend_group) for the kernels in use: 16 lanes with the AVX-512
 * ones, else 8 (so set_kernel("avx2") also tests the 8-lane loops on an AVX-512 machine). */
static int use_v16(void)
{
#ifdef SK_V16
    return sk_kernel_level() >= 2 && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

static head_fn pick_head(void)
{
#ifdef SK_V16
    if (use_v16()) return attend_head_v16;
#endif
    return attend_head_v8;
}

/* NULL where there are no GCC vectors: rows then go head by head. */
static group_fn pick_group(void)
{
#ifdef SK_V16
    if (use_v16()) return attend_group_v16;
#endif
#ifdef SK_VEC
    return attend_group_v8;
#else
    return NULL;
#endif
}

/* One call's rows, attended on the kernels' thread pool (sk_parallel): each (kv head, row) is one
 * part, all of kv head 0's rows first, its query heads together (attend_group), or, when there
 * are fewer than 4 rows per thread (decode), each (row, query head), so that a single decode
 * row's heads spread over the threads. Parts are taken from an atomic counter, so parts of
 * different cost (a prompt's rows grow with position) and a descheduled thread balance
 * themselves; each head of a row is still computed whole by one thread. */
typedef struct {
    int nh, kvh, D, layer, width, half, threads, split;   /* split: parts per row, 1 or nh */
    head_fn head;
    group_fn group;   /* a whole row's heads, kv head by kv head (split 1), when not NULL */
    float scale;
    long long S;
    const int64_t *rows;
    const float *h, *cos, *sin;
    float *att;
} attn_job;

#define SCORES_ON_STACK 8192
#define GROUP_HEADS 4   /* the most query heads attend_group scores at once (GH) */

static int attn_part(void *ctx, int i)
{
    const attn_job *j = ctx;
    /* with groups, part i is row i % S of kv head i / S: the threads go through one kv head's
     * keys and values (which stay in their L2) before the next */
    long long row = j->group ? i % j->S : i / j->split;
    const int64_t *r = j->rows + 5 * row;
    size_t ss = (size_t)r[1] + 1 + 16;   /* scores() may fill a whole last run of 16 */
    size_t need = j->group ? GROUP_HEADS * ss : ss;
    float stack[SCORES_ON_STACK];
    float *sc = need <= SCORES_ON_STACK ? stack : malloc(need * sizeof(float));
    if (!sc) return -1;
    attn_shape a = {j->nh, j->kvh, j->D, (int)r[4], j->layer, j->scale};
    const float *h = j->h + r[0] * j->width, *cs = j->cos + r[1] * j->half, *sn = j->sin + r[1] * j->half;
    const float *kc = (const float *)(uintptr_t)r[2], *vc = (const float *)(uintptr_t)r[3];
    float *att = j->att + r[0] * j->nh * j->D;
    if (j->group) {
        j->group(&a, h, cs, sn, (int)r[1], (int)(i / j->S), kc, vc, sc, ss, att);
    } else {
        int per = j->nh / j->split, first = (i % j->split) * per;
        for (int head = first; head < first + per; head++) j->head(&a, h, cs, sn, (int)r[1], head, kc, vc, sc, att);
    }
    if (sc != stack) free(sc);
    return 0;
}

/* Every row's k, v into its cache first (a prompt's rows read each other's), then the rows'
 * attention, on `threads` threads when the work is large enough to pay for handing rows out. */
static int attn_run(attn_job *j, long long work)
{
    for (long long i = 0; i < j->S; i++) {
        const int64_t *r = j->rows + 5 * i;
        attn_shape a = {j->nh, j->kvh, j->D, (int)r[4], j->layer, j->scale};
        store_row(&a, j->h + r[0] * j->width, j->cos + r[1] * j->half, j->sin + r[1] * j->half, (int)r[1],
                  (float *)(uintptr_t)r[2], (float *)(uintptr_t)r[3]);
    }
    int threads = work < ATTN_THREAD_WORK ? 1 : j->threads;
    j->head = pick_head();
    j->split = threads > 1 && j->S < 4LL * threads ? j->nh : 1;
    j->group = j->split == 1 ? pick_group() : NULL;
    return sk_parallel(attn_part, j, (int)(j->S * (j->group ? j->kvh : j->split)), threads);
}

/* A C-contiguous buffer of `fmt` items ("f": float32, "q": int64) of at least `need` bytes. */
static int buffer(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what, char fmt)
{
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = b->format ? b->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int ok = fmt == 'f' ? (f[0] == 'f' && !f[1] && b->itemsize == 4)
                        : ((f[0] == 'q' || f[0] == 'l') && !f[1] && b->itemsize == 8);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: expected %s items, got format '%s'", what,
                     fmt == 'f' ? "float32" : "int64", b->format ? b->format : "B");
        PyBuffer_Release(b);
        return -1;
    }
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* rmsnorm(x, w, out, N, H, eps): out = RMSNorm(x) * w, float32 rows. */
PyObject *sk_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "rmsnorm takes 6 arguments");
    long long N = PyLong_AsLongLong(args[3]), H = PyLong_AsLongLong(args[4]);
    double eps = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (N < 0 || H <= 0 || N > INT32_MAX / H || N * H > PY_SSIZE_T_MAX / 4)
        return PyErr_Format(PyExc_ValueError, "rmsnorm: bad shape (%lld, %lld)", N, H);
    Py_buffer xb, wb, ob;
    if (buffer(args[0], &xb, 0, (Py_ssize_t)(N * H * 4), "x", 'f') < 0) return NULL;
    if (buffer(args[1], &wb, 0, (Py_ssize_t)(H * 4), "w", 'f') < 0) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    if (buffer(args[2], &ob, 1, (Py_ssize_t)(N * H * 4), "out", 'f') < 0) {
        PyBuffer_Release(&wb);
        PyBuffer_Release(&xb);
        return NULL;
    }
    rmsnorm_rows(xb.buf, wb.buf, (int)N, (int)H, eps, ob.buf);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&xb);
    Py_RETURN_NONE;
}

/* attn_rows(h, att, rows, cos, sin, layer, layers, nh, kvh, D, scale, threads)
 *
 * h (N, (nh + 2 kvh) D) float32: each row's q, k, v before RoPE. att (N, nh D) float32: written
 * for the rows listed. rows (S, 5) int64: per row [row, position, k cache address, v cache
 * address, cache capacity]; the caches are C-contiguous float32, keys (layers, kvh, D, capacity)
 * and values (layers, kvh, capacity, D), that the caller keeps alive for the call. A prompt chunk
 * lists all its rows: each row's k, v are written first, then each row attends to positions
 * 0..its own. cos, sin (C, D / 2) float32 by position. A row's result depends on its position
 * and its cache only: not on the other rows listed, their number, or the threads. */
PyObject *sk_py_attn_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) return PyErr_Format(PyExc_TypeError, "attn_rows takes 12 arguments");
    long long li = PyLong_AsLongLong(args[5]), L = PyLong_AsLongLong(args[6]);
    long long nh = PyLong_AsLongLong(args[7]), kvh = PyLong_AsLongLong(args[8]), D = PyLong_AsLongLong(args[9]);
    double scale = PyFloat_AsDouble(args[10]);
    long long threads = PyLong_AsLongLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (li < 0 || li >= L || L > INT32_MAX || kvh <= 0 || nh <= 0 || nh % kvh || D <= 0 || D % 2 || D > 1024
        || nh > 4096 || threads < 1)
        return PyErr_Format(PyExc_ValueError, "attn_rows: bad shape (layer %lld of %lld, %lld/%lld heads of %lld, "
                            "%lld threads)", li, L, nh, kvh, D, threads);
    Py_buffer hb, ab, rb, cb, sb;
    if (buffer(args[0], &hb, 0, 0, "h", 'f') < 0) return NULL;
    int ok = 0;
    unsigned char *seen = NULL;
    if (buffer(args[1], &ab, 1, 0, "att", 'f') < 0) goto out_h;
    if (buffer(args[2], &rb, 0, 0, "rows", 'q') < 0) goto out_a;
    if (buffer(args[3], &cb, 0, 0, "cos", 'f') < 0) goto out_r;
    if (buffer(args[4], &sb, 0, 0, "sin", 'f') < 0) goto out_c;
    long long width = (nh + 2 * kvh) * D, N = hb.len / 4 / width, S = rb.len / 8 / 5;
    long long C = cb.len / 4 / (D / 2);
    const int64_t *seg = rb.buf;
    if (hb.len != (Py_ssize_t)(N * width * 4) || ab.len != (Py_ssize_t)(N * nh * D * 4)
        || rb.len != (Py_ssize_t)(S * 40) || sb.len != cb.len || S * nh > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "attn_rows: h, att, rows or the tables do not match the shape, "
                        "or rows x heads exceed 2^31");
        goto out_s;
    }
    seen = calloc((size_t)N + 1, 1);   /* a row listed twice would be written by two threads */
    if (!seen) {
        PyErr_NoMemory();
        goto out_s;
    }
    long long work = 0;
    for (long long i = 0; i < S; i++) {
        const int64_t *r = seg + 5 * i;
        if (r[0] < 0 || r[0] >= N || seen[r[0]] || r[1] < 0 || r[1] >= r[4] || r[1] >= C || r[4] > INT32_MAX
            || r[4] % 16 || !r[2] || !r[3]) {
            PyErr_Format(PyExc_ValueError, "attn_rows: row %lld at position %lld is out of range or listed twice",
                         (long long)r[0], (long long)r[1]);
            goto out_s;
        }
        seen[r[0]] = 1;
        work += (r[1] + 1) * nh * D;   /* at most S * C * 4096 * 1024: C is a table's length */
    }
    attn_job job = {(int)nh, (int)kvh, (int)D, (int)li, (int)width, (int)(D / 2), (int)(threads < 64 ? threads : 64), 1, NULL,
                    NULL, (float)scale, S, seg, hb.buf, cb.buf, sb.buf, ab.buf};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attn_run(&job, work);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto out_s;
    }
    ok = 1;
out_s:
    free(seen);
    PyBuffer_Release(&sb);
out_c:
    PyBuffer_Release(&cb);
out_r:
    PyBuffer_Release(&rb);
out_a:
    PyBuffer_Release(&ab);
out_h:
    PyBuffer_Release(&hb);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}
