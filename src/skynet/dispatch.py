"""The distributed MLP layer: scatter x to the nodes, compute local ranges, gather and sum.

For a plan that splits the I neurons into ranges r_1 < r_2 < ... (nodes and server):

    mlp(x) = sum_k  down[:, r_k] @ (silu(gate[r_k] x) * up[r_k] x)      # (N, H)

Each node gets one `Mlp(step, epoch, layer, x)` per layer and returns its partial; the server
computes its own ranges while it waits, then sums the partials in range order (so the result
does not depend on which reply came first). In the fast precision partials are float64 (see
mlp.py) and their sum is rounded to float32 once. A node that misses the step's deadline or whose
connection is gone, or whose reply is malformed (wrong rows, width or dtype, NaN), has its range
computed here for this step; a lost connection, MAX_MISSES missed deadlines in a row, or too many
bad messages (transport.MAX_BAD_MESSAGES), plan it out. Replies
carry (step, epoch, layer): a late one is dropped, never summed into another step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import fastframe, wire
from .cluster import Cluster, Reply

log = logging.getLogger("skynet.dispatch")
MICRO = 2   # calls that may be in flight at once: one per micro-batch (overlap.py)


@dataclass
class Call:
    """One layer's MLP for one batch of rows: sent, then gathered."""

    key: tuple[int, int, int]                      # (step tag, epoch, layer) its replies carry
    x: np.ndarray                                  # (N, H)
    t_sent: float
    local: list = field(default_factory=list)      # ranges the server computes
    waiting: dict = field(default_factory=dict)    # node id -> range still expected
    parts: list = field(default_factory=list)      # (range start, partial (N, H))


class ClusterMLP:
    """Scatter x to the planned nodes, compute local ranges, gather and sum. The cluster decides
    who is planned and carries the messages; this layer only keeps the calls' books. Up to
    MICRO calls may be in flight (`scatter` then `gather`), each with its own step tag."""

    on_latency = None   # optional callback(node, seconds): each node reply's round trip (metrics)

    def __init__(self, cluster: Cluster, min_deadline_s: float = 0.3, spin_s: float = 0.0,
                 overlap: bool = False):
        self.c = cluster
        self.overlap = overlap   # let steps of 2+ sequences run as two micro-batches (overlap.py)
        self.min_deadline_s, self.spin_s = min_deadline_s, spin_s
        self.step = 0
        self.weights = cluster.weights
        self.out_dtype = np.dtype(np.float64 if self.weights.quantized else np.float32)
        self.local_cache: dict[tuple[int, int, int], object] = {}
        self.epoch, self.plan = cluster.epoch, cluster.plan
        self.inflight: dict[tuple, Call] = {}
        # fallbacks: ranges of planned nodes computed here instead, by reason; replies: per node name
        self.stats = {"calls": 0, "wait_s": 0.0, "local_s": 0.0, "bytes_out": 0, "bytes_in": 0,
                      "fallbacks": 0, "fallback_reasons": {}, "replies": {}, "direct_replies": 0}

    def begin_step(self) -> None:
        """Step boundary: heartbeats, membership, the plan switch; then a new step id. The
        step's whole forward pass uses the (epoch, plan) taken here."""
        epoch, self.plan = self.c.step_boundary()
        self.step += 1
        self.inflight.clear()   # a failed step may have left calls behind
        if epoch != self.epoch:   # fallback slices of the old plan are of no more use
            self.epoch = epoch
            self.local_cache.clear()

    @property
    def overlaps(self) -> bool:
        """Run this step as two micro-batches: enabled, and its plan sends work to nodes."""
        return self.overlap and bool(self.plan.ranges)

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (N, H) -> sum of all ranges' partials (N, H)."""
        return self.gather(self.scatter(layer, x))

    def scatter(self, layer: int, x: np.ndarray, micro: int = 0) -> Call:
        """Send x (N, H) of micro-batch `micro` to every planned node; nothing is computed yet."""
        call = Call((MICRO * self.step + micro, self.epoch, layer), x, time.perf_counter(), list(self.plan.local))
        if self.plan.ranges:
            out = fastframe.Outgoing(wire.Mlp(call.key[0], self.epoch, layer, x))
            for nid, rng in self.plan.ranges.items():
                n = self.c.serving(nid)
                # a node still receiving rows for the next epoch would answer late: compute here
                if n is not None and not n.loading_rows and self.c.send_mlp(n, out, self.min_deadline_s):
                    call.waiting[nid] = rng
                    self.stats["bytes_out"] += len(out.link[0]) + x.nbytes
                else:
                    self._count("not serving" if n is None else "loading rows" if n.loading_rows
                                else "send failed")
                    call.local.append(rng)
        self.inflight[call.key] = call
        return call

    def gather(self, call: Call) -> np.ndarray:
        """Compute the call's local ranges, wait for its nodes (or compute theirs), sum (N, H)."""
        t0 = time.perf_counter()
        for s, e in call.local:
            call.parts.append((s, self._local(call.key[2], s, e)(call.x)))
        t1 = time.perf_counter()
        self._gather(call)
        del self.inflight[call.key]
        t2 = time.perf_counter()
        self.stats["calls"] += 1
        self.stats["local_s"] += t1 - t0
        self.stats["wait_s"] += t2 - t1
        parts = sorted(call.parts, key=lambda p: p[0])
        out = parts[0][1].copy() if len(parts) == 1 else parts[0][1] + parts[1][1]
        for _, p in parts[2:]:
            out += p
        return out.reshape(call.x.shape).astype(np.float32, copy=False)

    def _gather(self, call: Call) -> None:
        limit = self._deadline(call)
        deadline = call.t_sent + limit
        while call.waiting:
            left = deadline - time.perf_counter()
            waiting = {nid for c in self.inflight.values() for nid in c.waiting}
            self._take(self.c.receive(list(waiting), max(left, 0.0), self.spin_s))
            if left <= 0:   # replies that arrived while this thread was busy were read above
                break
        for nid in list(call.waiting):
            self._fallback(call, nid, "missed deadline")
            self.c.missed(nid, f"missed a {limit * 1000:.0f} ms step deadline")

    def _take(self, replies: list[Reply]) -> None:
        """Sum what matches a call in flight; a node lost meanwhile (disconnect, bad messages) or
        that sent a message the wire layer rejected (its reply may have been that one) is
        computed here."""
        for r in replies:
            calls = [c for c in self.inflight.values() if r.node.id in c.waiting]
            if r.msg is None:
                for c in calls:
                    self._fallback(c, r.node.id, r.reason, r.why)
                continue
            call = self.inflight.get((r.msg.step, r.msg.epoch, r.msg.layer))
            if call is None or r.node.id not in call.waiting:
                self.c.late()   # a late reply: never summed into another step
            else:
                self._accept(call, r)
        for c in self.inflight.values():
            for nid in list(c.waiting):
                if self.c.serving(nid) is None:
                    self._fallback(c, nid, "lost during step")

    def _accept(self, call: Call, r: Reply) -> None:
        n, y = r.node, r.msg.y
        why = _malformed(y, call.x.shape, self.out_dtype)
        if why:   # a broken peer: compute its range here instead, and count it as a bad message
            self._fallback(call, n.id, "bad reply", why)
            self.c.bad(n, f"mlp_out {why}")
            return
        rng = call.waiting.pop(n.id)
        call.parts.append((rng[0], y.reshape(-1, y.shape[-1])))
        self.stats["bytes_in"] += y.nbytes
        self.stats["direct_replies"] += r.direct
        self.stats["replies"][n.name] = self.stats["replies"].get(n.name, 0) + 1
        lat = time.perf_counter() - call.t_sent
        if self.on_latency is not None:
            self.on_latency(n, lat)
        n.observe_latency(lat / _row_scale(y.shape[0]))

    def _fallback(self, call: Call, nid: int, reason: str, detail: str = "") -> None:
        s, e = call.waiting.pop(nid)
        layer = call.key[2]
        log.debug("computing [%d, %d) of layer %d here: node %d %s %s", s, e, layer, nid, reason, detail)
        self._count(reason)
        call.parts.append((s, self._local(layer, s, e)(call.x)))

    def _count(self, reason: str) -> None:
        """A planned node's range computed here: counted, with why, in stats and /metrics."""
        self.stats["fallbacks"] += 1
        reasons = self.stats["fallback_reasons"]
        reasons[reason] = reasons.get(reason, 0) + 1

    def _deadline(self, call: Call) -> float:
        emas = [n.latency_ema for n in map(self.c.serving, call.waiting)
                if n is not None and n.latency_ema is not None]
        est = max(emas, default=0.0) * _row_scale(call.x.shape[0])
        return max(self.min_deadline_s, 10 * est)

    def _local(self, layer: int, s: int, e: int):
        key = (layer, s, e)
        sl = self.local_cache.get(key)
        if sl is None:
            if len(self.local_cache) > 4 * self.weights.layers:
                self.local_cache.clear()
            sl = self.local_cache[key] = self.weights.slice(layer, s, e)
        return sl

def _malformed(y: np.ndarray, shape: tuple, dtype: np.dtype) -> str:
    """Why a node's partial cannot be summed ('' if it can): the wire layer has checked the width;
    the row count, the dtype of this precision and finiteness depend on the call (a NaN would
    poison every token)."""
    if y.shape != shape:
        return f"shape {y.shape}, expected {shape}"
    if y.dtype != dtype:
        return f"dtype {y.dtype}, expected {dtype}"
    if not np.isfinite(y).all():
        return "holds NaN or inf"
    return ""


def _row_scale(rows: int) -> float:
    """How much longer a call with `rows` rows takes than a 1-row call, roughly (latency EMAs
    are kept per 1-row call so that prefill and decode steps share one estimate)."""
    return 1 + rows / 64
