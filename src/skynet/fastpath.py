"""The common case of one distributed MLP call, in two C calls (_link.c) instead of the ~250
Python function calls of scatter + gather (dispatch.py): ~150 µs of the server's CPU per layer.

It applies when every range goes to one node that holds exactly that range (no replicas),
serves, is not benched or loading, and has a data link; nothing else is in flight; the partials
are float64 (the fast precision); and a reply fits a link's read buffer. Then:

    send x to each node (datalink.send_mlp: one sendmsg each), compute the server's own ranges,
    wait for all replies at once (datalink.gather_mlp), and sum

with the same books as scatter/gather: the call is in flight, its deadlines are set, each reply
goes through ClusterMLP._accept. Anything the C side does not take (a late or malformed reply,
a link that broke, silence past the first deadline) is left where the Python path finds it, and
`finish` carries on exactly as `gather` would. The bits of the sum do not change: the same
partials, summed in range order.
"""
from __future__ import annotations

import time

import numpy as np

from . import datalink, wire
from .calls import Call
from .cluster import Reply
from .links import unlink

MICRO = 2   # dispatch.MICRO: step tags of micro-batches


class FastPath:
    def __init__(self, mlp):
        self.m = mlp

    @staticmethod
    def available(mlp) -> bool:
        return datalink.NATIVE and mlp.weights.quantized and mlp.c.links is not None

    def targets(self, rows: int) -> list | None:
        """[(range, node)] when the fast path applies to a call of `rows` rows, else None."""
        m = self.m
        if m.always_both or m.inflight or m.outrun or not m.holders \
                or datalink.PREFIX.size + 40 + rows * m.weights.hidden * 8 > datalink.READ_CHUNK:
            return None
        out = []
        for rng, who in m.holders.items():
            n = m.c.serving(who[0])
            if n is None or n.link is None or n.loading_rows or who[0] in m.benched or m.plan.held(who[0]) != rng:
                return None
            out.append((rng, n))
        return out

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """The call's sum (N, H) float32, or None when the fast path does not apply."""
        m = self.m
        targets = self.targets(x.shape[0])
        if targets is None:
            return None
        m.stats["fast_calls"] += 1
        call = Call((MICRO * m.step, m.epoch, layer), x, time.perf_counter(), list(m.plan.local))
        head = datalink.link_head(*call.key, *x.shape)
        sent = []
        for rng, n in targets:
            try:
                datalink.send_mlp(n.link, head, x)
            except datalink.LinkError as e:
                unlink(n, str(e))
                m.send_range(call, rng, m.holders[rng])   # over ZeroMQ, another holder, or here
                continue
            call.waiting[rng] = [n.id]
            call.sent[(rng, n.id)] = time.perf_counter()
            m.stats["bytes_out"] += len(head) - datalink.PREFIX.size + x.nbytes
            m.deadlines(call, rng)
            sent.append((rng, n))
        m.inflight[call.key] = call
        t0 = time.perf_counter()
        for s, e in call.local:
            call.parts.append((s, m._local(layer, s, e)(x)))
        t1 = time.perf_counter()
        if sent:
            self._gather(call, sent)
        return m.finish(call, t0, t1)

    def _gather(self, call: Call, sent: list) -> None:
        """Wait (in C) for the fast-sent ranges until the call's first deadline; accept what came."""
        m = self.m
        wake = min([call.miss_at, *call.hedge_at.values()])
        status = np.zeros(len(sent), np.int64)
        out = np.empty((len(sent), *call.x.shape))
        conns = [n.link for _, n in sent]
        _, errs = datalink.gather_mlp(conns, status, out, call.key, min(c.max_frame for c in conns),
                                      max(wake - time.perf_counter(), 0.0), m.spin_s)
        seen = time.monotonic()
        step, epoch, layer = call.key
        for i, (rng, n) in enumerate(sent):
            if status[i] == 1:
                n.last_seen = seen
                m._accept(call, rng, Reply(n, wire.MlpOut(step, epoch, layer, out[i]), direct=True))
            elif status[i] == 3:
                unlink(n, errs[i])
                m._take([Reply(n, None, errs[i], "link lost")])
