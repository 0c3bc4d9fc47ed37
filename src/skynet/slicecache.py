"""The node slice cache: the rows a node was shipped, on disk, so a restart ships (almost) nothing.

Keyed by the model's content hash (`content_hash`: the MLP weights exactly as they are shipped,
with their format) and the neuron range. One directory per model, one file per range:

    <root>/<hash hex>/<start>-<end>.slice
    [MAGIC][pieces, each 64-byte aligned][header msgpack][u32 header length][u32 crc32(header)][MAGIC]

Per layer the file holds the format's three pieces for neurons [start, end) (exact: gate, up,
down_t float32 (n, H); fast: gate, up (n, row_bytes(H)), down (H, row_bytes(n)) uint8 blocks),
each with its crc32 in the header. A file is written whole (temp file, then rename), read with
mmap and checked completely before any row of it is used: a bad magic, header, size or crc means
the file is deleted and the rows are shipped again. Policy (LRU, which file) is cachepolicy.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np

from .cachepolicy import ModelEntry, RangeEntry, evict, pick, superseded

log = logging.getLogger("skynet.cache")
MAGIC = b"SKYSLC01"
ALIGN = 64
TRAILER = struct.Struct("<II8s")   # header length, crc32(header), MAGIC
MAX_HEADER = 1 << 20


class CorruptCache(ValueError):
    """A cache file that is not exactly what was written: it is deleted and re-fetched."""


def content_hash(weights, threads: int = 4) -> bytes:
    """sha256 of the format (name, hidden, layers, neurons, block types) and, per layer, of the
    pieces the server ships for neurons [0, I) (MLPWeights.rows): the key of every cached slice.
    Layers are hashed in parallel (hashlib releases the GIL); it reads each MLP byte once."""
    head = msgpack.packb([weights.format.name, weights.hidden, weights.layers, weights.neurons,
                          weights.format.qtype_bytes() if weights.quantized else b""])

    def layer(li: int) -> bytes:
        h = hashlib.sha256()
        for a in weights.rows(li, 0, weights.neurons):
            h.update(a if a.flags.c_contiguous else np.ascontiguousarray(a))
        return h.digest()

    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(layer, range(weights.layers)))
    return hashlib.sha256(head + b"".join(digests)).digest()


def _describe(fmt) -> dict:
    return {"format": fmt.name, "hidden": fmt.hidden,
            "qtypes": fmt.qtype_bytes() if hasattr(fmt, "qtype_bytes") else b""}


class Cached:
    """A verified cache file, mapped and locked (other nodes on this machine pick another file):
    `layers[li]` = the format's pieces for neurons [start, end). `close()` unmaps and unlocks."""

    def __init__(self, path: Path, start: int, end: int, layers: list, mm: mmap.mmap, fd: int):
        self.path, self.start, self.end, self.layers = path, start, end, layers
        self._mm, self._fd = mm, fd

    def close(self) -> None:
        self.layers = []
        if self._mm is not None:
            _close(self._mm, self._fd)
            self._mm = None


def _close(mm: mmap.mmap, fd: int) -> None:
    """Unmap (unless a view is still alive: then the map goes with the last one) and unlock."""
    try:
        mm.close()
    except BufferError:
        pass
    os.close(fd)


class SliceCache:
    """A node's cache directory with a cap on its size (bytes); see the module docstring."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root, self.max_bytes = Path(root).expanduser(), max_bytes
        self._lock = threading.Lock()   # writers run off the serving thread

    def _dir(self, key: bytes) -> Path:
        return self.root / key.hex()

    @staticmethod
    def _ranges(d: Path) -> list[RangeEntry]:
        out = []
        for p in d.glob("*.slice"):
            try:
                s, e = map(int, p.stem.split("-"))
                out.append(RangeEntry(s, e, p.stat().st_mtime))
            except (ValueError, OSError):
                continue
        return out

    # ------------------------------------------------------------------ read
    def lookup(self, key: bytes, fmt, layers: int) -> Cached | None:
        """The best verified range this cache holds for model `key` in format `fmt`, or None.
        Corrupt or truncated files are deleted on the way; files another process holds are skipped."""
        d = self._dir(key)
        for r in pick(self._ranges(d)) if d.is_dir() else []:
            path = d / f"{r.start}-{r.end}.slice"
            try:
                c = self._open(path, key, fmt, layers, r.start, r.end)
            except CorruptCache as e:
                log.warning("cache file %s is corrupt (%s): deleted, its rows will be shipped again", path, e)
                path.unlink(missing_ok=True)
                continue
            except OSError as e:
                log.warning("cache file %s unreadable: %s", path, e)
                continue
            if c is not None:
                now = time.time()
                for p in (path, d):
                    os.utime(p, (now, now))
                return c
        return None

    def _open(self, path: Path, key: bytes, fmt, layers: int, start: int, end: int) -> Cached | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            size = os.fstat(fd).st_size
            if size < len(MAGIC) + TRAILER.size:
                raise CorruptCache(f"{size} bytes")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        try:
            return Cached(path, start, end, _verify(mm, key, fmt, layers, start, end), mm, fd)
        except BaseException:
            _close(mm, fd)
            raise

    # ------------------------------------------------------------------ write
    def store(self, key: bytes, fmt, start: int, end: int, layers: list) -> Path | None:
        """Write neurons [start, end) of every layer (`layers[li]` = the format's pieces) as one
        file, unless it is there already or alone exceeds the cap; then evict over the cap."""
        n = end - start
        nbytes = sum(int(a.nbytes) for pieces in layers for a in pieces)
        if nbytes > self.max_bytes:
            log.info("slice [%d, %d) is %.1f MB, over the cache cap: not cached", start, end, nbytes / 1e6)
            return None
        d = self._dir(key)
        final = d / f"{start}-{end}.slice"
        with self._lock:
            if final.exists():
                return final
            d.mkdir(parents=True, exist_ok=True)
            _sweep(d)
            tmp = d / f".{start}-{end}.{os.getpid()}.tmp"
            try:
                _write(tmp, {"key": key, **_describe(fmt), "start": start, "end": end, "n": n}, layers)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            for s, e in superseded([(r.start, r.end) for r in self._ranges(d)], (start, end)):
                (d / f"{s}-{e}.slice").unlink(missing_ok=True)
            self._evict(keep=key.hex())
        log.info("cached neurons [%d, %d) (%.1f MB) in %s", start, end, nbytes / 1e6, final)
        return final

    def models(self) -> list[ModelEntry]:
        out = []
        for d in self.root.glob("*") if self.root.is_dir() else []:
            try:
                size = sum(p.stat().st_size for p in d.iterdir())
                out.append(ModelEntry(d.name, size, d.stat().st_mtime))
            except OSError:
                continue
        return out

    def _evict(self, keep: str) -> None:
        for k in evict(self.models(), self.max_bytes, keep):
            log.info("cache over %.1f MB: evicting model %s", self.max_bytes / 1e6, k[:12])
            shutil.rmtree(self.root / k, ignore_errors=True)


def _sweep(d: Path) -> None:
    """Delete the temp files of writers that died (killed mid-write): `.<range>.<pid>.tmp`."""
    for p in d.glob(".*.tmp"):
        try:
            os.kill(int(p.suffixes[-2][1:]), 0)
        except (ProcessLookupError, ValueError, IndexError):
            p.unlink(missing_ok=True)
        except PermissionError:   # alive, another user's
            pass


def _pad(f) -> None:
    f.write(b"\0" * (-f.tell() % ALIGN))


def _write(path: Path, header: dict, layers: list) -> None:
    """MAGIC, each piece (aligned) with its crc32 in the header, then the header and trailer."""
    pieces = []
    with open(path, "wb") as f:
        f.write(MAGIC)
        for layer in layers:
            for a in layer:
                a = np.ascontiguousarray(a)   # exact: gate and up are strided views of (H, 2n)
                _pad(f)
                pieces.append([f.tell(), a.nbytes, zlib.crc32(a)])
                f.write(a.data)
        head = msgpack.packb({**header, "pieces": pieces}, use_bin_type=True)
        f.write(head)
        f.write(TRAILER.pack(len(head), zlib.crc32(head), MAGIC))


def _verify(mm, key: bytes, fmt, layers: int, start: int, end: int) -> list:
    """Check the whole file against what format `fmt` holds for [start, end); its pieces as views."""
    size = len(mm)
    hlen, hcrc, magic = TRAILER.unpack_from(mm, size - TRAILER.size)
    if mm[:len(MAGIC)] != MAGIC or magic != MAGIC:
        raise CorruptCache("bad magic (truncated?)")
    if not 0 < hlen <= min(MAX_HEADER, size - TRAILER.size):
        raise CorruptCache(f"header length {hlen}")
    raw = mm[size - TRAILER.size - hlen:size - TRAILER.size]
    if zlib.crc32(raw) != hcrc:
        raise CorruptCache("header checksum")
    h = msgpack.unpackb(raw, raw=False)
    want = {"key": key, **_describe(fmt), "start": start, "end": end, "n": end - start}
    if any(h.get(k) != v for k, v in want.items()) or len(h.get("pieces", ())) != 3 * layers:
        raise CorruptCache("written for another model, format or range")
    out, it = [], iter(h["pieces"])
    for li in range(layers):
        views = []
        for like in fmt.pieces(li, end - start):   # shapes and dtypes only: np.empty touches no page
            off, nbytes, crc = next(it)
            if nbytes != like.nbytes or off % ALIGN or off + nbytes > size - TRAILER.size - hlen:
                raise CorruptCache(f"layer {li}: piece of {nbytes} bytes at {off}")
            v = np.frombuffer(mm, like.dtype, like.size, off).reshape(like.shape)
            if zlib.crc32(v) != crc:
                raise CorruptCache(f"layer {li}: checksum")
            views.append(v)
        out.append(tuple(views))
    return out
