"""The common case of one distributed MLP call in C (_link.c), instead of the ~250 Python
function calls of ClusterMLP.scatter + gather: ~150 µs of the server's CPU per layer.

It applies when every range's first holder (its primary; replicas.py) serves, is not benched or
loading, and has a data link; every other call in flight is a fast one (overlap.py keeps two);
nobody is outrun; the partials are float64 (the fast precision); and a reply fits a link's read
buffer. Then

    call:    (nothing else in flight, no server range) one compiled call (clink.Gather.call):
             x to each node, one sendmsg each, one wait for every reply, their sum; when
             every reply came, no Call is made: the counts and latency samples are kept here,
             as ClusterMLP._accept keeps them
    scatter: x to each node; the Call in flight with its deadlines, as ClusterMLP.scatter
    gather:  the server's own ranges, then one wait for every reply; each goes through
             ClusterMLP.took, as ClusterMLP._accept does

Whatever the C side does not take (a late or malformed reply, a broken link, silence past the
call's first deadline) stays where the Python path finds it, and ClusterMLP.finish carries on
exactly as for any call. The sum's bits do not change: the same partials, summed in range order.
"""
from __future__ import annotations

import time

import numpy as np

from . import clink, datalink, fastframe
from .calls import Call
from .cluster import Reply
from .links import unlink

MAX_PEERS = 64  # the most links one compiled gather waits on (_link.c); more take the Python path
HEAD_BYTES = fastframe.HEADER.size   # what a fixed header adds to the bytes sent (stats)
_F32 = np.dtype(np.float32)


class Route:
    """A whole call's route, kept for a step and one row count: the targets in range order
    ([(range, node, sub-range)]), the wait's first deadline after sending, and the compiled
    wait over their links with its arrays (clink.Gather)."""

    __slots__ = ("targets", "nodes", "wake_s", "gather", "heads", "t")

    def __init__(self, targets: list, rows: int, hidden: int, wake_s: float):
        self.targets, self.wake_s = targets, wake_s
        self.nodes = [n for _, n, _ in targets]
        self.gather = clink.Gather([n.link for n in self.nodes], rows, hidden, [sub for _, _, sub in targets])
        self.heads = bytearray(b"".join(clink.link_head(0, 0, 0, rows, hidden, *sub) for _, _, sub in targets))
        self.t = np.zeros((2, len(targets)))   # each call's send and reply times (clink.Gather.call)


class FastPath:
    def __init__(self, mlp):
        self.m = mlp
        self._step, self._cache = None, {}   # this step's (node id, rows) -> (miss, hedge) seconds
        self._rstep, self._routes = None, {}  # this step's Route per row count

    @staticmethod
    def available(mlp) -> bool:
        return clink.NATIVE and mlp.weights.quantized and mlp.c.links is not None

    def targets(self, x: np.ndarray) -> list | None:
        """[(range, node, sub-range)] when the fast path applies to a call on x, else None: each
        range goes to its first holder, as ClusterMLP._ask would send it (sub-range 0, 0 when
        the node holds exactly that range)."""
        m = self.m
        if m.always_both or m.outrun or not m.holders or len(m.holders) > MAX_PEERS \
                or x.dtype != _F32 or not x.flags.c_contiguous \
                or any(not c.fast for c in m.inflight.values()) \
                or datalink.PREFIX.size + HEAD_BYTES + x.shape[0] * m.weights.hidden * 8 > datalink.READ_CHUNK:
            return None
        out = []
        for rng, who in m.holders.items():
            n = m.c.serving(who[0])
            if n is None or n.link is None or n.loading_rows or who[0] in m.benched:
                return None
            out.append((rng, n, (0, 0) if m.plan.held(who[0]) == rng else rng))
        return sorted(out, key=lambda target: target[0])

    def scatter(self, layer: int, x: np.ndarray, micro: int = 0) -> Call | None:
        """Send x to every range's node in C and keep the books as ClusterMLP.scatter does; None
        (nothing sent) when the fast path does not apply."""
        targets = self.targets(x)
        if targets is None:
            return None
        key = self.m.key(layer, micro)
        t_sent = time.perf_counter()
        sent, failed = self._send(key, x, targets)
        return self._books(key, x, t_sent, sent, failed)

    def _send(self, key, x: np.ndarray, targets: list) -> tuple[list, list]:
        """x to each target in C: ([(range, node, sub-range, when)] sent, [range] whose link broke)."""
        heads: dict = {}
        sent, failed = [], []
        for rng, n, sub in targets:
            head = heads.get(sub) or heads.setdefault(sub, clink.link_head(*key, *x.shape, *sub))
            try:
                clink.send_mlp(n.link, head, x, self.m.min_deadline_s)
                sent.append((rng, n, sub, time.perf_counter()))
            except datalink.LinkError as e:
                unlink(n, str(e))
                failed.append(rng)
        return sent, failed

    def _books(self, key, x: np.ndarray, t_sent: float, sent: list, failed: list) -> Call:
        """The Call that ClusterMLP.scatter would have made, in flight: the sent ranges with their
        deadlines, and the failed ones asked again the Python way (over ZeroMQ, of another
        holder, or computed here)."""
        m = self.m
        m.stats["fast_calls"] += 1
        call = Call(key, x, t_sent, list(m.plan.local))
        for rng, n, sub, t in sent:
            call.waiting[rng] = [n.id]
            call.sent[(rng, n.id)] = t
            m.stats["bytes_out"] += HEAD_BYTES + x.nbytes
            miss_s, hedge_s = self._deadlines(n, x.shape[0])
            call.miss_at = max(call.miss_at, t_sent + miss_s)
            call.hedge_at[rng] = t_sent + hedge_s
            call.fast.append((rng, n, sub))
        for rng in failed:
            m.send_range(call, rng, m.holders[rng])
        m.inflight[key] = call
        return call

    def call(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """A whole call when nothing else is in flight and the server computes no range: the sum
        (N, H) float32, or None when the fast path does not apply. If every reply comes by the
        call's first deadline, the books are kept here without a Call (the same counts and
        latency samples ClusterMLP._accept keeps); otherwise the Call is made as scatter makes it
        and ClusterMLP.finish takes over with what is left."""
        m = self.m
        route = None if m.inflight or m.plan.local else self.route(x)
        if route is None:
            return None
        key = m.key(layer)
        t0 = time.perf_counter()
        y, errs = route.gather.call(key, route.heads, x, route.t, m.min_deadline_s, route.wake_s, m.spin_s)
        if y is not None:
            self._count(route, t0, x.nbytes)
            return y
        status, t_send, t_reply = route.gather.status, route.t[0].tolist(), route.t[1].tolist()
        sent, failed = [], []
        for i, (rng, n, sub) in enumerate(route.targets):
            if status[i] == 4:   # its link broke: asked again the Python way (_books)
                unlink(n, errs[i])
                failed.append(rng)
            else:
                sent.append((rng, n, sub, t0 + t_send[i]))
        call = self._books(key, x, t0, sent, failed)
        if failed:   # nothing was waited for here: m.gather waits for the ranges that were sent
            return m.gather(call)
        self._accept(call, route.targets, status, route.gather.out.copy(), t0, t_reply, errs)
        t_wait = t0 + max(t_send)   # the wait began after the last send, as finish counts it
        return m.finish(call, t_wait, t_wait)

    def route(self, x: np.ndarray) -> "Route | None":
        """This step's Route for x's row count: made by `targets` on first use, then kept while
        each of its nodes still serves over the same link, is not loading rows or benched, and
        nobody was outrun (what can change inside a step: links break in our own calls, late
        nodes are benched); None when the fast path does not apply."""
        m = self.m
        if self._rstep != m.step:
            self._rstep, self._routes = m.step, {}
        r = self._routes.get(x.shape[0])
        if r is not None and x.dtype == _F32 and x.flags.c_contiguous and not m.outrun \
                and all(n.link is c and m.c.serving(n.id) is n and not n.loading_rows and n.id not in m.benched
                        for n, c in zip(r.nodes, r.gather.conns)):
            return r
        targets = self.targets(x)
        if targets is None:
            return None
        deadlines = [self._deadlines(n, x.shape[0]) for _, n, _ in targets]
        wake_s = min(max(d[0] for d in deadlines), *(d[1] for d in deadlines))
        r = self._routes[x.shape[0]] = Route(targets, x.shape[0], m.weights.hidden, wake_s)
        return r

    def _wait(self, key, shape: tuple, sent: list, wake: float):
        """One compiled wait, until `wake`, for a reply from each (range, node, sub-range) in
        sent: (status, partials (len(sent), N, H), when the wait began, arrival offsets, errors);
        see clink.gather_mlp."""
        status = np.zeros(len(sent), np.int64)
        out = np.empty((len(sent), *shape))
        conns = [n.link for _, n, _ in sent]
        t0 = time.perf_counter()
        t, errs = clink.gather_mlp(conns, status, out, key, min(c.max_frame for c in conns),
                                   max(wake - t0, 0.0), self.m.spin_s, [sub for _, _, sub in sent])
        return status, out, t0, t, errs

    def _count(self, route: Route, t0: float, x_bytes: int) -> None:
        """Every reply of a whole call came: what ClusterMLP.finish and took count
        (ClusterMLP.count_reply), with each node's round trip from its own send."""
        m = self.m
        st = m.stats
        t_send, t_reply = route.t.tolist()
        st["calls"] += 1
        st["fast_calls"] += 1
        st["wait_s"] += time.perf_counter() - t0 - t_send[-1]
        st["bytes_out"] += len(t_send) * (HEAD_BYTES + x_bytes)
        seen = time.monotonic()
        out = route.gather.out
        for i, (rng, n, _) in enumerate(route.targets):
            m.count_reply(rng, n, out[i], t_reply[i] - t_send[i], True)
            n.last_seen = seen

    def _deadlines(self, n, rows: int) -> tuple[float, float]:
        """(miss, hedge) seconds after sending for n's range, as ClusterMLP.deadlines sets them,
        from n's reply-time distribution as it stood at its first call of this step and row count
        (computed once per step and row count, not per layer)."""
        m = self.m
        if self._step != m.step:
            self._step, self._cache = m.step, {}
        d = self._cache.get((n.id, rows))
        if d is None:
            d = self._cache[(n.id, rows)] = m.deadline_offsets(n, rows)
        return d

    def gather(self, call: Call) -> None:
        """Wait (in C) for the fast-sent ranges still waiting until the call's first deadline,
        and accept what came; ClusterMLP.finish does the rest."""
        sent = [(rng, n, sub) for rng, n, sub in call.fast if n.id in call.waiting.get(rng, ()) and n.link is not None]
        if sent:
            wake = min([call.miss_at, *call.hedge_at.values()])
            self._accept(call, sent, *self._wait(call.key, call.x.shape, sent, wake))

    def _accept(self, call: Call, sent: list, status, out, t0: float, t, errs) -> None:
        """What ClusterMLP._accept does with each reply the C gather took (it checked shape,
        dtype and finiteness); a broken link drops its node as ClusterMLP._take does."""
        m = self.m
        seen = time.monotonic()
        for i, (rng, n, _) in enumerate(sent):
            if status[i] == 1:
                n.last_seen = seen
                del call.waiting[rng]
                call.hedge_at.pop(rng, None)
                m.took(call, rng, n, out[i], t0 + t[i], True)
            elif status[i] == 3:
                unlink(n, errs[i])
                m._take([Reply(n, None, errs[i], "link lost")])
