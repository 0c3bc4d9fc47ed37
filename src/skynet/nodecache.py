"""A node's side of the slice cache, per session: what to report, filling an epoch from disk,
and writing completed epochs back (off the serving thread). node.py calls it; the files are
slicecache.py's; without a cache directory every method does nothing.

The contract with the server (cachepolicy.rows_source): until the server has a Ready of this
session, it ships a new range against the cached range this node reported in `Holding`, and the
node fills the overlap from the file it verified then (kept mapped until the server counts on
served rows instead: an Assign with a base, or any Mlp).
"""
from __future__ import annotations

import logging
import threading
import time

from . import wire
from .cachepolicy import reported_range
from .slicecache import Cached, SliceCache

log = logging.getLogger("skynet.node")


class NodeCache:
    def __init__(self, cache_dir: str | None, max_bytes: int):
        self.store = SliceCache(cache_dir, max_bytes) if cache_dir else None
        self.cached: Cached | None = None
        self._writers: list[threading.Thread] = []

    def open(self, model_hash: bytes, fmt, layers: int, neurons: int) -> None:
        """Welcomed: find and verify the best cached range of this model (corrupt files go). It is
        reported only if the server will count on it (the same check as the server's)."""
        self.release()
        if self.store is None or not model_hash:
            return
        self.cached = c = self.store.lookup(model_hash, fmt, layers)
        if c is not None and reported_range(model_hash, model_hash, c.start, c.end, neurons, fmt.granule) is None:
            log.warning("cached range [%d, %d) does not fit this model: not used", c.start, c.end)
            self.release()
        elif c is not None:
            log.info("the cache holds neurons [%d, %d) of this model", c.start, c.end)

    def holding(self, model_hash: bytes) -> wire.Holding:
        c = self.cached
        return wire.Holding(model_hash, c.start if c else 0, c.end if c else 0)

    def fill(self, slices, a: wire.Assign) -> int | None:
        """An Assign on no base: the rows of [a.start, a.end) inside the reported cached range come
        from disk, as Loads into `slices`; the epoch once complete, else None."""
        c, p = self.cached, slices.pending
        if c is None or p is None or p.epoch != a.epoch:
            return None
        s, e = max(a.start, c.start), min(a.end, c.end)
        done, fmt = None, slices.format
        if e > s:
            log.info("neurons [%d, %d) of epoch %d come from the cache", s, e, a.epoch)
        for li, pieces in enumerate(c.layers if e > s else []):
            g, u, d = fmt.get(li, pieces, s - c.start, e - c.start)
            done = slices.load(wire.Load(a.epoch, li, s, e, g, u, d))
        return done

    def save(self, slices, epoch: int, model_hash: bytes) -> None:
        """Write a completed epoch's rows (unless that file exists), in a background thread."""
        layers = slices.layers(epoch)
        if self.store is None or not model_hash or not layers:
            return
        fmt = slices.format
        pieces = [fmt.get(li, sl.rows(), 0, sl.n) for li, sl in enumerate(layers)]
        t = threading.Thread(target=self._write, args=(model_hash, fmt, layers[0].start, layers[0].end, pieces),
                             name="slice-cache", daemon=True)
        t.start()
        self._writers = [w for w in self._writers if w.is_alive()] + [t]

    def _write(self, key: bytes, fmt, start: int, end: int, pieces: list) -> None:
        try:
            self.store.store(key, fmt, start, end, pieces)
        except OSError as e:
            log.warning("could not cache neurons [%d, %d): %s", start, end, e)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Leaving: let writes in progress finish (a killed write leaves only a temp file)."""
        end = time.monotonic() + timeout_s
        for t in self._writers:
            t.join(max(0.0, end - time.monotonic()))

    def release(self) -> None:
        if self.cached is not None:
            self.cached.close()
            self.cached = None
