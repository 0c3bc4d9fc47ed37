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
carry (step, epoch, layer, sub-range): a late one is dropped, never summed into another step.

Replicas (`--replicas R`, replicas.py): each range is asked of its primary; if no reply comes
within a deadline derived from the primary's reply-time distribution (replicas.hedge_after), or
its connection drops, the same range is asked of the next holder (a hedge; whichever answers
first is summed, both compute bit-identical partials), and the server computes it itself only
when no holder is left or the miss deadline (replicas.miss_after) passes. A node that misses a
deadline or is hedged sits out the rest of the step; MAX_MISSES missed steps in a row lose it.
"""
from __future__ import annotations

import logging
import time
import numpy as np

from . import fastframe, wire
from .calls import MICRO, Call, malformed as _malformed, row_scale as _row_scale, sum_parts
from .cluster import Cluster, Reply
from .fastpath import FastPath
from .replicas import hedge_after, holders, miss_after

log = logging.getLogger("skynet.dispatch")
MISS_FLOOR_S = 0.1  # a reply later than this (and than the node's own distribution says) is missed

Range = tuple[int, int]   # [start, end) of the neurons


class ClusterMLP:
    """Scatter x to the planned nodes, compute local ranges, gather and sum. The cluster decides
    who is planned and carries the messages; this layer only keeps the calls' books. Up to
    MICRO calls may be in flight (`scatter` then `gather`), each with its own step tag."""

    on_latency = None   # optional callback(node, seconds): each node reply's round trip (metrics)

    def __init__(self, cluster: Cluster, min_deadline_s: float = 0.3, spin_s: float = 0.0,
                 overlap: bool = False, always_both: bool = False, fast: bool = True,
                 miss_floor_s: float = MISS_FLOOR_S):
        self.c = cluster
        self.miss_floor_s = miss_floor_s   # the miss deadline never comes sooner (replicas.miss_after)
        self.always_both = always_both   # ask every holder at once instead of hedging late ranges
        self.overlap = overlap   # let steps of 2+ sequences run as two micro-batches (overlap.py)
        self.min_deadline_s, self.spin_s = min_deadline_s, spin_s
        self.step = 0
        self.weights = cluster.weights
        self.out_dtype = np.dtype(np.float64 if self.weights.quantized else np.float32)
        self.local_cache: dict[tuple[int, int, int], object] = {}
        self.epoch, self.plan = cluster.epoch, cluster.plan
        self.holders: dict[Range, tuple[int, ...]] = holders(self.plan)
        self.fast = FastPath(self) if fast and FastPath.available(self) else None
        self.inflight: dict[tuple, Call] = {}
        self.benched: set[int] = set()                 # nodes that sit out the rest of this step
        self.missed_now: set[int] = set()              # nodes that missed a deadline this step
        self.outrun: dict[tuple, tuple[float, float]] = {}   # (key, range, nid) -> (sent, evict at)
        # fallbacks: ranges of planned nodes computed here instead, by reason; replies: per node name
        self.stats = {"calls": 0, "wait_s": 0.0, "local_s": 0.0, "bytes_out": 0, "bytes_in": 0,
                      "fallbacks": 0, "fallback_reasons": {}, "replies": {}, "direct_replies": 0,
                      "hedges": 0, "replica_replies": 0, "duplicates": 0, "fast_calls": 0}

    def begin_step(self) -> None:
        """Step boundary: heartbeats, membership, the plan switch; then a new step id. The
        step's whole forward pass uses the (epoch, plan) taken here."""
        self.inflight.clear()   # a failed step may have left calls behind: what answers them is late
        self._take_strays()      # read while the engine was idle
        self._expire(time.perf_counter())
        epoch, plan = self.c.step_boundary()
        self.step += 1
        self._take_strays()      # read by the boundary, under the plan they answer
        self.plan = plan
        self.benched.clear()
        self.missed_now.clear()
        if epoch != self.epoch:   # fallback slices of the old plan are of no more use
            self.epoch = epoch
            self.local_cache.clear()
            self.outrun.clear()
        self.holders = holders(self.plan)

    @property
    def overlaps(self) -> bool:
        """Run this step as two micro-batches: enabled, and its plan sends work to nodes."""
        return self.overlap and bool(self.plan.ranges)

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (N, H) -> sum of all ranges' partials (N, H): the compiled whole call when it applies
        (fastpath.py), else scatter and gather."""
        y = self.fast.call(layer, x) if self.fast is not None else None
        return self.gather(self.scatter(layer, x)) if y is None else y

    def scatter(self, layer: int, x: np.ndarray, micro: int = 0) -> Call:
        """Send x (N, H) of micro-batch `micro` to each range's primary (or, if it cannot take it,
        the next holder); nothing is computed yet."""
        call = self.fast.scatter(layer, x, micro) if self.fast is not None else None
        if call is not None:   # the compiled common case (fastpath.py)
            return call
        call = Call(self.key(layer, micro), x, time.perf_counter(), list(self.plan.local))
        for rng, who in self.holders.items():
            self.send_range(call, rng, who)
        self.inflight[call.key] = call
        return call

    def key(self, layer: int, micro: int = 0) -> tuple[int, int, int]:
        """(step tag, epoch, layer) of this step's call for `layer` and micro-batch `micro`."""
        return MICRO * self.step + micro, self.epoch, layer

    def send_range(self, call: Call, rng: Range, who: tuple[int, ...]) -> None:
        """Ask rng of its first holder that can take it (every holder with --hedge always) and
        set its deadlines; or compute it here (call.local) if none can."""
        if not self._ask(call, rng, who):
            call.local.append(rng)
            return
        while self.always_both and self._ask(call, rng, who):
            pass
        self.deadlines(call, rng)

    def deadlines(self, call: Call, rng: Range) -> None:
        """When rng, just asked, is late (a replica is asked too) and missed (computed here)."""
        miss_s, hedge_s = self.deadline_offsets(self.c.serving(call.waiting[rng][0]), call.x.shape[0])
        call.miss_at = max(call.miss_at, call.t_sent + miss_s)
        call.hedge_at[rng] = call.t_sent + hedge_s

    def deadline_offsets(self, primary, rows: int) -> tuple[float, float]:
        """(missed, hedged) seconds after sending a call of `rows` rows to `primary`, from its
        reply-time distribution (replicas.miss_after, replicas.hedge_after)."""
        scale = _row_scale(rows)
        return self._miss_limit(primary, scale), hedge_after(primary.lat, scale, self._ceiling(primary, scale))

    def _ask(self, call: Call, rng: Range, who: tuple[int, ...], why: str = "") -> bool:
        """Send rng to the first holder in `who` that can take it now and was not asked yet;
        False (with the reason counted) if none can."""
        reasons = [why] if why else []
        for nid in who:
            n = self.c.serving(nid)
            if nid in call.waiting.get(rng, ()) or nid in call.dropped:
                continue
            if n is None or nid in self.benched or n.loading_rows:   # loading: it would answer late
                reasons.append("not serving" if n is None else "missed this step" if nid in self.benched
                               else "loading rows")
                continue
            sub = (0, 0) if self.plan.held(nid) == rng else rng
            out = call.out.get(sub)   # encoded once per sub-range (without replicas: once per call)
            if out is None:
                out = call.out[sub] = fastframe.Outgoing(wire.Mlp(*call.key, call.x, *sub))
            if not self.c.send_mlp(n, out, self.min_deadline_s):
                reasons.append("send failed")
                continue
            call.waiting.setdefault(rng, []).append(nid)
            call.sent[(rng, nid)] = time.perf_counter()
            self.stats["bytes_out"] += len(out.link[0]) + call.x.nbytes
            return True
        if rng not in call.waiting:
            self._count((reasons or ["not serving"])[0])
        return False

    def gather(self, call: Call) -> np.ndarray:
        """Compute the call's local ranges, wait for its nodes (or compute theirs), sum (N, H)."""
        t0 = time.perf_counter()
        for s, e in call.local:
            call.parts.append((s, self._local(call.key[2], s, e)(call.x)))
        t1 = time.perf_counter()
        if call.fast:
            self.fast.gather(call)
        return self.finish(call, t0, t1)

    def finish(self, call: Call, t0: float, t1: float) -> np.ndarray:
        """Wait for what the call still waits for (hedging, falling back), count, sum (N, H);
        t0..t1 was spent on its local ranges."""
        if call.waiting or self.outrun:
            self._gather(call)
        del self.inflight[call.key]
        t2 = time.perf_counter()
        self.stats["calls"] += 1
        self.stats["local_s"] += t1 - t0
        self.stats["wait_s"] += t2 - t1
        return sum_parts(call.parts).reshape(call.x.shape)

    def _gather(self, call: Call) -> None:
        """Wait for the call's ranges until its miss deadline, hedging late ones to replicas."""
        while call.waiting:
            now = time.perf_counter()
            for rng in [r for r, t in call.hedge_at.items() if t <= now and r in call.waiting]:
                self._hedge(call, rng)
            wake = min([call.miss_at, *call.hedge_at.values()])
            waiting = {nid for c in self.inflight.values() for ids in c.waiting.values() for nid in ids}
            waiting.update(k[2] for k in self.outrun)   # read late replies as they come (latency)
            self._take(self.c.receive(list(waiting), max(wake - now, 0.0), self.spin_s))
            if now >= call.miss_at:   # replies that arrived while this thread was busy were read above
                break
        for rng in list(call.waiting):
            self._outrun(call, rng, call.waiting[rng], bench=True)   # a miss if it never comes
            self._fallback(call, rng, "missed deadline")
        self._expire(time.perf_counter())

    def _hedge(self, call: Call, rng: Range) -> None:
        """rng is late at every holder asked: ask the next one too (first reply wins); the late
        ones sit out the rest of the step."""
        call.hedge_at.pop(rng, None)
        late = list(call.waiting[rng])
        if self._ask(call, rng, self.holders.get(rng, ())):
            self.stats["hedges"] += 1
            self.benched.update(late)

    def _take(self, replies: list[Reply]) -> None:
        """Sum what matches a call in flight; a node lost meanwhile (disconnect, bad messages) or
        that sent a message the wire layer rejected (its reply may have been that one) is
        asked no more: its ranges go to a replica, else are computed here."""
        for r in replies:
            if r.msg is None:   # a broken link sits out the step; a refused message only this call
                self._drop_node(r.node.id, r.reason, r.why, bench=r.reason == "link lost")
                continue
            call = self.inflight.get((r.msg.step, r.msg.epoch, r.msg.layer))
            rng = ((r.msg.start, r.msg.end) if r.msg.end
                   else self.plan.held(r.node.id) if r.node.id in self.plan.ranges else None)
            if call is not None and r.node.id in call.waiting.get(rng, ()):
                self._accept(call, rng, r)
            elif not self._late_reply(r, rng):
                self.c.late()   # a late reply: never summed into another step
        for nid in {nid for c in self.inflight.values() for ids in c.waiting.values() for nid in ids}:
            if self.c.serving(nid) is None:
                self._drop_node(nid, "lost during step")

    def _drop_node(self, nid: int, reason: str, detail: str = "", bench: bool = True) -> None:
        """nid will not answer: each range it was asked goes to another holder, else here."""
        if bench:
            self.benched.add(nid)
        for c in list(self.inflight.values()):
            c.dropped.add(nid)
            for rng in [r for r, ids in c.waiting.items() if nid in ids]:
                c.waiting[rng].remove(nid)
                if not c.waiting[rng] and not self._ask(c, rng, self.holders.get(rng, ()), reason):
                    self._fallback(c, rng, reason, detail)

    def _accept(self, call: Call, rng: Range, r: Reply) -> None:
        n, y = r.node, r.msg.y
        why = _malformed(y, call.x.shape, self.out_dtype)
        if why:   # a broken peer: ask another holder (or compute here), count it as a bad message
            self.c.bad(n, f"mlp_out {why}")
            self._drop_node(n.id, "bad reply", why, bench=False)
            return
        asked = call.waiting.pop(rng)
        call.hedge_at.pop(rng, None)
        self._outrun(call, rng, [i for i in asked if i != n.id], bench=False)   # theirs: duplicates
        self.took(call, rng, n, y.reshape(-1, y.shape[-1]), time.perf_counter(), r.direct)

    def took(self, call: Call, rng: Range, n, y: np.ndarray, t: float, direct: bool) -> None:
        """n's partial y (N, H) of rng, which came at time t, is summed: the books and its latency."""
        call.parts.append((rng[0], y))
        self.count_reply(rng, n, y, t - call.sent[(rng, n.id)], direct)

    def count_reply(self, rng: Range, n, y: np.ndarray, lat: float, direct: bool) -> None:
        """A summed reply's counts and its round trip lat (a latency sample, scaled to 1 row)."""
        self.stats["bytes_in"] += y.nbytes
        self.stats["direct_replies"] += direct
        self.stats["replica_replies"] += self.plan.ranges.get(n.id) != rng
        self.stats["replies"][n.name] = self.stats["replies"].get(n.name, 0) + 1
        if self.on_latency is not None:
            self.on_latency(n, lat)
        n.observe_latency(lat / _row_scale(y.shape[0]))

    def _outrun(self, call: Call, rng: Range, nids: list[int], bench: bool) -> None:
        """Asked holders whose answer is no longer needed (late ones sit out the rest of the step):
        their reply, if it comes by the classic deadline (max(--step-deadline-ms, 10x mean)), is a
        counted duplicate and a latency sample, else a missed step (`_expire`)."""
        scale = _row_scale(call.x.shape[0])
        for nid in nids:
            n = self.c.serving(nid)
            if n is not None:
                sent = call.sent[(rng, nid)]
                self.outrun[(call.key, rng, nid)] = (sent, sent + self._ceiling(n, scale))
            if bench:
                self.benched.add(nid)

    def _take_strays(self) -> None:
        """Replies the cluster read outside a step (no call is in flight): each is the duplicate
        an outrun entry waits for, or late; never summed."""
        strays = self.c.take_strays()
        if strays:
            self._take(strays)

    def _late_reply(self, r: Reply, rng: Range) -> bool:
        """A reply that lost the race (or came after its range was computed here): a duplicate,
        and a sample of the node's reply time, so the hedge deadline follows its distribution."""
        got = self.outrun.pop(((r.msg.step, r.msg.epoch, r.msg.layer), rng, r.node.id), None)
        if got is None:
            return False
        self.stats["duplicates"] += 1
        came = r.read_at or time.perf_counter()   # a stray was read (at arrival) before this
        r.node.observe_latency((came - got[0]) / _row_scale(r.msg.y.shape[0]))
        return True

    def _expire(self, now: float) -> None:
        """Outrun holders still silent at their classic deadline: a missed step for each (read
        what they sent first)."""
        if self.outrun:
            self._take(self.c.receive(list({k[2] for k in self.outrun}), 0.0))
        for k, (_, evict_at) in list(self.outrun.items()):
            if evict_at <= now:
                del self.outrun[k]
                self._missed(k[2], "sent no reply within the step deadline")

    def _missed(self, nid: int, why: str) -> None:
        """At most one miss per node per step: one slow step never counts MAX_MISSES times."""
        if nid not in self.missed_now:
            self.missed_now.add(nid)
            self.c.missed(nid, why)
        self.benched.add(nid)

    def _fallback(self, call: Call, rng: Range, reason: str, detail: str = "") -> None:
        call.waiting.pop(rng, None)
        call.hedge_at.pop(rng, None)
        s, e = rng
        layer = call.key[2]
        log.debug("computing [%d, %d) of layer %d here: %s %s", s, e, layer, reason, detail)
        self._count(reason)
        call.parts.append((s, self._local(layer, s, e)(call.x)))

    def _count(self, reason: str) -> None:
        """A planned node's range computed here: counted, with why, in stats and /metrics."""
        self.stats["fallbacks"] += 1
        reasons = self.stats["fallback_reasons"]
        reasons[reason] = reasons.get(reason, 0) + 1

    def _ceiling(self, n, scale: float) -> float:
        """The classic deadline: max(--step-deadline-ms, 10 x the node's mean reply time)."""
        return max(self.min_deadline_s, 10 * (n.latency_ema or 0.0) * scale)

    def _miss_limit(self, n, scale: float) -> float:
        """When silence counts as a miss: from the node's distribution, within [floor, ceiling]."""
        return miss_after(n.lat, scale, min(self.miss_floor_s, self.min_deadline_s), self._ceiling(n, scale))

    def _local(self, layer: int, s: int, e: int):
        key = (layer, s, e)
        sl = self.local_cache.get(key)
        if sl is None:
            if len(self.local_cache) > 4 * self.weights.layers:
                self.local_cache.clear()
            sl = self.local_cache[key] = self.weights.slice(layer, s, e)
        return sl
