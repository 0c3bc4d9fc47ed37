"""The compiled per-layer exchange (_link.c) from Python: both ends share a DataConn's socket
and read buffer with the Python reader (datalink.py), so either can read the next message.

- A node: `NodeLoop.serve` runs link_serve over the node's slices (mlp.link_table), rebuilt
  when the served epochs or a replica's sub-ranges change.
- The server: `link_head`, `send_mlp` and `gather_mlp`, which fastpath.py calls, and a whole call
  (`Gather.call`: the sends, the wait and the sum in one compiled call).

See docs/architecture.md, "The per-layer exchange in C".
"""
from __future__ import annotations

import sys

import numpy as np

from . import _qkernels as _k
from . import fastframe, wire
from .datalink import PREFIX, DataConn, LinkError
from .mlp import link_table

NATIVE = hasattr(_k, "link_serve") and sys.platform != "win32"   # POSIX sockets only
_DTYPE_CODE = {dt: i for i, dt in enumerate(wire.DTYPES.values())}   # fastframe's dtype codes
_F32, _F64 = _DTYPE_CODE[wire.DTYPES["float32"]], _DTYPE_CODE[wire.DTYPES["float64"]]


def serve_mlp(conn: DataConn, table, limits: wire.Limits, threads: int, budget_s: float,
              spin_s: float = 0.0) -> tuple[bool, int, int]:
    """A node's compiled loop: serve `mlp` messages for the slices in `table` (mlp.link_table)
    for up to budget_s, sharing conn's read buffer. Returns (another message waits: read it with
    conn.recv_multipart, mlp messages served, the highest epoch served or -1); LinkError if the
    link broke."""
    st, conn._start, conn._end, served, epoch, err = _k.link_serve(
        conn.sock.fileno(), conn._buf, conn._start, conn._end, table, limits.hidden, limits.layers,
        min(limits.max_frame, conn.max_frame), threads, budget_s, conn.delay_s, spin_s, wire.VERSION, _F32, _F64)
    if st == 2:
        raise LinkError(err)
    return st == 1, served, epoch


class NodeLoop:
    """A node's side: the table of the slices it serves, rebuilt when they change."""

    def __init__(self):
        self._key, self._table, self._refs = None, None, None

    def table(self, slices):
        """mlp.link_table of the served epochs and replica sub-ranges (None: the Python path). A
        sub-range is listed once the Python path has served it in every layer (Slices.part
        builds it on first use)."""
        key = (tuple((e, id(layers)) for e, layers in slices.served.items()), len(slices.parts))
        if key != self._key:
            self._key, self._table = key, link_table(slices.served, slices.parts)
            self._refs = (dict(slices.served), dict(slices.parts))   # the addresses stay valid while referenced
        return self._table


def link_head(step: int, epoch: int, layer: int, rows: int, cols: int, start: int = 0, end: int = 0) -> bytes:
    """Prefix and fixed header of an `mlp` of (rows, cols) float32 for neurons [start, end) of a
    node's holding (0, 0: all of it): the bytes fastframe.encode + pack put before the tensor."""
    return (PREFIX.pack(2, fastframe.HEADER.size, rows * cols * 4)
            + fastframe.HEADER.pack(fastframe.MAGIC, wire.VERSION, 1, _F32, rows, cols,
                                    step, epoch, layer, start, end))


def send_mlp(conn: DataConn, head: bytes, x, timeout_s: float = 5.0) -> None:
    """The server's compiled send (_link.c): prefix + fixed header `head` (link_head), then x
    (C-contiguous, the byte length head states), in one sendmsg; LinkError if the peer is gone
    or does not read within timeout_s. (The benchmarks' emulated delay is the node's,
    `--link-delay-ms`: the server's links have none.)"""
    err = _k.link_send(conn.sock.fileno(), head, x, timeout_s)
    if err is not None:
        raise LinkError(err)


def gather_mlp(conns: list, status: np.ndarray, out: np.ndarray, key: tuple[int, int, int],
               max_frame: int, timeout_s: float, spin_s: float = 0.0, subs=None) -> tuple[np.ndarray, tuple]:
    """The server's compiled wait (_link.c) for one `mlp_out` per link whose status is 0, up to
    timeout_s. Per link, status becomes 1 (the reply is in out[i]: exactly `key`, the sub-range
    asked of it (subs[i]; default 0, 0: its whole holding), out's rows of finite float64), 2
    (another message waits: read it with recv_multipart), 3 (the link broke: the error is in
    the returned tuple), or stays 0. Returns (seconds after the call began each reply came,
    errors)."""
    subs = np.zeros((len(conns), 2), np.int64) if subs is None else subs
    g = Gather(conns, out.shape[1], out.shape[2], subs, max_frame, status, out)
    return g.wait(key, timeout_s, spin_s), g.errs


class Gather:
    """gather_mlp's links, sub-ranges and arrays, made once: a step's steady state
    (fastpath.Route) waits on the same ones call after call. `out` is overwritten by each wait."""

    __slots__ = ("conns", "fds", "bufs", "pos", "subs", "status", "t", "out", "max_frame", "errs")

    def __init__(self, conns: list, rows: int, cols: int, subs, max_frame: int | None = None,
                 status: np.ndarray | None = None, out: np.ndarray | None = None):
        self.conns = list(conns)
        self.fds = [c.sock.fileno() for c in conns]
        self.bufs = [c._buf for c in conns]
        self.max_frame = min(c.max_frame for c in conns) if max_frame is None else max_frame
        k = len(conns)
        self.pos = np.zeros((k, 2), np.int64)
        self.subs = np.asarray(subs, np.int64).reshape(k, 2)
        self.status = np.zeros(k, np.int64) if status is None else status
        self.t = np.zeros(k)
        self.out = np.empty((k, rows, cols)) if out is None else out
        self.errs = ()

    def wait(self, key: tuple[int, int, int], timeout_s: float, spin_s: float = 0.0) -> np.ndarray:
        """One compiled wait (see gather_mlp) on the arrays as they are; the arrival offsets."""
        self.pos[:] = [(c._start, c._end) for c in self.conns]
        self.errs = _k.link_gather(self.fds, self.bufs, self.pos, self.subs, self.status, self.t, self.out, *key,
                                   self.out.shape[1], self.out.shape[2], wire.VERSION, _F64, self.max_frame,
                                   timeout_s, spin_s)
        for c, (s, e) in zip(self.conns, self.pos.tolist()):
            c._start, c._end = s, e
        return self.t

    def call(self, key: tuple[int, int, int], heads: bytearray, x: np.ndarray, t: np.ndarray, send_timeout_s: float,
             timeout_s: float, spin_s: float = 0.0) -> tuple[np.ndarray, tuple | None]:
        """A whole call in one compiled step (_link.c link_call): x to every link (their headers
        `heads`, link_head's in link order, get `key`), then the wait, up to timeout_s after the
        start. Returns (y, None) when every reply came: y (N, H) float32 is their sum in link
        order (calls.sum_parts's bits). Else (None, errors): status as `wait`'s, or 4 where a send
        failed (then nothing was waited for); t (2, k) gets each link's send and reply times,
        seconds after the start."""
        y = np.empty(x.shape, np.float32)
        errs = _k.link_call(self.fds, self.bufs, self.conns, self.subs, self.status, t, self.out, heads, x, y,
                            *key, *x.shape, wire.VERSION, _F64, self.max_frame, send_timeout_s, timeout_s, spin_s)
        return (y, None) if errs is None else (None, errs)
