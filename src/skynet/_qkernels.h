/* What _qkernels.c, _link.c and _attn.c share (one extension module, skynet._qkernels). */
#ifndef SK_QKERNELS_H
#define SK_QKERNELS_H
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* Neurons [s, s + n) of one layer in GGML blocks: gate and up (n rows of H values), down (H rows
 * of n values); gt, ut, dt their ggml type ids. */
typedef struct {
    int gt, ut, dt;
    int n, H;
    const uint8_t *gate, *up, *down;
} sk_qslice;

/* A task of parts run by the kernels' thread pool (sk_parallel, _qkernels.c): 0, or -1 on failure. */
typedef int (*sk_task)(void *ctx, int part);
int sk_parallel(sk_task task, void *ctx, int parts, int threads);

/* x (N, H) float32 -> out (N, H) float64, the slice's partial; 0, or -1 when out of memory. */
int sk_qmlp(const sk_qslice *s, const float *x, int N, double *out, int threads);

/* e^x in float32 from IEEE + - * / and conversions only (Cody-Waite reduction by ln 2, a degree-6
 * polynomial): within 2 ulp of expf on [-87, 88]; x is clamped to that range, except that e^x
 * is inf where it overflows (x > 88.72), and NaN stays NaN. No
 * libm and no target-specific instruction, so its bits are the same on every CPU, compiler
 * vectorized or not (-ffp-contract=off), and loops over it vectorize (silu in _qkernels.c, softmax in _attn.c). */
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0
#error "sk_expf needs float expressions evaluated in float (SSE or NEON math, not x87)"
#endif
static inline float sk_expf(float x)
{
    int over = x > 88.72283935546875f;   /* e^x > FLT_MAX */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round(x / ln 2) */
    n = n == n ? n : 0.0f;   /* NaN: no float -> int conversion of it (the result is NaN anyway) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t e = ((int32_t)n + 127) * (1 << 23);
    float scale;
    memcpy(&scale, &e, 4);
    return over ? INFINITY : p * scale;
}

#define SK_LINK_SERVE_DOC \
    "link_serve(fd, buf, start, end, table, hidden, layers, max_frame, threads, budget_s, delay_s, spin_s," \
    " version, f32 code, f64 code) -> (status, start, end, served, highest epoch served, error): see _link.c"
PyObject *sk_py_link_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_link_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_link_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_link_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
int sk_kernel_level(void);   /* the matmul kernels in use (set_kernel): 0 generic, 1 AVX2, 2 AVX-512 */
/* _attn.c */
PyObject *sk_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_attn_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
#endif
