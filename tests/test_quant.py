"""skynet.quant: GGML block formats and the 8-bit-activation matmul against gguf-py and numpy."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

from skynet import _qkernels, quant  # noqa: E402
from skynet.quant import BLOCKS, QAct, QMatrix, QType  # noqa: E402

TYPES = list(BLOCKS)
FP16_FIELDS = {QType.Q4_0: [0], QType.Q4_1: [0, 2], QType.Q8_0: [0], QType.Q4_K: [0, 2],
               QType.Q5_K: [0, 2], QType.Q6_K: [208]}   # byte offsets of the fp16 scales in a block
KERNELS = ["generic"] + [k for k in ("avx2", "avx512") if _qkernels.set_kernel(k) == k]   # what this CPU runs
_qkernels.set_kernel("auto")


def random_blocks(rng, qtype, rows, cols, scale=0.01):
    """Random bytes with finite fp16 scale fields."""
    values, size = BLOCKS[qtype]
    b = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        h = (rng.standard_normal((rows, cols // values)) * scale).astype(np.float16)
        b[:, :, off:off + 2] = h.view(np.uint8).reshape(rows, cols // values, 2)
    return b.reshape(rows, -1)


@pytest.fixture(params=KERNELS)
def kernel(request):
    assert _qkernels.set_kernel(request.param) == request.param
    yield request.param
    _qkernels.set_kernel("auto")


def act_reference(x):
    xb = x.reshape(x.shape[0], -1, 32)
    d = np.abs(xb).max(-1) / np.float32(127)                                  # (N, K/32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int8)
    return q.reshape(x.shape), d, q.astype(np.int32).sum(-1)


def bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_gguf(qtype, rng=np.random.default_rng(1)):
    for scale in (0.01, 100.0):
        w = random_blocks(rng, qtype, 9, 512, scale)
        ours, ref = quant.dequantize(qtype, w), gguf_dequantize(w, gguf.GGMLQuantizationType(qtype))
        assert ours.shape == ref.shape == (9, 512)
        assert np.array_equal(bits(ours), bits(ref))
        assert np.array_equal(bits(QMatrix(qtype, w, 512).dequantize()), bits(ref))


def test_quantize_q8_0_matches_gguf():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 512)) * rng.uniform(1e-6, 1e3, (64, 1))).astype(np.float32)
    x[0, :32] = 0                                   # an all-zero block
    x[1, :32] = np.float32(1e-30)                   # fp16 scale underflows
    x[2, 32:64] = np.arange(32) - 15.5              # ties
    ref = gguf_quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quant.quantize_q8_0(x), ref)


def test_quantize_act_matches_reference(kernel):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 256)) * 3).astype(np.float32)
    x[0, :32] = 0
    x[1, 32:64] = (np.arange(32) - 16) * np.float32(0.5)      # exact halves: ties to even
    a = quant.quantize_act(x)
    q, d, s = act_reference(x)
    assert np.array_equal(a.q, q) and np.array_equal(bits(a.d), bits(d)) and np.array_equal(a.s, s)
    assert a.q.dtype == np.int8 and a.d.dtype == np.float32 and a.s.dtype == np.int32


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("cols", [256, 512, 768])
def test_matmul_matches_float64_reference(qtype, cols, kernel):
    rng = np.random.default_rng(cols + qtype)
    w = random_blocks(rng, qtype, 40, cols)
    m = QMatrix(qtype, w, cols)
    wf = quant.dequantize(qtype, w).astype(np.float64)
    for n in (1, 3, 64):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        a = quant.quantize_act(x)
        ref = (a.q * np.repeat(a.d, 32, axis=1).astype(np.float64)) @ wf.T         # (n, 40)
        tol = 1e-6 * np.abs(ref).max()
        for dtype in (np.float32, np.float64):
            for y in (m(x, dtype=dtype), m(a, dtype=dtype)):
                assert y.dtype == dtype and y.shape == (n, 40)
                np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("qtype", TYPES)
def test_result_independent_of_batch_and_threads(qtype, kernel):
    rng = np.random.default_rng(qtype)
    cols = 768
    m = QMatrix(qtype, random_blocks(rng, qtype, 53, cols), cols)
    x = rng.standard_normal((37, cols)).astype(np.float32)
    for dtype in (np.float32, np.float64):
        full = m(x, dtype=dtype)
        assert np.array_equal(bits(full), bits(m(x, dtype=dtype, threads=2)))
        assert np.array_equal(bits(full), bits(m(quant.quantize_act(x), dtype=dtype, threads=3)))
        for i in (0, 5, 36):
            assert np.array_equal(bits(full[i:i + 1]), bits(m(x[i:i + 1], dtype=dtype)))
        assert np.array_equal(bits(full[4:11]), bits(m(x[4:11], dtype=dtype)))
        assert np.array_equal(bits(full[:, 7:20]), bits(m.take_rows(7, 20)(x, dtype=dtype)))
        assert np.array_equal(bits(full), bits(m(x, dtype=dtype)))                 # run to run


@pytest.mark.skipif(len(KERNELS) < 2, reason="only the generic kernel on this CPU")
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("cols", [256, 1536])
def test_paths_bit_identical(qtype, cols):
    """Every kernel path computes the same canonical float64 sum: both output dtypes bit-identical,
    whatever the batch, the tiling (row ranges) and the thread count."""
    rng = np.random.default_rng(10 + qtype + cols)
    m = QMatrix(qtype, random_blocks(rng, qtype, 37, cols), cols)
    x = rng.standard_normal((37, cols)).astype(np.float32)
    x[3, :64] = 0                                           # zero activation blocks
    xq = quant.quantize_act(x)
    ref = {}
    for k in KERNELS:
        assert _qkernels.set_kernel(k) == k
        try:
            for dtype in (np.float32, np.float64):
                full = m(x, dtype=dtype)
                if dtype not in ref:
                    ref[dtype] = full
                assert np.array_equal(bits(full), bits(ref[dtype])), (k, dtype)
                assert np.array_equal(bits(full), bits(m(xq, dtype=dtype, threads=2)))
                for n0, n1 in ((0, 1), (36, 37), (4, 11), (1, 4), (6, 10), (5, 10), (2, 10), (0, 17), (1, 19), (2, 34), (0, 16), (3, 16), (0, 33), (3, 9), (2, 26), (0, 25)):
                    assert np.array_equal(bits(full[n0:n1]), bits(m(x[n0:n1], dtype=dtype))), (k, n0, n1)
                for r0, r1 in ((0, 1), (3, 20), (9, 37), (30, 36)):
                    assert np.array_equal(bits(full[:, r0:r1]), bits(m.take_rows(r0, r1)(x, dtype=dtype)))
                    assert np.array_equal(bits(full[:1, r0:r1]), bits(m.take_rows(r0, r1)(x[:1], dtype=dtype)))
            assert np.array_equal(bits(ref[np.float32]), bits(ref[np.float64].astype(np.float32)))  # (float) of the sum
        finally:
            _qkernels.set_kernel("auto")


@pytest.mark.skipif(len(KERNELS) < 2, reason="only the generic kernel on this CPU")
@pytest.mark.parametrize("qtype", TYPES)
def test_paths_bit_identical_extreme_scales(qtype):
    """SIMD kernels regroup products that are exact in double; with any finite fp16 scale (subnormal
    to 65504, either sign) and activations from 1e-30 to 1e30 they must still match generic C."""
    rng = np.random.default_rng(30 + qtype)
    cols, rows = 512, 24
    w = random_blocks(rng, qtype, rows, cols).reshape(rows, cols // BLOCKS[qtype][0], -1)
    for off in FP16_FIELDS[qtype]:
        h = rng.integers(0, 0x7c00, w.shape[:2], dtype=np.uint16) | (rng.integers(0, 2, w.shape[:2], dtype=np.uint16) << 15)
        w[:, :, off:off + 2] = h.view(np.uint8).reshape(*w.shape[:2], 2)
    m = QMatrix(qtype, np.ascontiguousarray(w.reshape(rows, -1)), cols)
    x = (rng.standard_normal((21, cols)) * 10.0 ** rng.uniform(-30, 30, (21, 1))).astype(np.float32)
    outs = {}
    for k in KERNELS:
        assert _qkernels.set_kernel(k) == k
        try:
            outs[k] = [m(x[a:b], dtype=np.float64) for a, b in ((0, 21), (0, 1), (3, 20))]
        finally:
            _qkernels.set_kernel("auto")
    for k in KERNELS[1:]:
        for got, ref in zip(outs[k], outs["generic"]):
            assert np.array_equal(bits(got), bits(ref)), k


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_bit_identical(qtype, kernel):
    """Shapes big enough to start threads: every thread count and batch gives the same bits."""
    rng = np.random.default_rng(20 + qtype)
    cols = 512
    m = QMatrix(qtype, random_blocks(rng, qtype, 301, cols), cols)
    x = rng.standard_normal((45, cols)).astype(np.float32)
    for dtype in (np.float32, np.float64):
        one = m(x, dtype=dtype)
        for t in (2, 3, 8):
            assert np.array_equal(bits(one), bits(m(x, dtype=dtype, threads=t))), t
        assert np.array_equal(bits(one[:17]), bits(m(x[:17], dtype=dtype, threads=2)))
        assert np.array_equal(bits(one[:1]), bits(m(x[:1], dtype=dtype, threads=2)))



@pytest.mark.parametrize("qtype", TYPES)
def test_pool_decode_rows_bit_identical(qtype, kernel):
    """One- to three-row calls big enough to go to the persistent workers, repeated (the workers
    spin, then sleep between calls) and from 3 Python threads at once (one holds the pool, the
    others run alone): the same bits as one thread."""
    import threading
    import time
    rng = np.random.default_rng(40 + qtype)
    cols = 512
    m = QMatrix(qtype, random_blocks(rng, qtype, 1024, cols), cols)
    xs = [rng.standard_normal((n, cols)).astype(np.float32) for n in (1, 2, 3)]
    ref = [m(x, dtype=np.float64) for x in xs]
    for i in range(6):
        for x, r in zip(xs, ref):
            assert np.array_equal(bits(r), bits(m(x, dtype=np.float64, threads=2)))
        if i == 3:
            time.sleep(0.01)   # past the spin: the workers block and are woken
    bad = []

    def hammer():
        for _ in range(20):
            for x, r in zip(xs, ref):
                if not np.array_equal(bits(r), bits(m(x, dtype=np.float64, threads=3))):
                    bad.append(x.shape)
    ts = [threading.Thread(target=hammer) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_pool_after_fork():
    """A child forked after the workers started gets a pool of its own that works."""
    import multiprocessing as mp
    rng = np.random.default_rng(7)
    m = QMatrix(QType.Q4_1, random_blocks(rng, QType.Q4_1, 1024, 512), 512)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    ref = m(x, threads=2)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(m.__call__, (x,), {"threads": 2})
    assert np.array_equal(bits(ref), bits(got))

def test_take_cols_and_rows():
    rng = np.random.default_rng(4)
    for qtype in (QType.Q4_1, QType.Q6_K):
        m = QMatrix(qtype, random_blocks(rng, qtype, 6, 768), 768)
        full = m.dequantize()
        assert np.array_equal(m.take_cols(256, 768).dequantize(), full[:, 256:])
        assert np.array_equal(m.take_rows(2, 5).dequantize(), full[2:5])
        assert m.take_rows(2, 5).data.base is not None                           # a view
        with pytest.raises(ValueError):
            m.take_cols(16, 256)
        with pytest.raises(ValueError):
            m.take_rows(3, 9)


def test_read_only_memmap(tmp_path):
    rng = np.random.default_rng(5)
    w = random_blocks(rng, QType.Q8_0, 10, 64)
    w.tofile(tmp_path / "w.bin")
    mm = np.memmap(tmp_path / "w.bin", np.uint8, "r", shape=w.shape)
    m = QMatrix(QType.Q8_0, mm, 64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert np.array_equal(m(x), QMatrix(QType.Q8_0, w, 64)(x))


def test_bad_input_raises():
    rng = np.random.default_rng(6)
    w = random_blocks(rng, QType.Q4_0, 4, 64)
    m = QMatrix(QType.Q4_0, w, 64)
    bad = [
        lambda: QMatrix(QType.Q4_0, w, 48),                         # cols not a block multiple
        lambda: QMatrix(QType.Q4_0, w, 96),                         # wrong row_bytes
        lambda: QMatrix(QType.Q4_0, w.astype(np.int8), 64),         # wrong dtype
        lambda: QMatrix(QType.F32, w, 64),                          # not a block type
        lambda: QMatrix(QType.Q4_K, w, 64),
        lambda: m(np.zeros((2, 64), np.float64)),                   # wrong x dtype
        lambda: m(np.zeros((2, 32), np.float32)),                   # wrong x width
        lambda: m(np.zeros((2, 128), np.float32)[:, ::2]),          # not contiguous
        lambda: m(np.zeros((2, 64), np.float32), out=np.zeros((2, 4), np.float16)),
        lambda: m(np.zeros((2, 64), np.float32), out=np.zeros((3, 4), np.float32)),
        lambda: m(quant.quantize_act(np.zeros((2, 96), np.float32))),
        lambda: m.take_cols(0, 48),
        lambda: quant.quantize_act(np.zeros((2, 48), np.float32)),
        lambda: quant.dequantize(QType.Q4_0, w[:, :17].copy()),
        lambda: quant.quantize_q8_0(np.zeros((2, 48), np.float32)),
        lambda: quant.row_bytes(QType.Q6_K, 100),
    ]
    for fn in bad:
        with pytest.raises(ValueError):
            fn()


def test_formats_as_data():
    assert quant.row_bytes(QType.Q4_1, 576) == 18 * 20
    assert quant.kernel_name() in ("avx512", "avx2", "generic") and quant.kernel_name() == KERNELS[-1]
    for t, (values, size) in BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] == (values, size)
    a = quant.quantize_act(np.ones((1, 32), np.float32))
    assert isinstance(a, QAct) and a.q.tolist() == [[127] * 32] and a.s.tolist() == [[127 * 32]]
