/* What _qkernels.c and _link.c share (one extension module, skynet._qkernels). */
#ifndef SK_QKERNELS_H
#define SK_QKERNELS_H
#include <Python.h>
#include <stdint.h>

/* Neurons [s, s + n) of one layer in GGML blocks: gate and up (n rows of H values), down (H rows
 * of n values); gt, ut, dt their ggml type ids. */
typedef struct {
    int gt, ut, dt;
    int n, H;
    const uint8_t *gate, *up, *down;
} sk_qslice;

/* x (N, H) float32 -> out (N, H) float64, the slice's partial; 0, or -1 when out of memory. */
int sk_qmlp(const sk_qslice *s, const float *x, int N, double *out, int threads);

#define SK_LINK_SERVE_DOC \
    "link_serve(fd, buf, start, end, table, hidden, layers, max_frame, threads, budget_s, delay_s, spin_s," \
    " version, f32 code, f64 code) -> (status, start, end, served, highest epoch served, error): see _link.c"
PyObject *sk_py_link_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_link_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_py_link_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
#endif
