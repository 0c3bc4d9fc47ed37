"""Plans and their epochs: re-plan when membership changes, ship each node the rows it lacks,
re-weight from observed latency, and switch atomically at a step boundary.

A plan change gets a new epoch: nodes load the rows they lack in the background while the
current epoch keeps serving; `maybe_switch()` (called only at step boundaries) adopts it once
every node of the new plan is ready. The policy is in placement.py; this carries it out.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from . import cachepolicy, placement, wire
from .config import ServerConfig
from .membership import Membership, NodeState, NodeStatus
from .mlp import MLPWeights
from .plan import Member, Plan, PlanError, plan, reweigh
from .replicas import replica_caps, replicate, takeover

log = logging.getLogger("skynet.cluster")
LOAD_FRAME_BYTES = 16 << 20
MAX_SETTLE = 5   # joins arriving together wait at most MAX_SETTLE * settle_s for their plan
RESTORE_WAIT_S = 30.0   # after a takeover, restore R holders at once when idle, else after this


@dataclass
class Pending:
    epoch: int
    plan: Plan
    t0: float
    reason: str
    moved: int


class Epochs:
    def __init__(self, cfg: ServerConfig, weights: MLPWeights, members: Membership,
                 send: Callable[[NodeState, wire.Message], bool], forget: Callable[[NodeState], None]):
        self.cfg, self.weights, self.members = cfg, weights, members
        self.send, self.forget = send, forget
        self.epoch, self.plan = 0, self._plan([])
        self.pending: Pending | None = None
        self.history: list[dict] = []
        self.reweight_streak = 0
        self.joins: tuple[float, float, list[str]] | None = None   # unplanned joins: first, last, names
        self.restore_due: float | None = None   # a takeover left ranges with fewer than R holders

    def planned(self, nid: int) -> bool:
        """In the serving plan or the pending one."""
        return nid in self.plan.ranges or (self.pending is not None and nid in self.pending.plan.ranges)

    def _plan(self, members: list[Member]) -> Plan:
        """Primaries weighted by speed (caps leave room for R ranges), then replica holdings."""
        r, g = self.cfg.replicas, self.weights.granule
        caps = {m.id: m.cap for m in members}
        if r > 1:
            shares = replica_caps(caps, r, g)
            members = [Member(m.id, m.weight, shares[m.id]) for m in members]
        return replicate(plan(self.weights.neurons, members, self.cfg.local_weight, g), r, caps)

    def _members(self) -> list[Member]:
        """Planning members in layout order: where their served or cached rows lie, then newcomers
        in join order (cachepolicy.sticky_order). A node is planned once it said what it caches."""
        nodes = {n.id: n for n in self.members.plannable() if n.reported}
        order = cachepolicy.sticky_order([(n.id, cachepolicy.rows_source(n.held(), n.cached))
                                          for n in nodes.values()])
        cands = [nodes[i].candidate() for i in order]
        w = self.weights
        frame = min(LOAD_FRAME_BYTES, w.bytes_per_neuron() // w.layers * w.neurons)
        return placement.planning_members(cands, w.bytes_per_neuron(), frame)

    def joined(self, name: str, now: float) -> None:
        """A node was welcomed and said what it caches: plan it with whoever joins with it
        (plan_joins); with settle_s 0, at once."""
        first, _, names = self.joins or (now, now, [])
        self.joins = (first, now, [*names, name])
        if self.cfg.settle_s == 0:
            self.replan("")

    def plan_joins(self, now: float) -> None:
        """Plan the joins waiting once placement.joins_due says they have settled."""
        if self.joins and placement.joins_due(now, self.joins[0], self.joins[1], self.cfg.settle_s,
                                               MAX_SETTLE * max(self.cfg.settle_s, 0.2)):
            self.replan("")

    def reweight(self) -> None:
        """Re-estimate node weights from observed latency (neurons served per second), once every
        serving node has enough samples; `plan.reweigh` decides whether that is worth a re-plan."""
        if self.pending or len(self.plan.ranges) < 2:
            return
        nodes = [self.members.serving(i) for i in self.plan.ranges]
        if any(n is None or n.weight_override or n.samples < placement.REWEIGHT_MIN_SAMPLES
               or not n.latency_ema for n in nodes):
            return
        try:
            verdict = reweigh(self.plan, {n.id: n.latency_ema for n in nodes}, self._members(),
                              self.reweight_streak, self.cfg.local_weight, self.weights.granule)
        except PlanError:
            return
        self.reweight_streak = verdict.streak
        if verdict.adopt is None:
            return
        for n in nodes:
            n.observed = verdict.measured[n.id]
        self.replan("re-weighted from observed latency: " + ", ".join(
            f"{n.name} {n.latency_ema * 1e3:.2f} ms" for n in nodes))

    def replan(self, reason: str) -> None:
        """Plan the current members under a new epoch and start shipping rows; the switch itself
        happens at a step boundary (tick)."""
        if self.joins:   # this plan takes every waiting join in
            names = self.joins[2]
            self.joins = None
            joined = f"node {names[0]} joined" if len(names) == 1 else f"nodes {', '.join(names)} joined"
            reason = f"{joined}; {reason}" if reason else joined
        members = self._members()
        try:
            new = self._plan(members)
        except PlanError as e:   # more nodes than neuron blocks: the newest ones wait
            units = self.weights.neurons // self.weights.granule
            log.warning("cannot plan all nodes (%s); keeping the first %d", e, units)
            new = self._plan(members[:units])
        if new == self.plan and not self.pending:
            return
        if self.pending:   # the superseded plan's reason still explains this one
            reason = f"{self.pending.reason}; {reason}"
        epoch = max(self.epoch, self.pending.epoch if self.pending else 0) + 1
        moved = sum(self._assign(self.members.nodes[nid], epoch, new.held(nid)) for nid in new.ranges)
        self.pending = Pending(epoch, new, time.monotonic(), reason, moved)
        log.info("epoch %d planned (%s): %s, local %s; %.1f MB to move", epoch, reason,
                 {self.members.nodes[i].name: r for i, r in new.ranges.items()}, list(new.local), moved / 1e6)

    def take_over(self, lost: int, reason: str) -> bool:
        """With replicas: a lost node's range joins a neighbour that already holds it
        (`replicas.takeover`), under a new epoch that ships no rows, so it switches at the next
        step boundary; False if that is not possible (the caller re-plans)."""
        new = takeover(self.plan, lost) if self.cfg.replicas > 1 and not self.pending else None
        if new is None or any(nid not in self.members.nodes for nid in new.ranges):
            return False
        epoch = self.epoch + 1
        for nid in new.ranges:
            n = self.members.nodes[nid]
            busy = n.load_epoch
            self._assign(n, epoch, new.held(nid))
            n.load_epoch = busy   # same rows: it shares its slices at once, keep asking it meanwhile
        self.pending = Pending(epoch, new, time.monotonic(), f"{reason} (replicas took over)", 0)
        self.restore_due = time.monotonic()
        log.info("epoch %d planned (%s): replicas take over, no rows move", epoch, reason)
        return True

    def maybe_restore(self, idle: bool) -> None:
        """After a takeover: re-plan (shipping rows) to give every range R holders again, when
        the engine is idle or RESTORE_WAIT_S later, so the shipping does not slow a stream."""
        due = self.restore_due
        if due is None or self.pending or not (idle or time.monotonic() - due > RESTORE_WAIT_S):
            return
        self.restore_due = None
        self.replan("restoring replicas")

    def _assign(self, n: NodeState, epoch: int, rng: tuple[int, int]) -> int:
        """Tell n its range for `epoch` and send the rows it does not hold; returns bytes sent."""
        n.assigned[epoch] = rng
        held = n.held()
        self.send(n, wire.Assign(epoch, rng[0], rng[1], max(n.ready_epoch, 0) if held else 0))
        w, sent = self.weights, 0
        chunks = placement.load_chunks(placement.rows_to_ship(rng, cachepolicy.rows_source(held, n.cached)),
                                       max(1, w.bytes_per_neuron() // w.layers), LOAD_FRAME_BYTES, w.granule)
        for layer in range(w.layers):
            for a, b in chunks:
                g, u, d = w.rows(layer, a, b)
                self.send(n, wire.Load(epoch, layer, a, b, g, u, d))
                sent += g.nbytes + u.nbytes + d.nbytes
        n.bytes_sent += sent
        n.load_epoch = epoch
        return sent

    def maybe_switch(self) -> None:
        """At a step boundary: adopt the pending plan once all its nodes hold their rows."""
        p = self.pending
        if p is None:
            return
        if any(nid not in self.members.nodes for nid in p.plan.ranges):
            self.pending = None
            self.replan(p.reason + " (re-planned)")
            return
        if any(self.members.nodes[nid].ready_epoch < p.epoch for nid in p.plan.ranges):
            return
        old_ranges = self.plan.ranges
        self.epoch, self.plan, self.pending = p.epoch, p.plan, None
        for nid in p.plan.ranges:
            self.members.nodes[nid].state = NodeStatus.ACTIVE
            self.members.nodes[nid].samples = 0
        for nid in old_ranges:
            n = self.members.nodes.get(nid)
            if n is not None and n.state == NodeStatus.DRAINING:
                log.info("node %d %r released", n.id, n.name)
                self.send(n, wire.Bye("released"))
                self.forget(n)
        secs = time.monotonic() - p.t0
        self.history.append({"epoch": p.epoch, "time": time.time(), "reason": p.reason,
                             "bytes_moved": p.moved, "seconds": round(secs, 3),
                             "ranges": {self.members.nodes[i].name: list(r) for i, r in p.plan.ranges.items()},
                             "local": [list(r) for r in p.plan.local]})
        self.history = self.history[-50:]
        log.info("epoch %d active after %.2fs (%s)", p.epoch, secs, p.reason)
