"""GGML block formats and the "fast" matmul: y = x @ W.T with W kept in its quantized blocks.

A weight matrix W (rows, cols) is `rows` rows of cols / V blocks of V values (`BLOCKS[qtype]`),
a uint8 array (rows, row_bytes), exactly as a GGUF file stores it. Per block (fp16 scales):

    Q4_0  w = d * (n - 8)           n in 0..15          Q4_K  w = d * sc_j * n - dmin * m_j   (j: 32 values)
    Q4_1  w = d * n + m             n in 0..15          Q5_K  the same, n in 0..31
    Q8_0  w = d * n                 n in -128..127      Q6_K  w = d * sc_k * (n - 32)      (k: 16 values)

Activations x (N, K) are quantized per row in blocks of 32 right before the matmul (`QAct`):
d = max|x_b| / 127 (float32), q = round-half-even(x_b / d) (int8, 0 when d == 0), s = sum(q).
Then per weight block and activation block the dot product is an exact integer sum scaled once:

    Q4_0: d*dx * sum((n-8) q)       Q4_1: d*dx * sum(n q) + m*dx * s        Q8_0: d*dx * sum(n q)
    Q4_K, Q5_K: d*dx * sc_j*sum(n q) - dmin*dx * m_j*s       Q6_K: d*dx * sum_k sc_k*sum(n q)

Canonical arithmetic, the same on every kernel path and CPU: per (weight block, activation block)
the integer sum is exact (int32) and the term is formed in float64 by the fixed formula above
(d, m, dx widened to double; d*dx is exact), terms are added in float64 in block order, and float32
output is the float64 sum rounded once. No FMA contraction (built with -ffp-contract=off; SIMD
kernels regroup only products that are exact in double, which yields the same double). So any
(weight row, activation row) result is bit-identical whatever the other rows in the call, the
thread count, the tiling, and the path: generic C, AVX2, or AVX-512 VNNI (every format). The C
kernels (skynet._qkernels) pick the best path at run time with __builtin_cpu_supports;
SKYNET_KERNEL=generic|avx2|avx512 caps it (for tests/benches). threads > 1 hands chunks of weight
rows to threads - 1 persistent POSIX workers (none on Windows builds; calls under 256K
multiply-adds or 64 rows stay on the calling thread); idle workers spin up to ~200 µs, yielding
the core, then block, so an idle process burns no core.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from . import _qkernels as _k


class QType(enum.IntEnum):
    """GGML type ids."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14


BLOCKS: dict[QType, tuple[int, int]] = {   # qtype -> (values per block, bytes per block)
    QType.Q4_0: (32, 18),
    QType.Q4_1: (32, 20),
    QType.Q8_0: (32, 34),
    QType.Q4_K: (256, 144),
    QType.Q5_K: (256, 176),
    QType.Q6_K: (256, 210),
}
ACT_BLOCK = 32


def kernel_name() -> str:
    """"avx512", "avx2" or "generic": the kernel set the run-time dispatch chose."""
    return _k.kernel_name()


def _qtype(qtype) -> QType:
    try:
        t = QType(int(qtype))
    except ValueError:
        raise ValueError(f"unknown ggml type {qtype!r}") from None
    if t not in BLOCKS:
        raise ValueError(f"{t.name} is not a block-quantized type")
    return t


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one row of `cols` values."""
    values, size = BLOCKS[_qtype(qtype)]
    if cols < 0 or cols % values:
        raise ValueError(f"{QType(qtype).name}: {cols} values is not a multiple of the block ({values})")
    return cols // values * size


def _u8_rows(data: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (1, 2):
        raise ValueError(f"{what}: expected a 1-D or 2-D uint8 array, got {getattr(data, 'dtype', type(data))}"
                         f" {getattr(data, 'shape', '')}")
    if not data.flags.c_contiguous:
        raise ValueError(f"{what}: rows must be C-contiguous")
    return data


def dequantize(qtype, data: np.ndarray) -> np.ndarray:
    """uint8 (..., row_bytes) -> float32 (..., cols); bit-identical to gguf.quants.dequantize."""
    t = _qtype(qtype)
    data = _u8_rows(data, "dequantize")
    values, size = BLOCKS[t]
    if data.shape[-1] % size:
        raise ValueError(f"{t.name}: row of {data.shape[-1]} bytes is not a multiple of {size}")
    cols = data.shape[-1] // size * values
    rows = data.shape[0] if data.ndim == 2 else 1
    out = np.empty(data.shape[:-1] + (cols,), np.float32)
    if out.size:
        _k.dequantize(int(t), data, out, rows, cols)
    return out


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """float32 (..., C) -> Q8_0 blocks uint8 (..., C / 32 * 34); bit-identical to gguf.quants.quantize."""
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim < 1:
        raise ValueError(f"quantize_q8_0: expected a float32 array, got {getattr(w, 'dtype', type(w))}")
    if w.shape[-1] % 32:
        raise ValueError(f"quantize_q8_0: {w.shape[-1]} columns is not a multiple of 32")
    w = np.ascontiguousarray(w)
    out = np.empty(w.shape[:-1] + (w.shape[-1] // 32 * 34,), np.uint8)
    _k.quantize_q8_0(w, out, w.size)
    return out


@dataclass(slots=True)
class QAct:
    """Activations x (N, K) in 8-bit blocks of 32: x[n, 32b + i] ~= d[n, b] * q[n, 32b + i]."""
    q: np.ndarray   # (N, K) int8, in -127..127
    d: np.ndarray   # (N, K/32) float32
    s: np.ndarray   # (N, K/32) int32, sum of each block's q

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _check_x(x, cols: int | None = None) -> None:
    """Raise ValueError unless x is a C-contiguous float32 (N, cols) array, cols a multiple of 32."""
    if not isinstance(x, np.ndarray) or x.dtype != _F32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous float32 (N, K) array, got {getattr(x, 'dtype', type(x))} "
                         f"{getattr(x, 'shape', '')}")
    k = x.shape[1]
    if cols is not None and k != cols:
        raise ValueError(f"x has {k} columns, the matrix {cols}")
    if k % ACT_BLOCK:
        raise ValueError(f"x has {k} columns, not a multiple of {ACT_BLOCK}")


def quantize_act(x: np.ndarray) -> QAct:
    """float32 (N, K) C-contiguous -> QAct."""
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 2 or x.shape[1] % ACT_BLOCK:
        _check_x(x)
    n, k = x.shape
    q, d, s = np.empty((n, k), np.int8), np.empty((n, k // ACT_BLOCK), np.float32), np.empty((n, k // ACT_BLOCK), np.int32)
    _k.quantize_act(x, q, d, s, n, k)   # raises ValueError if x is not C-contiguous
    return QAct(q, d, s)


def _out(out, n: int, rows: int, dtype) -> tuple[np.ndarray, bool]:
    """The output array (N, rows) and whether it is float64."""
    if out is None:
        out = np.empty((n, rows), dtype)
    if out.dtype is _F32 or out.dtype is _F64:
        f64 = out.dtype is _F64
    elif out.dtype in (_F32, _F64):
        f64 = out.dtype == _F64
    else:
        raise ValueError(f"out must be float32 or float64, got {out.dtype}")
    if out.shape != (n, rows):
        raise ValueError(f"out {out.shape}, expected {(n, rows)}")
    return out, f64


class QMatrix:
    """W (rows, cols) in GGML blocks; y = x @ W.T."""

    __slots__ = ("qtype", "rows", "cols", "data", "nbytes", "_ptr", "_t")

    def __init__(self, qtype, data: np.ndarray, cols: int):
        self.qtype = _qtype(qtype)
        rb = row_bytes(self.qtype, cols)
        data = _u8_rows(data, "QMatrix")
        if data.ndim != 2 or data.shape[1] != rb:
            raise ValueError(f"{self.qtype.name} ({cols} cols): data {data.shape}, expected (rows, {rb})")
        self.rows, self.cols, self.data, self.nbytes = data.shape[0], cols, data, data.nbytes
        self._ptr = data.__array_interface__["data"][0]   # `data` stays referenced: the pointer is valid
        self._t = int(self.qtype)

    def __repr__(self) -> str:
        return f"QMatrix({self.qtype.name}, {self.rows}x{self.cols})"

    def __call__(self, x: np.ndarray | QAct, out: np.ndarray | None = None, dtype=np.float32,
                 threads: int = 1) -> np.ndarray:
        """x (N, cols) float32 or QAct -> (N, rows), float32 or float64 (`dtype`, or out's dtype).

        threads > 1 splits the rows over that many threads; results do not depend on it."""
        if type(x) is QAct:
            n = x.q.shape[0]
            if x.q.shape[1] != self.cols or x.d.shape != (n, self.cols // ACT_BLOCK) or x.s.shape != x.d.shape:
                raise ValueError(f"QAct {x.q.shape} does not match the matrix's {self.cols} columns")
            out, f64 = _out(out, n, self.rows, dtype)
            if self.cols:
                _k.mmq(self._t, self._ptr, self.rows, self.cols, x.q, x.d, x.s, out, n, f64, threads)
            else:
                out.fill(0)
            return out
        if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 2 or x.shape[1] != self.cols:
            _check_x(x, self.cols)
        n = x.shape[0]
        out, f64 = _out(out, n, self.rows, dtype)
        if self.cols:
            _k.mm(self._t, self._ptr, self.rows, self.cols, x, out, n, f64, threads)   # checks contiguity
        else:
            out.fill(0)
        return out

    def take_rows(self, s: int, e: int) -> "QMatrix":
        """A view of rows [s, e)."""
        if not 0 <= s <= e <= self.rows:
            raise ValueError(f"rows [{s}, {e}) out of [0, {self.rows})")
        return QMatrix(self.qtype, self.data[s:e], self.cols)

    def take_cols(self, s: int, e: int) -> "QMatrix":
        """A copy of columns [s, e); both on block boundaries."""
        values = BLOCKS[self.qtype][0]
        if not 0 <= s <= e <= self.cols or s % values or e % values:
            raise ValueError(f"columns [{s}, {e}) of {self.cols} must lie on {values}-value block boundaries")
        a, b = row_bytes(self.qtype, s), row_bytes(self.qtype, e)
        return QMatrix(self.qtype, np.ascontiguousarray(self.data[:, a:b]), e - s)

    def dequantize(self) -> np.ndarray:
        """float32 (rows, cols)."""
        return dequantize(self.qtype, self.data)


def qmlp(x: np.ndarray, gate: QMatrix, up: QMatrix, down: QMatrix, threads: int = 1) -> np.ndarray:
    """One MLP slice in blocks: x (N, H) float32 -> down @ (silu(gate @ x) * (up @ x)), (N, H) float64.

    Activations are quantized to 8-bit blocks before gate/up (once) and before down; silu(g) * u
    is g / (1 + exp(-g)) * u in float32, one rounding per operation."""
    n, h = gate.rows, gate.cols
    if not (up.rows == down.cols == n and up.cols == down.rows == h):
        raise ValueError(f"slice shapes: gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, "
                         f"down {down.rows}x{down.cols}")
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 2 or x.shape[1] != h \
            or not x.flags.c_contiguous:
        _check_x(x, h)
    out = np.empty((x.shape[0], h), np.float64)
    _k.qmlp(x, out, x.shape[0], h, n, gate._ptr, gate._t, up._ptr, up._t, down._ptr, down._t, threads)
    return out
