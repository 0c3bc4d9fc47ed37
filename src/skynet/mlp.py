"""MLP slices: the math a node (or the server) runs for its neuron range, in either precision.

For neurons r = [s, e) of one layer:

    partial(x) = down[:, r] @ (silu(gate[r] @ x) * up[r] @ x)        # (N, H)

and the full MLP output is the sum of the partials over a partition of [0, I).

Two layouts of the same three pieces, one `Format` each:
- exact (float32): gate and up rows fused into one (H, 2n) matrix, down as rows (n, H).
- fast (GGML blocks): gate and up are (n, row_bytes(H)) block rows, down is (H, row_bytes(n)):
  down's blocks run along the neuron axis, so ranges start and end on block boundaries (the
  plan's granule). Activations are quantized to 8-bit blocks before each matmul, and the down
  product is accumulated in float64, so that the server's sum over ranges barely depends on
  where the range boundaries fall (the partials are summed in float64, rounded to float32 once).
"""
from __future__ import annotations

import numpy as np

from . import quant
from .quant import QMatrix


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u, in place in g: silu(g) = g / (1 + e^-g)."""
    with np.errstate(over="ignore"):
        t = np.exp(-g)               # (N, n)
    t += 1.0
    np.divide(g, t, out=g)
    g *= u
    return g


class SliceLayer:
    """Neurons [start, end) of one layer in float32, laid out for two matmuls."""

    __slots__ = ("start", "end", "wgu_t", "down_t")

    def __init__(self, start: int, end: int, gate: np.ndarray, up: np.ndarray, down_t: np.ndarray):
        n = end - start
        if not (gate.shape == up.shape == down_t.shape and gate.shape[0] == n):
            raise ValueError(f"slice [{start},{end}): shapes {gate.shape} {up.shape} {down_t.shape}")
        self.start, self.end = start, end
        self.wgu_t = np.ascontiguousarray(np.concatenate([gate, up], axis=0).T, dtype=np.float32)  # (H, 2n)
        self.down_t = np.ascontiguousarray(down_t, dtype=np.float32)                             # (n, H)

    @classmethod
    def wrap(cls, start: int, end: int, wgu_t: np.ndarray, down_t: np.ndarray) -> "SliceLayer":
        """A slice over buffers already in this layout (no copy): wgu_t (H, 2n), down_t (n, H)."""
        n = end - start
        if not (wgu_t.shape == (down_t.shape[1], 2 * n) and down_t.shape[0] == n
                and wgu_t.dtype == down_t.dtype == np.float32 and wgu_t.flags.c_contiguous
                and down_t.flags.c_contiguous):
            raise ValueError(f"slice [{start},{end}): buffers {wgu_t.shape} {down_t.shape}")
        self = cls.__new__(cls)
        self.start, self.end, self.wgu_t, self.down_t = start, end, wgu_t, down_t
        return self

    @property
    def n(self) -> int:
        return self.end - self.start

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (N, H) -> partial output (N, H) float32."""
        gu = x @ self.wgu_t                 # (N, 2n)
        n = self.n
        return silu_mul(gu[:, :n], gu[:, n:]) @ self.down_t  # (N, H)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate, up, down_t) rows of this slice, each (n, H)."""
        n = self.n
        return self.wgu_t[:, :n].T, self.wgu_t[:, n:].T, self.down_t


class QSliceLayer:
    """Neurons [start, end) of one layer in GGML blocks: gate, up (n rows), down (H rows of n)."""

    __slots__ = ("start", "end", "gate", "up", "down", "threads")

    def __init__(self, start: int, end: int, gate: QMatrix, up: QMatrix, down: QMatrix, threads: int = 1):
        n = end - start
        if not (gate.rows == up.rows == down.cols == n and gate.cols == up.cols == down.rows):
            raise ValueError(f"slice [{start},{end}): gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, "
                             f"down {down.rows}x{down.cols}")
        self.start, self.end, self.gate, self.up, self.down = start, end, gate, up, down
        self.threads = threads

    @property
    def n(self) -> int:
        return self.end - self.start

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (N, H) float32 -> partial output (N, H) float64: x in 8-bit blocks (shared by gate
        and up), silu(g) * u in float32, that in 8-bit blocks again for down, float64 sums. One C
        call (quant.qmlp), the same one a node's link loop makes, so the bits never depend on
        where a range is computed."""
        return quant.qmlp(x, self.gate, self.up, self.down, self.threads)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.gate.data, self.up.data, self.down.data


def link_table(served: dict, parts: dict | None = None) -> np.ndarray | None:
    """The slices a node serves, as the compiled link loop reads them (_link.c): one int64 row
    per range, [epoch, start, end, whole, then per layer gate, up, down addresses and their types
    (gate | up << 8 | down << 16)]. `served`: epoch -> every layer's slice of the whole holding
    (whole = 1); `parts` (assembly.Slices.parts): (epoch, layer, start, end) -> a replica's
    sub-range, listed once every layer has it. None unless every slice is in blocks. The
    addresses are valid while the slices are referenced (the caller keeps them)."""
    ranges = [(e, 1, layers) for e, layers in served.items()]
    by_range: dict = {}
    for (epoch, layer, s, e), sl in (parts or {}).items():
        by_range.setdefault((epoch, s, e), {})[layer] = sl
    for (epoch, s, e), got in by_range.items():
        n = len(served.get(epoch) or ())
        if n and len(got) == n:
            ranges.append((epoch, 0, [got[i] for i in range(n)]))
    rows = []
    for epoch, whole, layers in ranges:
        if not layers or not all(isinstance(sl, QSliceLayer) for sl in layers):
            return None
        row = [epoch, layers[0].start, layers[0].end, whole]
        for sl in layers:
            row += [sl.gate._ptr, sl.up._ptr, sl.down._ptr, sl.gate._t | sl.up._t << 8 | sl.down._t << 16]
        rows.append(row)
    return np.array(rows, np.int64).reshape(len(rows), -1) if rows else None


# ---------------------------------------------------------------- formats
class F32Format:
    """Neuron rows as float32, shipped as gate (n, H), up (n, H), down_t (n, H) and assembled
    straight into SliceLayer's layout, wgu_t (H, 2n) and down_t (n, H): building the slice copies
    nothing, so a node never holds a second copy of gate and up."""

    name, granule = "float32", 1

    def __init__(self, hidden: int):
        self.hidden = hidden

    def empty(self, layer: int, n: int) -> tuple[np.ndarray, ...]:
        return np.empty((self.hidden, 2 * n), np.float32), np.empty((n, self.hidden), np.float32)

    def pieces(self, layer: int, n: int) -> tuple[np.ndarray, ...]:
        """Empty arrays shaped like the shipped pieces of n neurons: gate, up, down_t (n, H)."""
        return tuple(np.empty((n, self.hidden), np.float32) for _ in range(3))

    def put(self, layer: int, bufs, a: int, b: int, pieces) -> None:
        """Write the pieces (gate, up, down_t rows) of neurons [a, b) (offsets within the
        buffers) into bufs: gate^T to wgu_t[:, a:b], up^T to wgu_t[:, n+a:n+b]."""
        wgu, down = bufs
        n = down.shape[0]
        wgu[:, a:b] = pieces[0].T
        wgu[:, n + a:n + b] = pieces[1].T
        down[a:b] = pieces[2]

    def get(self, layer: int, pieces, a: int, b: int) -> tuple[np.ndarray, ...]:
        """The pieces of neurons [a, b) (offsets within `pieces`)."""
        return tuple(p[a:b] for p in pieces)

    def build(self, layer: int, start: int, end: int, bufs) -> SliceLayer:
        return SliceLayer.wrap(start, end, *bufs)

    def sub(self, layer: int, sl: SliceLayer, start: int, end: int) -> SliceLayer:
        """Neurons [start, end) of slice sl, laid out exactly as SliceLayer(start, end, ...) lays
        them out (so bit-identical partials), without the transposes: wgu_t's columns are copied,
        down_t's rows are a view."""
        a, b, n = start - sl.start, end - sl.start, sl.n
        out = SliceLayer.__new__(SliceLayer)
        out.start, out.end = start, end
        out.wgu_t = np.concatenate([sl.wgu_t[:, a:b], sl.wgu_t[:, n + a:n + b]], axis=1)   # (H, 2n')
        out.down_t = sl.down_t[a:b]                                                          # (n', H)
        return out

    def bytes_per_neuron(self, layer: int) -> int:
        return 3 * self.hidden * 4


class QFormat:
    """Neuron ranges as GGML blocks: gate and up rows (n, row_bytes(H)), down (H, row_bytes(n)).

    `qtypes[layer]` = (gate, up, down) ggml type ids. Ranges start and end on multiples of
    `granule`, the largest block of any down tensor (32, or 256 for K-quants)."""

    name = "blocks"

    def __init__(self, hidden: int, qtypes: list[tuple[int, int, int]], threads: int = 1):
        self.hidden, self.qtypes, self.threads = hidden, qtypes, threads
        self.granule = max(quant.BLOCKS[quant.QType(d)][0] for _, _, d in qtypes)

    def _rb(self, qtype: int, values: int) -> int:
        return quant.row_bytes(qtype, values)

    def empty(self, layer: int, n: int) -> tuple[np.ndarray, ...]:
        g, u, d = self.qtypes[layer]
        h = self.hidden
        return (np.empty((n, self._rb(g, h)), np.uint8), np.empty((n, self._rb(u, h)), np.uint8),
                np.empty((h, self._rb(d, n)), np.uint8))

    def pieces(self, layer: int, n: int) -> tuple[np.ndarray, ...]:
        """Empty arrays shaped like the shipped pieces of n neurons: the same as the buffers."""
        return self.empty(layer, n)

    def _cols(self, layer: int, a: int, b: int) -> slice:
        d = self.qtypes[layer][2]
        return slice(self._rb(d, a), self._rb(d, b))

    def put(self, layer: int, bufs, a: int, b: int, pieces) -> None:
        bufs[0][a:b], bufs[1][a:b] = pieces[0], pieces[1]
        bufs[2][:, self._cols(layer, a, b)] = pieces[2]

    def get(self, layer: int, pieces, a: int, b: int) -> tuple[np.ndarray, ...]:
        return pieces[0][a:b], pieces[1][a:b], pieces[2][:, self._cols(layer, a, b)]

    def sub(self, layer: int, sl: QSliceLayer, start: int, end: int) -> QSliceLayer:
        """Neurons [start, end) of slice sl: the same blocks as a slice of [start, end) alone."""
        pieces = self.get(layer, sl.rows(), start - sl.start, end - sl.start)
        return self.build(layer, start, end, tuple(np.ascontiguousarray(p) for p in pieces))

    def build(self, layer: int, start: int, end: int, bufs) -> QSliceLayer:
        g, u, d = self.qtypes[layer]
        n, h = end - start, self.hidden
        return QSliceLayer(start, end, QMatrix(g, bufs[0], h), QMatrix(u, bufs[1], h), QMatrix(d, bufs[2], n),
                           self.threads)

    def bytes_per_neuron(self, layer: int) -> int:
        g, u, d = self.qtypes[layer]
        per = lambda t: quant.BLOCKS[quant.QType(t)][1] / quant.BLOCKS[quant.QType(t)][0]  # noqa: E731
        return int(np.ceil(self.hidden * (per(g) + per(u) + per(d))))

    def qtype_bytes(self) -> bytes:
        return bytes(t for layer in self.qtypes for t in layer)

    @classmethod
    def from_bytes(cls, hidden: int, layers: int, b: bytes, threads: int = 1) -> "QFormat":
        if len(b) != 3 * layers or any(t not in quant.BLOCKS for t in b):
            raise ValueError(f"bad block types {b!r:.60} for {layers} layers")
        return cls(hidden, [tuple(b[3 * i:3 * i + 3]) for i in range(layers)], threads)


# ---------------------------------------------------------------- the server's full MLP
class MLPWeights:
    """The full MLP of every layer, so the server can compute (or ship) any neuron range.

    exact: gate, up, down_t float32 (I, H) per layer. fast: gate, up QMatrix (I rows of H) and
    down QMatrix (H rows of I) per layer, views into the mapped model file."""

    def __init__(self, gate: list, up: list, down: list, threads: int = 1):
        self.gate, self.up, self.down, self.threads = gate, up, down, threads
        self.quantized = isinstance(gate[0], QMatrix)
        self.layers = len(gate)
        if self.quantized:
            self.neurons, self.hidden = gate[0].rows, gate[0].cols
            self.format = QFormat(self.hidden, [(g.qtype, u.qtype, d.qtype) for g, u, d in zip(gate, up, down)])
        else:
            self.neurons, self.hidden = gate[0].shape
            self.format = F32Format(self.hidden)
        self.granule = self.format.granule

    def slice(self, layer: int, start: int, end: int):
        if not self.quantized:
            return SliceLayer(start, end, self.gate[layer][start:end], self.up[layer][start:end],
                              self.down[layer][start:end])
        down = self.down[layer]   # its columns are a copy, unless the slice is the whole layer
        return QSliceLayer(start, end, self.gate[layer].take_rows(start, end), self.up[layer].take_rows(start, end),
                           down if (start, end) == (0, self.neurons) else down.take_cols(start, end), self.threads)

    def rows(self, layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pieces to ship for neurons [start, end), in this format's layout."""
        if not self.quantized:
            return self.gate[layer][start:end], self.up[layer][start:end], self.down[layer][start:end]
        d = self.down[layer]
        cols = slice(quant.row_bytes(d.qtype, start), quant.row_bytes(d.qtype, end))
        return (self.gate[layer].data[start:end], self.up[layer].data[start:end],
                np.ascontiguousarray(d.data[:, cols]))

    def bytes_per_neuron(self) -> int:
        return sum(self.format.bytes_per_neuron(i) for i in range(self.layers))

    def nbytes(self, start: int, end: int) -> int:
        return (end - start) * self.bytes_per_neuron()


class LocalMLP:
    """Every neuron computed in this process (zero nodes, or the oracle in tests)."""

    def __init__(self, weights: MLPWeights):
        self.slices = [weights.slice(i, 0, weights.neurons) for i in range(weights.layers)]

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.slices[layer](x).astype(np.float32, copy=False)
