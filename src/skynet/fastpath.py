"""The common case of one distributed MLP call in C (_link.c), instead of the ~250 Python
function calls of ClusterMLP.scatter + gather: ~150 µs of the server's CPU per layer.

It applies when every range's first holder (its primary; replicas.py) serves, is not benched or
loading, and has a data link; every other call in flight is a fast
one (overlap.py keeps two); nobody is outrun; the partials are float64 (the fast precision);
and a reply fits a link's read buffer. Then

    scatter: x to each node, one sendmsg each (datalink.send_mlp)
    gather:  the server's own ranges, then one wait for every reply (datalink.gather_mlp)

with the books of ClusterMLP.scatter/gather: the call is in flight with its deadlines, and each
reply goes through ClusterMLP._accept. Whatever the C side does not take (a late or malformed
reply, a broken link, silence past the call's first deadline) stays where the Python path finds
it, and ClusterMLP.finish carries on exactly as for any call. The sum's bits do not change: the
same partials, summed in range order.
"""
from __future__ import annotations

import time

import numpy as np

from . import datalink
from .calls import Call, row_scale
from .cluster import Reply
from .links import unlink
from .replicas import hedge_after

MICRO = 2       # dispatch.MICRO: step tags of micro-batches
MAX_PEERS = 64  # the most links one compiled gather waits on (_link.c); more take the Python path
_F32 = np.dtype(np.float32)


class FastPath:
    def __init__(self, mlp):
        self.m = mlp
        self._step, self._cache = None, {}   # this step's (node id, rows) -> (miss, hedge) seconds

    @staticmethod
    def available(mlp) -> bool:
        return datalink.NATIVE and mlp.weights.quantized and mlp.c.links is not None

    def targets(self, rows: int) -> list | None:
        """[(range, node, sub-range)] when the fast path applies to a call of `rows` rows, else
        None: each range goes to its first holder, as ClusterMLP._ask would send it (sub-range
        0, 0 when the node holds exactly that range)."""
        m = self.m
        if m.always_both or m.outrun or not m.holders or len(m.holders) > MAX_PEERS \
                or any(not c.fast for c in m.inflight.values()) \
                or datalink.PREFIX.size + 40 + rows * m.weights.hidden * 8 > datalink.READ_CHUNK:
            return None
        out = []
        for rng, who in m.holders.items():
            n = m.c.serving(who[0])
            if n is None or n.link is None or n.loading_rows or who[0] in m.benched:
                return None
            out.append((rng, n, (0, 0) if m.plan.held(who[0]) == rng else rng))
        return out

    def scatter(self, layer: int, x: np.ndarray, micro: int = 0) -> Call | None:
        """Send x to every range's node in C and keep the books as ClusterMLP.scatter does; None
        (nothing sent) when the fast path does not apply."""
        m = self.m
        targets = self.targets(x.shape[0]) if x.dtype == _F32 and x.flags.c_contiguous else None
        if targets is None:
            return None
        m.stats["fast_calls"] += 1
        call = Call((MICRO * m.step + micro, m.epoch, layer), x, time.perf_counter(), list(m.plan.local))
        heads: dict = {}
        for rng, n, sub in targets:
            head = heads.get(sub) or heads.setdefault(sub, datalink.link_head(*call.key, *x.shape, *sub))
            try:
                datalink.send_mlp(n.link, head, x, m.min_deadline_s)
            except datalink.LinkError as e:
                unlink(n, str(e))
                m.send_range(call, rng, m.holders[rng])   # over ZeroMQ, to another holder, or here
                continue
            call.waiting[rng] = [n.id]
            call.sent[(rng, n.id)] = time.perf_counter()
            m.stats["bytes_out"] += len(head) - datalink.PREFIX.size + x.nbytes
            miss_s, hedge_s = self._deadlines(n, x.shape[0])
            call.miss_at = max(call.miss_at, call.t_sent + miss_s)
            call.hedge_at[rng] = call.t_sent + hedge_s
            call.fast.append((rng, n, sub))
        m.inflight[call.key] = call
        return call

    def _deadlines(self, n, rows: int) -> tuple[float, float]:
        """(miss, hedge) seconds after sending for n's range, as ClusterMLP.deadlines sets them,
        from n's reply-time distribution as it stood at its first call of this step and row count
        (computed once per step and row count, not per layer)."""
        m = self.m
        if self._step != m.step:
            self._step, self._cache = m.step, {}
        d = self._cache.get((n.id, rows))
        if d is None:
            scale = row_scale(rows)
            d = self._cache[(n.id, rows)] = (m._miss_limit(n, scale), hedge_after(n.lat, scale, m._ceiling(n, scale)))
        return d

    def gather(self, call: Call) -> None:
        """Wait (in C) for the fast-sent ranges still waiting until the call's first deadline,
        and accept what came; ClusterMLP.finish does the rest."""
        m = self.m
        sent = [(rng, n, sub) for rng, n, sub in call.fast if n.id in call.waiting.get(rng, ()) and n.link is not None]
        if not sent:
            return
        wake = min([call.miss_at, *call.hedge_at.values()])
        status = np.zeros(len(sent), np.int64)
        out = np.empty((len(sent), *call.x.shape))
        conns = [n.link for _, n, _ in sent]
        t0 = time.perf_counter()
        t, errs = datalink.gather_mlp(conns, status, out, call.key, min(c.max_frame for c in conns),
                                      max(wake - t0, 0.0), m.spin_s, [sub for _, _, sub in sent])
        seen = time.monotonic()
        for i, (rng, n, _) in enumerate(sent):
            if status[i] == 1:   # what ClusterMLP._accept does; C checked shape, dtype, finiteness
                n.last_seen = seen
                del call.waiting[rng]
                call.hedge_at.pop(rng, None)
                m.took(call, rng, n, out[i], t0 + t[i], True)
            elif status[i] == 3:
                unlink(n, errs[i])
                m._take([Reply(n, None, errs[i], "link lost")])
