"""A node's slices: the epochs it serves and the one being assembled. No sockets.

Per plan epoch a node holds neurons [start, end) of every layer: gate[s:e] and up[s:e] (rows)
and down[:, s:e] (columns), in the layout of the welcome's format (float32, or GGML blocks).
`assign` starts the next epoch from the rows an older epoch already holds; `load` adds the rows
the server ships; once none is missing the epoch is built and can serve. node.py carries the
messages; this keeps the books.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import wire
from .progress import Progress

log = logging.getLogger("skynet.node")


class LostBase(Exception):
    """An Assign builds on an epoch this node no longer holds: it must register again."""


@dataclass
class Pending:
    """An epoch being assembled: target range and per-layer (gate, up, down) buffers."""

    epoch: int
    start: int
    end: int
    bufs: list     # per layer: the format's three buffers for neurons [start, end)
    missing: list  # per layer: neurons still to arrive
    progress: Progress | None = None


class Slices:
    """The epochs a node can serve (epoch -> per-layer SliceLayer | QSliceLayer) and the one
    being assembled."""

    def __init__(self, welcome: wire.Welcome, fmt, name: str = "node", alive=None):
        self.welcome, self.format, self.name = welcome, fmt, name
        self.alive = alive or (lambda: None)   # called between layers of bulk work (heartbeats)
        self.served: dict[int, list] = {}
        self.parts: dict[tuple[int, int, int, int], object] = {}   # (epoch, layer, start, end) -> slice
        self.pending: Pending | None = None

    def layers(self, epoch: int) -> list | None:
        return self.served.get(epoch)

    def switched(self, epoch: int) -> None:
        """The server sent work for `epoch`: older epochs are of no more use."""
        for old in [e for e in self.served if e < epoch]:
            del self.served[old]
        for key in [k for k in self.parts if k[0] < epoch]:
            del self.parts[key]

    def part(self, epoch: int, layer: int, start: int, end: int):
        """Layer `layer`'s slice of neurons [start, end) of the range held for `epoch`; (0, 0) =
        the whole held range. A sub-range (a replica's, or the primary inside a larger holding) is
        built on first use by `format.sub`, with exactly the layout of a slice of [start, end)
        alone, so it computes bit-identical partials. None if not held or off block bounds."""
        layers = self.served.get(epoch)
        if layers is None or not 0 <= layer < len(layers):
            return None
        sl, g = layers[layer], self.format.granule
        if end == 0 or (start, end) == (sl.start, sl.end):
            return sl
        if not sl.start <= start < end <= sl.end or start % g or end % g:
            return None
        key = (epoch, layer, start, end)
        if key not in self.parts:
            self.parts[key] = self.format.sub(layer, sl, start, end)
        return self.parts[key]

    def assign(self, a: wire.Assign) -> int | None:
        """Start assembling epoch a.epoch; the epoch if it is already complete (no rows to
        receive), else None. An assignment off the model or off block bounds is dropped."""
        w, n, fmt = self.welcome, a.end - a.start, self.format
        if not 0 <= a.start < a.end <= w.neurons or a.start % fmt.granule or a.end % fmt.granule:
            log.warning("dropped assign [%d, %d): outside the model's %d neurons or off %d-neuron blocks",
                        a.start, a.end, w.neurons, fmt.granule)
            return None
        held = self.served.get(a.base) if a.base else None
        if a.base and held is None:
            raise LostBase(f"assigned on top of epoch {a.base}, which I no longer hold")
        if held and (held[0].start, held[0].end) == (a.start, a.end):   # same rows: share them
            self.served[a.epoch], self.pending = held, None
            self.parts.update({(a.epoch, *k[1:]): v for k, v in self.parts.items() if k[0] == a.base})
            log.info("assigned neurons [%d, %d) for epoch %d: already held", a.start, a.end, a.epoch)
            return a.epoch
        p = Pending(a.epoch, a.start, a.end, [fmt.empty(li, n) for li in range(w.layers)], [n] * w.layers)
        if held:
            s, e = max(a.start, held[0].start), min(a.end, held[0].end)
            for li, sl in enumerate(held if e > s else []):
                kept = fmt.get(li, sl.rows(), s - sl.start, e - sl.start)
                fmt.put(li, p.bufs[li], s - a.start, e - a.start, kept)
                p.missing[li] -= e - s
                self.alive()
        todo = sum(m * fmt.bytes_per_neuron(li) for li, m in enumerate(p.missing))
        p.progress = Progress(f"node {self.name}: epoch {a.epoch} weights", todo) if todo else None
        self.pending = p
        log.info("assigned neurons [%d, %d) for epoch %d; %.1f MB to receive",
                 a.start, a.end, a.epoch, todo / 1e6)
        return self._maybe_complete()

    def load(self, m: wire.Load) -> int | None:
        """Rows for the epoch being assembled; the epoch once it is complete, else None."""
        p = self.pending
        if p is None or m.epoch != p.epoch or m.start < p.start or m.end > p.end:
            log.warning("load for epoch %d [%d, %d) does not match my assignment", m.epoch, m.start, m.end)
            return None
        self.format.put(m.layer, p.bufs[m.layer], m.start - p.start, m.end - p.start, (m.gate, m.up, m.down_t))
        p.missing[m.layer] -= m.end - m.start
        if p.progress:
            p.progress.update(m.gate.nbytes + m.up.nbytes + m.down_t.nbytes)
        return self._maybe_complete()

    def _maybe_complete(self) -> int | None:
        p = self.pending
        if p is None or any(p.missing):
            return None
        self.served[p.epoch] = [self.format.build(i, p.start, p.end, b) for i, b in enumerate(p.bufs)]
        self.alive()
        if p.progress:
            p.progress.close()
        self.pending = None
        log.info("epoch %d ready: neurons [%d, %d)", p.epoch, p.start, p.end)
        return p.epoch
