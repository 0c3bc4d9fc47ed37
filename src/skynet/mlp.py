"""MLP slices: the math a node (or the server) runs for its neuron range.

For neurons r = [s, e) of one layer:

    partial(x) = down[:, r] @ (silu(gate[r] @ x) * up[r] @ x)        # (N, H)

and the full MLP output is the sum of the partials over a partition of [0, I). gate and up rows
are fused into one (H, 2n) matrix so a step is two matmuls; down travels as rows (n, H).
"""
from __future__ import annotations

import numpy as np


def silu_mul(gu: np.ndarray, n: int) -> np.ndarray:
    """silu(gu[:, :n]) * gu[:, n:], in place in the gate half."""
    g, u = gu[:, :n], gu[:, n:]
    with np.errstate(over="ignore"):
        t = np.exp(-g)               # (N, n)
    t += 1.0
    np.divide(g, t, out=t)           # silu(g) = g / (1 + e^-g)
    t *= u
    return t


class SliceLayer:
    """Neurons [start, end) of one layer, laid out for two matmuls."""

    __slots__ = ("start", "end", "wgu_t", "down_t")

    def __init__(self, start: int, end: int, gate: np.ndarray, up: np.ndarray, down_t: np.ndarray):
        n = end - start
        if not (gate.shape == up.shape == down_t.shape and gate.shape[0] == n):
            raise ValueError(f"slice [{start},{end}): shapes {gate.shape} {up.shape} {down_t.shape}")
        self.start, self.end = start, end
        self.wgu_t = np.ascontiguousarray(np.concatenate([gate, up], axis=0).T, dtype=np.float32)  # (H, 2n)
        self.down_t = np.ascontiguousarray(down_t, dtype=np.float32)                             # (n, H)

    @property
    def n(self) -> int:
        return self.end - self.start

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (N, H) -> partial output (N, H)."""
        gu = x @ self.wgu_t                 # (N, 2n)
        return silu_mul(gu, self.n) @ self.down_t  # (N, H)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate, up, down_t) rows of this slice, each (n, H)."""
        n = self.n
        return self.wgu_t[:, :n].T, self.wgu_t[:, n:].T, self.down_t


class MLPWeights:
    """The full MLP of every layer, as neuron rows: gate, up, down_t, each (L, I, H).

    The server keeps these so it can compute (or ship) any neuron range of any layer."""

    def __init__(self, gate: list[np.ndarray], up: list[np.ndarray], down_t: list[np.ndarray]):
        self.gate, self.up, self.down_t = gate, up, down_t
        self.layers, self.neurons, self.hidden = len(gate), gate[0].shape[0], gate[0].shape[1]

    def slice(self, layer: int, start: int, end: int) -> SliceLayer:
        return SliceLayer(start, end, self.gate[layer][start:end], self.up[layer][start:end],
                          self.down_t[layer][start:end])

    def rows(self, layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (no copy) of the rows to ship for neurons [start, end)."""
        return self.gate[layer][start:end], self.up[layer][start:end], self.down_t[layer][start:end]

    def nbytes(self, start: int, end: int) -> int:
        return 3 * (end - start) * self.hidden * 4 * self.layers


class LocalMLP:
    """Every neuron computed in this process (zero nodes, or the oracle in tests)."""

    def __init__(self, weights: MLPWeights):
        self.slices = [weights.slice(i, 0, weights.neurons) for i in range(weights.layers)]

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.slices[layer](x)
