/* A node's data-link loop in C: read `mlp` messages, compute the slice, write `mlp_out`.
 *
 * The Python path (datalink.py + fastframe.py + node.py) costs ~100-150 µs of interpreter time per
 * message on these machines, more than the wire and the slice's kernels together. This loop does
 * the same work for the one message that matters, with the GIL released:
 *
 *   wait (spin spin_s, then poll) -> read into the link's own buffer -> check prefix and fixed
 *   header exactly as datalink.parse_prefix, fastframe.decode and wire.check_semantics do ->
 *   sk_qmlp on the held slice -> one sendmsg of prefix + header + float64 partial
 *
 * and returns to Python when `budget_s` has passed (so the node looks at its control socket and
 * says it is alive), or when the message at the head of the buffer is anything else: another
 * kind, a msgpack header, a range the table does not hold, a message too large for the buffer,
 * or one that fails any check. Such a message is left unread, for the
 * Python path to read, decode, reject and log as it always has: this loop only ever takes a
 * message the Python path would accept with the same meaning (tests/test_linkloop.py checks
 * both on mutated messages).
 *
 * Buffer: the Python DataConn's bytearray, unread bytes at [start, end); the new (start, end) is
 * returned, so the two readers share it.
 *
 * Table (int64, rows of 4 + 4 * layers): epoch, start, end, whole (1: the node's whole holding of
 * that epoch, what an mlp with sub-range 0, 0 asks; 0: a sub-range a replica serves), then per
 * layer gate, up and down addresses and their types (gate | up << 8 | down << 16). The caller
 * keeps the arrays alive.
 */
#define _GNU_SOURCE
#include "_qkernels.h"

#ifdef _WIN32
static PyObject *posix_only(void)
{
    PyErr_SetString(PyExc_NotImplementedError, "the compiled data link needs POSIX sockets");
    return NULL;
}
PyObject *sk_py_link_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return posix_only(); }
PyObject *sk_py_link_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return posix_only(); }
PyObject *sk_py_link_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return posix_only(); }
PyObject *sk_py_link_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return posix_only(); }
#else

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0   /* macOS: Python ignores SIGPIPE anyway */
#endif
#define PREFIX 12
#define HEAD 40
#define MAGIC 0xC1
#define KIND_MLP 1
#define KIND_MLP_OUT 2
#define LIMIT62 (1ULL << 62)
#define IO_TIMEOUT_S 5.0      /* the rest of a started message, and a reply's write (as datalink.py) */
#define SLEEP_SLACK_S 60e-6   /* datalink.SLEEP_SLACK_S */

enum { ST_IDLE = 0, ST_OTHER = 1, ST_BROKEN = 2 };

typedef struct {
    int fd, version, f32, f64, hidden, layers, threads;
    uint8_t *buf;
    size_t cap, start, end, max_frame;
    const int64_t *table;
    size_t rows, width;
    double delay_s, spin_s;
    float *x;             /* aligned copy of the message's rows */
    double *y;            /* the partial */
    size_t xcap, ycap;
    const char *err;
    int err_no;
} loop_t;

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* datalink.pause: sleep to within SLEEP_SLACK_S of the end, then spin. */
static void pause_s(double s)
{
    double end = now_s() + s;
    if (s > SLEEP_SLACK_S) {
        double t = s - SLEEP_SLACK_S;
        struct timespec ts = {(time_t)t, (long)((t - (time_t)t) * 1e9)};
        while (nanosleep(&ts, &ts) && errno == EINTR) {}
    }
    while (now_s() < end) {}
}

/* Wait until the socket is readable (1), the deadline passes (0), or poll fails (-1). */
static int wait_in(loop_t *L, double deadline, double spin_s)
{
    struct pollfd p = {L->fd, POLLIN, 0};
    double spin_end = now_s() + spin_s;
    while (spin_s > 0 && now_s() < spin_end && now_s() < deadline) {
        int r = poll(&p, 1, 0);
        if (r) return r > 0 ? 1 : (errno == EINTR ? 0 : -1);
        sched_yield();
    }
    for (;;) {
        double left = deadline - now_s();
        if (left <= 0) return 0;
        int r = poll(&p, 1, (int)(left * 1000 + 0.999));
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

/* Read what has arrived, without waiting; unread bytes move to the front when the buffer's end
 * is reached. 1 if bytes came, 0 if none are there now (or the buffer is full of one message
 * larger than it), -1 broken (L->err). */
static int read_some(loop_t *L)
{
    for (;;) {
        if (L->end == L->cap) {
            if (!L->start) return 0;
            memmove(L->buf, L->buf + L->start, L->end - L->start);
            L->end -= L->start;
            L->start = 0;
        }
        ssize_t got = recv(L->fd, L->buf + L->end, L->cap - L->end, MSG_DONTWAIT);
        if (got > 0) {
            L->end += (size_t)got;
            return 1;
        }
        if (got == 0) {
            L->err = "closed by the peer";
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        L->err = "receive failed", L->err_no = errno;
        return -1;
    }
}

/* Buffer at least n unread bytes (n <= cap). 1 done, 0 deadline passed, -1 broken (L->err). */
static int fill(loop_t *L, size_t n, double deadline)
{
    while (L->end - L->start < n) {
        int r = read_some(L);
        if (r < 0) return -1;
        if (r == 0) {
            int w = wait_in(L, deadline, 0);
            if (w <= 0) {
                if (w < 0) L->err = "poll failed", L->err_no = errno;
                return w;
            }
        }
    }
    return 1;
}

static int send_all(loop_t *L, struct iovec *iov, int n, double timeout_s)
{
    double deadline = now_s() + timeout_s;
    struct msghdr m = {0};
    while (n) {
        m.msg_iov = iov;
        m.msg_iovlen = n;
        ssize_t sent = sendmsg(L->fd, &m, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                L->err = "send failed", L->err_no = errno;
                return -1;
            }
            struct pollfd p = {L->fd, POLLOUT, 0};
            double left = deadline - now_s();
            if (left <= 0 || poll(&p, 1, (int)(left * 1000 + 0.999)) == 0) {
                L->err = "send failed: timed out";
                return -1;
            }
            continue;
        }
        while (n && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

/* The table's row for neurons [s, e) of epoch (0, 0: the whole holding), or NULL. */
static const int64_t *held(const loop_t *L, uint64_t epoch, uint32_t s, uint32_t e)
{
    for (size_t i = 0; i < L->rows; i++) {
        const int64_t *r = L->table + i * L->width;
        if ((uint64_t)r[0] == epoch && ((s == 0 && e == 0) ? r[3] == 1 : (r[1] == s && r[2] == e))) return r;
    }
    return NULL;
}

/* The message at the head of the buffer (complete) is an mlp this loop serves: its row, else NULL. */
static const int64_t *servable(const loop_t *L, size_t body)
{
    const uint8_t *h = L->buf + L->start + PREFIX;
    uint32_t rows = rd32(h + 4), cols = rd32(h + 8), layer = rd32(h + 28), s = rd32(h + 32), e = rd32(h + 36);
    uint64_t step = rd64(h + 12), epoch = rd64(h + 20);
    if (h[0] != MAGIC || h[1] != L->version || h[2] != KIND_MLP || h[3] != L->f32) return NULL;
    if (step >= LIMIT62 || epoch >= LIMIT62 || rows == 0 || (int)cols != L->hidden || layer >= (uint32_t)L->layers)
        return NULL;
    if ((uint64_t)rows * cols * 4 != body || body > L->max_frame) return NULL;
    return held(L, epoch, s, e);
}

static int grow(void **p, size_t *cap, size_t need)
{
    if (need <= *cap) return 0;
    free(*p);
    *p = aligned_alloc(64, (need + 63) & ~(size_t)63);
    *cap = *p ? need : 0;
    return *p ? 0 : -1;
}

/* Serve the complete mlp at the head of the buffer. 0, or -1 (L->err). */
static int serve_one(loop_t *L, const int64_t *row, size_t body)
{
    const uint8_t *h = L->buf + L->start + PREFIX;
    uint32_t rows = rd32(h + 4), layer = rd32(h + 28);
    size_t ybytes = (size_t)rows * L->hidden * 8;
    if (grow((void **)&L->x, &L->xcap, body) || grow((void **)&L->y, &L->ycap, ybytes)) {
        L->err = "out of memory";
        return -1;
    }
    memcpy(L->x, h + HEAD, body);
    uint8_t out[PREFIX + HEAD];
    uint32_t pre[3] = {2, HEAD, (uint32_t)ybytes};
    memcpy(out, pre, PREFIX);
    memcpy(out + PREFIX, h, HEAD);   /* step, epoch, layer, rows, cols, sub-range echoed */
    out[PREFIX + 2] = KIND_MLP_OUT;
    out[PREFIX + 3] = (uint8_t)L->f64;
    L->start += PREFIX + HEAD + body;
    if (L->delay_s > 0) pause_s(L->delay_s);   /* the emulated one-way delay of the way in */
    const int64_t *w = row + 4 + 4 * (size_t)layer;
    int64_t types = w[3];
    sk_qslice sl = {(int)(types & 0xff), (int)((types >> 8) & 0xff), (int)((types >> 16) & 0xff),
                    (int)(row[2] - row[1]), L->hidden, (const uint8_t *)(uintptr_t)w[0],
                    (const uint8_t *)(uintptr_t)w[1], (const uint8_t *)(uintptr_t)w[2]};
    if (sk_qmlp(&sl, L->x, (int)rows, L->y, L->threads)) {
        L->err = "out of memory";
        return -1;
    }
    if (L->delay_s > 0) pause_s(L->delay_s);   /* ... and of the way out */
    struct iovec iov[2] = {{out, sizeof out}, {L->y, ybytes}};
    return send_all(L, iov, 2, IO_TIMEOUT_S);
}

/* The loop: ST_IDLE when the budget is spent, ST_OTHER with a message for Python at the head of
 * the buffer, ST_BROKEN (L->err) when the link cannot be used any more. */
static int run(loop_t *L, double budget_s, long long *served, long long *last_epoch)
{
    double t0 = now_s();
    for (;;) {
        double deadline = t0 + budget_s;
        if (L->spin_s > 0 && L->end - L->start < PREFIX) wait_in(L, deadline, L->spin_s);
        int r = fill(L, PREFIX, deadline);   /* nothing started: wait at most the budget */
        if (r <= 0) return r < 0 ? ST_BROKEN : ST_IDLE;
        const uint8_t *p = L->buf + L->start;
        uint32_t count = rd32(p), head = rd32(p + 4), body = rd32(p + 8);
        if (count != 2 || head != HEAD || body > L->cap - PREFIX - HEAD) return ST_OTHER;
        r = fill(L, PREFIX + HEAD + body, now_s() + IO_TIMEOUT_S);
        if (r <= 0) {
            if (r == 0) L->err = "receive failed: timed out";
            return ST_BROKEN;
        }
        const int64_t *row = servable(L, body);
        long long epoch = row ? (long long)rd64(L->buf + L->start + PREFIX + 20) : 0;
        if (!row || epoch < *last_epoch) return ST_OTHER;   /* Python drops epochs older than one served */
        *last_epoch = epoch;
        if (serve_one(L, row, body)) return ST_BROKEN;
        ++*served;
        if (now_s() - t0 >= budget_s) return ST_IDLE;
    }
}

PyObject *sk_py_link_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 15) {
        PyErr_Format(PyExc_TypeError, "link_serve: expected 15 arguments, got %zd", nargs);
        return NULL;
    }
    /* fd, buf, start, end, table, hidden, layers, max_frame, threads, budget_s, delay_s, spin_s,
     * version, f32 code, f64 code */
    long long iv[12];
    const int ints[] = {0, 2, 3, 5, 6, 7, 8, 12, 13, 14};
    for (int i = 0; i < 10; i++) {
        iv[i] = PyLong_AsLongLong(args[ints[i]]);
        if (iv[i] == -1 && PyErr_Occurred()) return NULL;
    }
    double budget = PyFloat_AsDouble(args[9]), delay = PyFloat_AsDouble(args[10]), spin = PyFloat_AsDouble(args[11]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer bb, tb;
    if (PyObject_GetBuffer(args[1], &bb, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[4], &tb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&bb);
        return NULL;
    }
    loop_t L = {(int)iv[0], (int)iv[7], (int)iv[8], (int)iv[9], (int)iv[3], (int)iv[4], (int)iv[6]};
    L.buf = bb.buf, L.cap = (size_t)bb.len, L.start = (size_t)iv[1], L.end = (size_t)iv[2];
    L.max_frame = (size_t)iv[5];
    size_t width = 4 + 4 * (size_t)(L.layers > 0 ? L.layers : 0);
    L.table = tb.buf, L.width = width, L.rows = (size_t)tb.len / (8 * width);
    L.delay_s = delay, L.spin_s = spin;
    if (L.start > L.end || L.end > L.cap || L.cap < PREFIX + HEAD || L.hidden <= 0 || L.hidden % 32
        || L.layers <= 0 || (size_t)tb.len % (8 * width) || L.fd < 0) {
        PyBuffer_Release(&tb);
        PyBuffer_Release(&bb);
        PyErr_SetString(PyExc_ValueError, "link_serve: bad arguments");
        return NULL;
    }
    long long served = 0, last_epoch = -1;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = run(&L, budget, &served, &last_epoch);
    Py_END_ALLOW_THREADS
    free(L.x);
    free(L.y);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&bb);
    PyObject *err = Py_None;
    if (L.err) {
        err = L.err_no ? PyUnicode_FromFormat("%s: %s", L.err, strerror(L.err_no)) : PyUnicode_FromString(L.err);
        if (!err) return NULL;
    } else {
        Py_INCREF(err);
    }
    return Py_BuildValue("(innLLN)", st, (Py_ssize_t)L.start, (Py_ssize_t)L.end, served, last_epoch, err);
}
/* ------------------------------------------------------------------ the server's side
 * link_send(fd, head, x, timeout_s): one `mlp` (prefix + fixed header `head`, 52 bytes, then x,
 * exactly the tensor bytes the prefix states) in one sendmsg, waiting at most timeout_s for
 * room: None, or why it failed.
 *
 * link_gather(fds, bufs, pos, subs, status, t, out, step, epoch, layer, N, H, version, f64,
 * max_frame, timeout_s, spin_s): wait up to timeout_s for one `mlp_out` from each link whose
 * status is 0, reading into each link's buffer (bufs[i], unread bytes at pos[i]). A reply that
 * carries exactly (step, epoch, layer), the sub-range asked (subs[i]; 0, 0: the whole holding),
 * N rows of H finite float64 is copied
 * to out[i], status 1, t[i] = seconds after the call began. Anything else at the head of a
 * buffer is left there for the Python path (status 2); a link that broke: status 3, and its
 * error in the returned tuple. Links still silent at the deadline keep status 0. */
typedef struct {
    loop_t L;
    int64_t *pos, *sub, *status;
    double *t;
    double *out;
} peer_t;

PyObject *sk_py_link_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "link_send(fd, head, x, timeout_s)");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    double timeout = PyFloat_AsDouble(args[3]);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer hb, xb;
    if (PyObject_GetBuffer(args[1], &hb, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &xb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&hb);
        return NULL;
    }
    if (hb.len != PREFIX + HEAD || rd32((const uint8_t *)hb.buf + 8) != (uint64_t)xb.len) {
        PyBuffer_Release(&xb);
        PyBuffer_Release(&hb);
        PyErr_SetString(PyExc_ValueError, "link_send: the header does not state x's byte length");
        return NULL;
    }
    loop_t L = {fd};
    struct iovec iov[2] = {{hb.buf, (size_t)hb.len}, {xb.buf, (size_t)xb.len}};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = send_all(&L, iov, xb.len ? 2 : 1, timeout);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&xb);
    PyBuffer_Release(&hb);
    if (!rc) Py_RETURN_NONE;
    return L.err_no ? PyUnicode_FromFormat("%s: %s", L.err, strerror(L.err_no)) : PyUnicode_FromString(L.err);
}

/* The reply at the head of P's buffer: 1 taken, 2 another message (left), 0 incomplete, -1 broken. */
static int take_reply(peer_t *P, uint64_t step, uint64_t epoch, uint32_t layer, uint32_t N)
{
    loop_t *L = &P->L;
    if (L->end - L->start < PREFIX) return 0;
    const uint8_t *p = L->buf + L->start;
    uint32_t count = rd32(p), head = rd32(p + 4), body = rd32(p + 8);
    if (count != 2 || head != HEAD || body > L->cap - PREFIX - HEAD) return 2;
    if (L->end - L->start < PREFIX + HEAD + body) return 0;
    const uint8_t *h = p + PREFIX;
    if (h[0] != MAGIC || h[1] != L->version || h[2] != KIND_MLP_OUT || h[3] != L->f64 || rd32(h + 4) != N
        || (int)rd32(h + 8) != L->hidden || rd64(h + 12) != step || rd64(h + 20) != epoch || rd32(h + 28) != layer
        || rd32(h + 32) != (uint64_t)P->sub[0] || rd32(h + 36) != (uint64_t)P->sub[1]
        || (size_t)N * L->hidden * 8 != body || body > L->max_frame)
        return 2;
    const double *y = (const double *)(h + HEAD);   /* unaligned reads via memcpy below */
    size_t n = (size_t)N * L->hidden;
    double v;
    for (size_t i = 0; i < n; i++) {
        memcpy(&v, (const char *)y + 8 * i, 8);
        if (!isfinite(v)) return 2;
    }
    memcpy(P->out, h + HEAD, body);
    L->start += PREFIX + HEAD + body;
    return 1;
}

/* Read what has arrived on P's socket without waiting: 0, or -1 broken (EOF, error). */
static int drain(peer_t *P)
{
    int r;
    while ((r = read_some(&P->L)) > 0) {}
    return r;
}

#define MAX_PEERS 64   /* fastpath.MAX_PEERS: more links take the Python path */

/* The wait both link_gather and link_call end with: one reply from each peer whose status is 0,
 * until the deadline (spinning first for spin seconds); arrival times are kept as seconds after t0. */
static void wait_replies(peer_t *P, Py_ssize_t k, uint64_t step, uint64_t epoch, uint32_t layer, uint32_t N,
                         double t0, double deadline, double spin)
{
    double spin_end = now_s() + spin;
    struct pollfd fds[MAX_PEERS];
    for (;;) {
        int waiting = 0;
        for (Py_ssize_t i = 0; i < k; i++) {
            peer_t *q = &P[i];
            if (*q->status) continue;
            int r = take_reply(q, step, epoch, layer, N);
            if (r == 0) {   /* read what came; a reply that came before an EOF still counts */
                int d = drain(q);
                r = take_reply(q, step, epoch, layer, N);
                if (r == 0 && d < 0) r = -1;
            }
            if (r == 1) *q->t = now_s() - t0;
            if (r) *q->status = r < 0 ? 3 : r;
            else fds[waiting++] = (struct pollfd){q->L.fd, POLLIN, 0};
        }
        double left = deadline - now_s();
        if (!waiting || left <= 0) break;
        if (now_s() < spin_end) {
            if (!poll(fds, waiting, 0)) sched_yield();
            continue;
        }
        if (poll(fds, waiting, (int)(left * 1000 + 0.999)) < 0 && errno != EINTR) break;
    }
}

/* The peers of a gather or a call: fds (list), bufs (list of writable buffers, held in bb until
 * release_peers), pos (k, 2), subs (k, 2), status (k,) int64, t (k,) float64 arrival times, out
 * (k, N, H) float64. 0, or -1 with an exception set and nothing held. */
typedef struct {
    Py_ssize_t k;
    Py_buffer pb, rb, sb, tb, ob, bb[MAX_PEERS];
    int held;        /* bb[0..held) */
    int64_t *pos;    /* the caller's positions, or NULL: pb's */
} peers_t;

static void release_peers(peers_t *S, peer_t *P)
{
    for (int i = 0; i < S->held; i++) {
        P[i].pos[0] = (int64_t)P[i].L.start, P[i].pos[1] = (int64_t)P[i].L.end;
        PyBuffer_Release(&S->bb[i]);
    }
    S->held = 0;
    PyBuffer_Release(&S->ob);
    PyBuffer_Release(&S->tb);
    PyBuffer_Release(&S->sb);
    PyBuffer_Release(&S->rb);
    if (!S->pos) PyBuffer_Release(&S->pb);
}

static int get_peers(peers_t *S, peer_t *P, PyObject *const *a, long long N, long long H, int version, int f64,
                     long long max_frame, Py_ssize_t t_len, int64_t *pos, const char *who)
{
    Py_ssize_t k = PyList_Check(a[0]) ? PyList_GET_SIZE(a[0]) : -1;
    S->held = 0;
    if (k < 0 || k > MAX_PEERS || !PyList_Check(a[1]) || PyList_GET_SIZE(a[1]) != k) {
        PyErr_Format(PyExc_ValueError, "%s: fds and bufs must be lists of one length", who);
        return -1;
    }
    S->k = k;
    S->pos = pos;
    if (!pos) {   /* else the caller keeps the positions itself */
        if (PyObject_GetBuffer(a[2], &S->pb, PyBUF_WRITABLE) < 0) return -1;
        pos = S->pb.buf;
    }
    if (PyObject_GetBuffer(a[3], &S->rb, PyBUF_SIMPLE) < 0) goto e0;
    if (PyObject_GetBuffer(a[4], &S->sb, PyBUF_WRITABLE) < 0) goto e1;
    if (PyObject_GetBuffer(a[5], &S->tb, PyBUF_WRITABLE) < 0) goto e2;
    if (PyObject_GetBuffer(a[6], &S->ob, PyBUF_WRITABLE) < 0) goto e3;
    if (N <= 0 || H <= 0 || (!S->pos && S->pb.len != 16 * k) || S->rb.len != 16 * k || S->sb.len != 8 * k
        || S->tb.len != t_len * k || S->ob.len != k * N * H * 8) {
        PyErr_Format(PyExc_ValueError, "%s: array sizes do not match", who);
        goto e4;
    }
    for (; S->held < k; S->held++) {
        int i = S->held;
        if (PyObject_GetBuffer(PyList_GET_ITEM(a[1], i), &S->bb[i], PyBUF_WRITABLE) < 0) goto e5;
        peer_t *q = &P[i];
        memset(q, 0, sizeof *q);
        q->L.fd = (int)PyLong_AsLong(PyList_GET_ITEM(a[0], i));
        q->pos = pos + 2 * i;
        q->sub = (int64_t *)S->rb.buf + 2 * i;
        q->status = (int64_t *)S->sb.buf + i;
        q->t = (double *)S->tb.buf + i;
        q->out = (double *)S->ob.buf + (size_t)i * N * H;
        q->L.buf = S->bb[i].buf, q->L.cap = (size_t)S->bb[i].len;
        q->L.start = (size_t)q->pos[0], q->L.end = (size_t)q->pos[1];
        q->L.version = version, q->L.f64 = f64, q->L.hidden = (int)H, q->L.max_frame = (size_t)max_frame;
        if (q->L.fd < 0 || q->L.start > q->L.end || q->L.end > q->L.cap || q->L.cap < PREFIX + HEAD) {
            PyBuffer_Release(&S->bb[i]);
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: bad link", who);
            goto e5;
        }
    }
    return 0;
e5:
    for (int i = 0; i < S->held; i++) PyBuffer_Release(&S->bb[i]);
    S->held = 0;
e4:
    PyBuffer_Release(&S->ob);
e3:
    PyBuffer_Release(&S->tb);
e2:
    PyBuffer_Release(&S->sb);
e1:
    PyBuffer_Release(&S->rb);
e0:
    if (!S->pos) PyBuffer_Release(&S->pb);
    return -1;
}

/* Each peer's error (None where it has none), as a tuple. */
static PyObject *peer_errors(peer_t *P, Py_ssize_t k)
{
    PyObject *errs = PyTuple_New(k);
    for (Py_ssize_t i = 0; errs && i < k; i++) {
        PyObject *e = P[i].L.err ? (P[i].L.err_no ? PyUnicode_FromFormat("%s: %s", P[i].L.err, strerror(P[i].L.err_no))
                                                  : PyUnicode_FromString(P[i].L.err))
                                 : (Py_INCREF(Py_None), Py_None);
        if (!e) {
            Py_DECREF(errs);
            return NULL;
        }
        PyTuple_SET_ITEM(errs, i, e);
    }
    return errs;
}

/* n integer arguments from args[0..n) into out: 0, or -1 with an exception set. */
static int int_args(PyObject *const *args, int n, long long *out)
{
    for (int i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

PyObject *sk_py_link_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 17) {
        PyErr_Format(PyExc_TypeError, "link_gather: expected 17 arguments, got %zd", nargs);
        return NULL;
    }
    long long iv[8];
    if (int_args(args + 7, 8, iv) < 0) return NULL;
    double timeout = PyFloat_AsDouble(args[15]), spin = PyFloat_AsDouble(args[16]);
    if (PyErr_Occurred()) return NULL;
    long long N = iv[3], H = iv[4];
    peers_t S;
    peer_t P[MAX_PEERS];
    if (get_peers(&S, P, args, N, H, (int)iv[5], (int)iv[6], iv[7], 8, NULL, "link_gather") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    double t0 = now_s();
    wait_replies(P, S.k, (uint64_t)iv[0], (uint64_t)iv[1], (uint32_t)iv[2], (uint32_t)N, t0, t0 + timeout, spin);
    Py_END_ALLOW_THREADS
    release_peers(&S, P);
    return peer_errors(P, S.k);
}

/* Each link's read position back to its DataConn (_start, _end). */
static int put_positions(PyObject *conns, const int64_t *pos, Py_ssize_t k, PyObject *s_start, PyObject *s_end)
{
    if (PyList_GET_SIZE(conns) != k) {   /* another thread changed the list while the GIL was released */
        PyErr_SetString(PyExc_RuntimeError, "link_call: the list of links changed during the call");
        return -1;
    }
    for (Py_ssize_t i = 0; i < 2 * k; i++) {
        PyObject *v = PyLong_FromLongLong(pos[i]);
        if (!v || PyObject_SetAttr(PyList_GET_ITEM(conns, i / 2), i % 2 ? s_end : s_start, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
        Py_DECREF(v);
    }
    return 0;
}

/* link_call(fds, bufs, conns, subs, status, t, out, heads, x, y, step, epoch, layer, N, H, version, f64,
 * max_frame, send_timeout_s, wait_timeout_s, spin_s): a whole call, link_send to every link and
 * link_gather over them, in one call from Python. conns: the links' DataConns, whose read
 * positions (_start, _end) into bufs this call reads and updates.
 *
 * heads: k * 52 writable bytes, each link's prefix and fixed header for an `mlp` of N rows of H
 * float32 (clink.link_head, in link order); this call writes (step, epoch, layer) into each.
 * x (N, H) float32 is sent to every link, each waiting at most send_timeout_s for room. t (2, k):
 * t[0][i] seconds after the call began that link i's send completed, t[1][i] that its reply came.
 * status as link_gather's, plus 4: link i's send failed. If any send fails nothing is waited for.
 * Otherwise the wait lasts up to wait_timeout_s after the call began; if every reply came (every
 * status 1), y (N, H) float32 gets their sum in link order (list the links in range order),
 * (p0 + p1) + p2 + ... in float64 rounded to float32 once, as calls.sum_parts, and the call
 * returns None. Else it returns each link's error (None where none), as a tuple. */
PyObject *sk_py_link_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 21) {
        PyErr_Format(PyExc_TypeError, "link_call: expected 21 arguments, got %zd", nargs);
        return NULL;
    }
    long long iv[8];
    if (int_args(args + 10, 8, iv) < 0) return NULL;
    double send_timeout = PyFloat_AsDouble(args[18]), timeout = PyFloat_AsDouble(args[19]);
    double spin = PyFloat_AsDouble(args[20]);
    if (PyErr_Occurred()) return NULL;
    long long N = iv[3], H = iv[4];
    if (N <= 0 || H <= 0 || N > UINT32_MAX || H > UINT32_MAX || N * H > (long long)(UINT32_MAX / 8)) {
        PyErr_SetString(PyExc_ValueError, "link_call: bad shape");
        return NULL;
    }
    static PyObject *s_start, *s_end;
    if (!s_start && !(s_start = PyUnicode_InternFromString("_start"))) return NULL;
    if (!s_end && !(s_end = PyUnicode_InternFromString("_end"))) return NULL;
    PyObject *conns = args[2];
    Py_ssize_t nc = PyList_Check(conns) ? PyList_GET_SIZE(conns) : -1;
    if (nc < 1 || nc > MAX_PEERS) {
        PyErr_SetString(PyExc_ValueError, "link_call: conns must be a list of 1 to 64 links");
        return NULL;
    }
    int64_t posv[2 * MAX_PEERS];
    for (Py_ssize_t i = 0; i < 2 * nc; i++) {   /* each link's unread bytes: buf[_start:_end] */
        PyObject *v = PyObject_GetAttr(PyList_GET_ITEM(conns, i / 2), i % 2 ? s_end : s_start);
        posv[i] = v ? PyLong_AsLongLong(v) : -1;
        Py_XDECREF(v);
        if (posv[i] < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "link_call: bad link position");
            return NULL;
        }
    }
    peers_t S;
    peer_t P[MAX_PEERS];
    Py_buffer hb, xb, yb;
    if (get_peers(&S, P, args, N, H, (int)iv[5], (int)iv[6], iv[7], 16, posv, "link_call") < 0) return NULL;
    Py_ssize_t k = S.k;
    if (k != nc) {
        PyErr_SetString(PyExc_ValueError, "link_call: conns and fds must be lists of one length");
        goto e0;
    }
    if (PyObject_GetBuffer(args[7], &hb, PyBUF_WRITABLE) < 0) goto e0;
    if (PyObject_GetBuffer(args[8], &xb, PyBUF_SIMPLE) < 0) goto e1;
    if (PyObject_GetBuffer(args[9], &yb, PyBUF_WRITABLE) < 0) goto e2;
    size_t nx = (size_t)N * (size_t)H;
    int bad = hb.len != k * (PREFIX + HEAD) || xb.len != (Py_ssize_t)(nx * 4) || yb.len != (Py_ssize_t)(nx * 4);
    for (Py_ssize_t i = 0; !bad && i < k; i++) {   /* each an `mlp` of this version, of x's shape, for subs[i] */
        const uint8_t *h = (const uint8_t *)hb.buf + i * (PREFIX + HEAD);
        bad = rd32(h) != 2 || rd32(h + 4) != HEAD || rd32(h + 8) != nx * 4 || h[PREFIX] != MAGIC
              || h[PREFIX + 1] != (uint8_t)iv[5] || h[PREFIX + 2] != KIND_MLP
              || rd32(h + PREFIX + 4) != (uint64_t)N || rd32(h + PREFIX + 8) != (uint64_t)H
              || rd32(h + PREFIX + 32) != (uint64_t)P[i].sub[0] || rd32(h + PREFIX + 36) != (uint64_t)P[i].sub[1];
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "link_call: the headers are not mlp headers of x's shape for each link's "
                        "sub-range, or y does not match x");
        goto e3;
    }
    uint64_t step = (uint64_t)iv[0], epoch = (uint64_t)iv[1];
    uint32_t layer = (uint32_t)iv[2];
    for (Py_ssize_t i = 0; i < k; i++) {
        uint8_t *h = (uint8_t *)hb.buf + i * (PREFIX + HEAD) + PREFIX;
        memcpy(h + 12, &step, 8);
        memcpy(h + 20, &epoch, 8);
        memcpy(h + 28, &layer, 4);
    }
    int all = 1;
    Py_BEGIN_ALLOW_THREADS
    double t0 = now_s();
    int failed = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        struct iovec iov[2] = {{(uint8_t *)hb.buf + i * (PREFIX + HEAD), PREFIX + HEAD}, {xb.buf, nx * 4}};
        *P[i].status = 0;
        P[i].t[k] = 0.0;
        if (send_all(&P[i].L, iov, nx ? 2 : 1, send_timeout)) {
            *P[i].status = 4;
            failed = 1;
        }
        P[i].t[0] = now_s() - t0;
    }
    for (Py_ssize_t i = 0; i < k; i++) P[i].t += k;   /* arrival times go to t[1] */
    if (!failed) wait_replies(P, k, step, epoch, layer, (uint32_t)N, t0, t0 + timeout, spin);
    for (Py_ssize_t i = 0; i < k; i++) all &= *P[i].status == 1;
    if (all) {
        float *y = yb.buf;
        const double *p0 = P[0].out;
        if (k == 1) {
            for (size_t e = 0; e < nx; e++) y[e] = (float)p0[e];
        } else {
            const double *p1 = P[1].out;
            for (size_t e = 0; e < nx; e++) {
                double s = p0[e] + p1[e];
                for (Py_ssize_t i = 2; i < k; i++) s += P[i].out[e];
                y[e] = (float)s;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&yb);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&hb);
    release_peers(&S, P);
    if (put_positions(conns, posv, k, s_start, s_end) < 0) return NULL;
    if (all) Py_RETURN_NONE;
    return peer_errors(P, k);
e3:
    PyBuffer_Release(&yb);
e2:
    PyBuffer_Release(&xb);
e1:
    PyBuffer_Release(&hb);
e0:
    release_peers(&S, P);
    return NULL;
}
#endif /* _WIN32 */
