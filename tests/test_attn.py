"""The fast precision's compiled per-row work (_attn.c): RMSNorm and each row's attention.

Each is checked bit for bit against its documented arithmetic written out in numpy float32 (so its
bits do not depend on the CPU or the vector width), near the float64 value, independent of the
other rows in the call, of where a prompt is cut into chunks and of the threads, and wired into the
model: in fast every row takes it, in exact none."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import expf_reference, load_model
from skynet import _qkernels
from skynet.mlp import LocalMLP
from skynet.model import Segment, _rope, rmsnorm

f32 = np.float32
# the attention's vector width follows the matmul kernels in use: 16 lanes with AVX-512, else 8
KERNELS = ["generic"] + [k for k in ("avx2", "avx512") if _qkernels.set_kernel(k) == k]
_qkernels.set_kernel("auto")


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Each kernel level this CPU runs, set for the test and restored after it."""
    assert _qkernels.set_kernel(request.param) == request.param
    yield request.param
    _qkernels.set_kernel("auto")


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Sum of squares in float64 over 8 lanes (lane l: i % 8 == l, in order), folded 4, 2, 1."""
    x64, h = x.astype(np.float64), x.shape[1]
    acc, full = np.zeros((x.shape[0], 8)), h - h % 8
    for i in range(0, full, 8):
        acc += x64[:, i:i + 8] * x64[:, i:i + 8]
    acc[:, :h - full] += x64[:, full:] * x64[:, full:]
    for s in (4, 2, 1):
        acc[:, :s] += acc[:, s:2 * s]
    inv = (1.0 / np.sqrt(acc[:, 0] / h + eps)).astype(f32)
    return x * inv[:, None] * w


def lanes_sum(e: np.ndarray) -> np.float32:
    """16 float32 lanes, lane l summing elements i % 16 == l in order, folded 8, 4, 2, 1."""
    acc, full = np.zeros(16, f32), e.size - e.size % 16
    for t in range(0, full, 16):
        acc = acc + e[t:t + 16]
    acc[:e.size - full] += e[full:]
    for s in (8, 4, 2, 1):
        acc[:s] += acc[s:2 * s]
    return acc[0]


def attend_reference(h, kt, v, p, cos, sin, nh, kvh, d, scale):
    """One row, as _attn.c documents it. h: the row's q, k, v before RoPE; kt (kvh, D, cap)
    and v (kvh, cap, D): the layer's cache, written at p here as C writes it."""
    half, grp, t = d // 2, nh // kvh, p + 1

    def rope(x):
        c, s = cos[p], sin[p]
        return np.concatenate([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])
    out = np.empty(nh * d, f32)
    for g in range(kvh):
        kt[g][:, p] = rope(h[(nh + g) * d:(nh + g + 1) * d])
        v[g][p] = h[(nh + kvh + g) * d:(nh + kvh + g + 1) * d]
        for j in range(g * grp, (g + 1) * grp):
            q = rope(h[j * d:(j + 1) * d])
            sc = np.zeros(t, f32)
            for i in range(d):                       # each score: the sum over d, in order
                sc = sc + q[i] * kt[g][i, :t]
            sc = sc * f32(scale)
            e = expf_reference(sc - sc.max())
            w = e * (f32(1.0) / lanes_sum(e))
            a, b = np.zeros(d, f32), np.zeros(d, f32)
            for u in range(0, t - 1, 2):             # even and odd keys summed apart, then added
                a = a + w[u] * v[g][u]
                b = b + w[u + 1] * v[g][u + 1]
            if t % 2:
                a = a + w[t - 1] * v[g][t - 1]
            out[j * d:(j + 1) * d] = a + b
    return out


def _tables(d: int, positions: int):
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    ang = np.arange(positions)[:, None] * inv[None, :]
    return np.cos(ang).astype(f32), np.sin(ang).astype(f32)


def _cache(rng, layers, kvh, d, cap):
    kt = rng.standard_normal((layers, kvh, d, cap), dtype=f32)
    return kt, rng.standard_normal((layers, kvh, cap, d), dtype=f32)


@pytest.mark.parametrize("h", [576, 64, 100, 7])
def test_rmsnorm_is_its_formula_bit_for_bit(h):
    rng = np.random.default_rng(h)
    x = (rng.standard_normal((5, h)) * rng.uniform(0.01, 100, (5, 1))).astype(f32)
    w = rng.uniform(0.5, 2, h).astype(f32)
    out = np.empty_like(x)
    _qkernels.rmsnorm(x, w, out, 5, h, 1e-5)
    assert np.array_equal(out, rmsnorm_reference(x, w, 1e-5))
    assert np.allclose(out, rmsnorm(x.astype(np.float64), w, 1e-5), rtol=1e-6, atol=0)
    one = np.empty((1, h), f32)
    for r in range(5):                               # a row's bits do not depend on the others
        _qkernels.rmsnorm(np.ascontiguousarray(x[r:r + 1]), w, one, 1, h, 1e-5)
        assert np.array_equal(one[0], out[r])


@pytest.mark.parametrize("nh,kvh,d,p", [(9, 3, 64, 0), (9, 3, 64, 16), (9, 3, 64, 200), (4, 4, 64, 130),
                                         (6, 2, 80, 57), (2, 1, 32, 300), (3, 1, 128, 127),
                                         (8, 1, 64, 100), (14, 2, 40, 45), (7, 1, 24, 33)])
def test_row_attention_is_its_formula_bit_for_bit(nh, kvh, d, p, kernel):
    rng = np.random.default_rng(p + d)
    layers, cap, li = 3, 320, 1
    cos, sin = _tables(d, 400)
    kt, v = _cache(rng, layers, kvh, d, cap)
    h = rng.standard_normal((2, (nh + 2 * kvh) * d), dtype=f32)
    att = np.full((2, nh * d), np.nan, f32)
    rows = np.array([[1, p, kt.ctypes.data, v.ctypes.data, cap]], np.int64)
    kt_ref, v_ref = kt[li].copy(), v[li].copy()
    _qkernels.attn_rows(h, att, rows, cos, sin, li, layers, nh, kvh, d, 1 / np.sqrt(d), 1)
    ref = attend_reference(h[1], kt_ref, v_ref, p, cos, sin, nh, kvh, d, 1 / np.sqrt(d))
    assert np.array_equal(att[1], ref) and np.isnan(att[0]).all()      # row 0 not listed: untouched
    assert np.array_equal(kt[li], kt_ref) and np.array_equal(v[li], v_ref)  # the cache write
    # near float64 softmax attention over the same (roped) keys
    q = _rope(h[1:, :nh * d].reshape(1, nh, d), cos[p][None, None], sin[p][None, None])[0].astype(np.float64)
    for j in range(nh):
        g = j // (nh // kvh)
        s = kt[li, g, :, :p + 1].T.astype(np.float64) @ q[j] / np.sqrt(d)
        e = np.exp(s - s.max())
        want = (e / e.sum()) @ v[li, g, :p + 1].astype(np.float64)
        assert np.allclose(att[1, j * d:(j + 1) * d], want, rtol=1e-4, atol=1e-5)


def test_rows_do_not_depend_on_each_other():
    rng = np.random.default_rng(1)
    nh, kvh, d, layers, cap = 9, 3, 64, 2, 64
    cos, sin = _tables(d, cap)
    caches = [_cache(rng, layers, kvh, d, cap) for _ in range(3)]
    h = rng.standard_normal((3, (nh + 2 * kvh) * d), dtype=f32)
    pos = [5, 63, 20]
    together, alone = np.empty((3, nh * d), f32), np.empty((3, nh * d), f32)
    snap = [(k.copy(), v.copy()) for k, v in caches]
    rows = np.array([[i, pos[i], k.ctypes.data, v.ctypes.data, cap] for i, (k, v) in enumerate(caches)], np.int64)
    _qkernels.attn_rows(h, together, rows, cos, sin, 1, layers, nh, kvh, d, 0.125, 2)
    for i, (k, v) in enumerate(snap):
        one = np.array([[0, pos[i], k.ctypes.data, v.ctypes.data, cap]], np.int64)
        _qkernels.attn_rows(np.ascontiguousarray(h[i:i + 1]), alone[i:i + 1], one, cos, sin, 1, layers, nh, kvh, d, 0.125, 1)
    assert np.array_equal(together, alone)


def test_prompt_rows_do_not_depend_on_the_chunks_or_the_threads(kernel):
    """A 300-row prompt attended in one call (1 and 3 threads), and cut into chunks of 1, 37 and
    the rest, give the same bits; each row equals the per-row reference at its position."""
    rng = np.random.default_rng(3)
    nh, kvh, d, layers, cap, n = 6, 2, 64, 1, 320, 300
    cos, sin = _tables(d, cap)
    h = rng.standard_normal((n, (nh + 2 * kvh) * d), dtype=f32)
    outs = []
    for threads, cuts in ((1, [0, n]), (3, [0, n]), (2, [0, 1, 38, n])):
        kt, v = np.zeros((layers, kvh, d, cap), f32), np.zeros((layers, kvh, cap, d), f32)
        att = np.empty((n, nh * d), f32)
        for a, b in zip(cuts, cuts[1:]):
            rows = np.array([[i - a, i, kt.ctypes.data, v.ctypes.data, cap] for i in range(a, b)], np.int64)
            _qkernels.attn_rows(np.ascontiguousarray(h[a:b]), att[a:b], rows, cos, sin, 0, layers, nh, kvh, d, 0.125, threads)
        outs.append(att)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    kt, v = np.zeros((kvh, d, cap), f32), np.zeros((kvh, cap, d), f32)
    for p in range(n):
        ref = attend_reference(h[p], kt, v, p, cos, sin, nh, kvh, d, 0.125)
        if p in (0, 1, 37, 130, 299):
            assert np.array_equal(outs[0][p], ref), p


def test_decode_rows_split_by_head_over_threads_keep_their_bits(kernel):
    """Fewer rows than 4 per thread (decode) are split by query head over the threads: each head
    is still computed whole by one thread, so the bits are those of one thread and of the reference."""
    rng = np.random.default_rng(5)
    nh, kvh, d, layers, cap = 9, 3, 64, 1, 1024
    cos, sin = _tables(d, cap)
    kt0, v0 = _cache(rng, layers, kvh, d, cap)
    h = rng.standard_normal((3, (nh + 2 * kvh) * d), dtype=f32)
    for positions in ([1000], [700, 701, 702]):
        outs = []
        for threads in (1, 2, 3):
            kt, v = kt0.copy(), v0.copy()
            att = np.empty((len(positions), nh * d), f32)
            rows = np.array([[i, p, kt.ctypes.data, v.ctypes.data, cap] for i, p in enumerate(positions)], np.int64)
            _qkernels.attn_rows(np.ascontiguousarray(h[:len(positions)]), att, rows, cos, sin, 0, layers, nh, kvh, d,
                                0.125, threads)
            outs.append(att)
        assert all(np.array_equal(outs[0], o) for o in outs[1:]), positions
        kt, v = kt0[0].copy(), v0[0].copy()
        for p in positions[:-1]:   # the earlier rows of the chunk write their k, v first
            attend_reference(h[positions.index(p)], kt, v, p, cos, sin, nh, kvh, d, 0.125)
        ref = attend_reference(h[len(positions) - 1], kt, v, positions[-1], cos, sin, nh, kvh, d, 0.125)
        assert np.array_equal(outs[0][-1], ref), positions


def test_attention_rejects_bad_input():
    rng = np.random.default_rng(2)
    nh, kvh, d, layers, cap = 4, 2, 32, 2, 16
    cos, sin = _tables(d, 32)
    kt, v = _cache(rng, layers, kvh, d, cap)
    h = np.zeros((1, (nh + 2 * kvh) * d), f32)
    att = np.empty((1, nh * d), f32)

    def call(row=0, p=3, layer=0, hh=h, a=att, heads=nh, threads=1, c=cap, table=cos, twice=False, dtype=np.int64):
        rows = np.array([[row, p, kt.ctypes.data, v.ctypes.data, c]] * (2 if twice else 1), dtype)
        _qkernels.attn_rows(hh, a, rows, table, sin if table is cos else table, layer, layers, heads, kvh, d, 0.1, threads)
    call()
    h2, att2 = np.zeros((2, h.shape[1]), f32), np.empty((2, att.shape[1]), f32)
    for bad in (dict(row=1), dict(row=-1), dict(p=cap), dict(p=-1), dict(layer=layers), dict(layer=-1),
                dict(hh=np.zeros((1, 5), f32)), dict(a=np.empty((1, 7), f32)), dict(heads=3), dict(threads=0),
                dict(c=12), dict(hh=h.astype(np.float64)), dict(a=att.astype(np.float64)), dict(dtype=np.float64),
                dict(table=cos[:3]), dict(hh=h2, a=att2, twice=True)):
        with pytest.raises(ValueError):
            call(**bad)
    with pytest.raises(ValueError):
        _qkernels.rmsnorm(np.zeros((2, 8), f32), np.ones(8, f32), np.empty((1, 8), f32), 2, 8, 1e-5)
    with pytest.raises(ValueError):
        _qkernels.rmsnorm(np.zeros((2, 8)), np.ones(8, f32), np.empty((2, 8), f32), 2, 8, 1e-5)


def test_fast_rows_take_the_compiled_path_and_agree_with_numpy(default_fast_model):
    """The same prompt run through C and through numpy (`compiled_attention` off): the k, v that
    layer 0 writes (same input there) have the same bits (RoPE is the same float32 expression) and
    the greedy tokens are the same. The logits differ by more than float32 noise:
    8-bit activations turn a last-bit difference into a whole quantization step now and then
    (measured: 0.4-1.3 on logits up to 38 over 30 tokens); a random-token prompt with a 0.05
    margin diverged at its 10th token."""
    m, prompt, steps = default_fast_model, [1, 9690, 2682, 314, 4649, 314, 253, 3575, 30], 12
    assert m.compiled_attention and m.new_cache(4).keys_t
    caches, outs = [], []
    for compiled in (True, False):
        m.compiled_attention = compiled
        try:
            cache = m.new_cache(len(prompt) + steps)
            logits = [m.forward(np.array(prompt), [Segment(cache, 0, len(prompt), 0)], LocalMLP(m.mlp_weights))]
            rows = m.rope_tables([Segment(cache, 0, 1, len(prompt))])
            assert (rows.compiled is not None) == compiled and (not rows.wide) == compiled
            for i in range(steps):
                tok = int(logits[-1][0].argmax())
                logits.append(m.forward(np.array([tok]), [Segment(cache, 0, 1, len(prompt) + i)], LocalMLP(m.mlp_weights)))
        finally:
            m.compiled_attention = True
        caches.append(cache)
        outs.append(np.concatenate(logits))
    p = len(prompt)
    assert np.array_equal(caches[0].k[0, :, :, :p + 1], caches[1].k[0, :, :, :p + 1])
    assert np.array_equal(caches[0].v[0, :, :p + 1], caches[1].v[0, :, :p + 1])
    assert list(outs[0].argmax(-1)) == list(outs[1].argmax(-1))
    assert float(np.abs(outs[0] - outs[1]).max()) <= 0.06 * float(np.abs(outs[1]).max())


def test_exact_keeps_numpy_and_its_cache_layout(tiny_model):
    m = load_model(tiny_model("llama"))
    assert not m.compiled_attention and not m.new_cache(4).keys_t
    assert m.rope_tables([Segment(m.new_cache(4), 0, 1, 2)]).compiled is None
