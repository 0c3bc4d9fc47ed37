"""Linear layers in both precisions: y = x @ W^T for x (N, in) float32 -> y (N, out) float32.

- `Dense`: float32 weights (exact), kept transposed (in, out) for a row-major BLAS product.
- `QLinear`: one or more GGML block matrices sharing an input (fast). Matrices of one block type
  are fused into one (q, k and v rows: a ~10 MB copy for SmolLM2, one call instead of three);
  otherwise (K-quant files mix types) the input is quantized to 8-bit blocks once and the
  outputs are concatenated.
"""
from __future__ import annotations

import numpy as np

from . import quant
from .quant import QMatrix


class Dense:
    __slots__ = ("wt", "out")

    def __init__(self, *ws: np.ndarray):
        w = ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)     # (out, in)
        self.wt = np.ascontiguousarray(w.T, dtype=np.float32)          # (in, out)
        self.out = self.wt.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.wt                                              # (N, out)


class QLinear:
    __slots__ = ("parts", "out", "nbytes", "threads")

    def __init__(self, *parts: QMatrix, threads: int = 1):
        if len({p.cols for p in parts}) != 1:
            raise ValueError(f"fused matrices disagree on input size: {[p.cols for p in parts]}")
        self.parts = parts
        self.out = sum(p.rows for p in parts)
        self.nbytes = sum(p.nbytes for p in parts)
        self.threads = threads

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(self.parts) == 1:
            return self.parts[0](x, threads=self.threads)
        xq = quant.quantize_act(x)
        return np.concatenate([p(xq, threads=self.threads) for p in self.parts], axis=1)   # (N, out)


def linear(*ws, threads: int = 1) -> Dense | QLinear:
    """The layer type that fits the tensors: all QMatrix -> QLinear, all arrays -> Dense."""
    if all(isinstance(w, QMatrix) for w in ws):
        if len(ws) > 1 and len({(w.qtype, w.cols) for w in ws}) == 1:
            ws = (QMatrix(ws[0].qtype, np.concatenate([w.data for w in ws]), ws[0].cols),)
        return QLinear(*ws, threads=threads)
    return Dense(*[w.dequantize() if isinstance(w, QMatrix) else w for w in ws])
