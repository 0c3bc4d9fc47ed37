"""The server's view of the cluster: membership, plans and epochs, weight shipping, heartbeats.

One ZeroMQ ROUTER socket carries everything to and from nodes; it belongs to the engine thread,
which calls `poll()` when idle and `tick()` at each step boundary. A plan change gets a new
epoch: nodes load the rows they lack in the background while the current epoch keeps serving,
and `tick()` switches atomically once every node of the new plan is ready.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from . import wire
from .auth import Keyring
from .config import ServerConfig
from .mlp import MLPWeights
from .plan import Member, Plan, PlanError, plan, reweigh

log = logging.getLogger("skynet.cluster")
LOAD_FRAME_BYTES = 16 << 20
MAX_BAD_MESSAGES = 20
REWEIGHT_MIN_SAMPLES = 60     # MLP replies since the last switch before latency counts


@dataclass
class NodeState:
    id: int
    ident: bytes
    name: str
    cores: int
    mem_bytes: int
    gflops: float
    weight_override: float
    state: str = "joining"          # joining, loading, active, draining, gone
    nonce: bytes = b""
    server_nonce: bytes = b""
    assigned: dict = field(default_factory=dict)   # epoch -> (start, end)
    ready_epoch: int = -1
    load_epoch: int = -1            # last epoch assigned to it; it assembles that before any Mlp
    last_seen: float = field(default_factory=time.monotonic)
    joined: float = field(default_factory=time.time)
    latency_ema: float | None = None  # seconds per MLP call, scaled to 1 row-block
    samples: int = 0                  # latency samples since the last plan switch
    observed: float = 0.0             # weight re-estimated from latency (neurons / s), 0 = none yet
    bad: int = 0
    misses: int = 0                   # consecutive missed step deadlines
    bytes_sent: int = 0

    @property
    def weight(self) -> float:
        return self.weight_override or self.observed or max(self.gflops, 1e-3)

    def held(self) -> tuple[int, int] | None:
        return self.assigned.get(self.ready_epoch)

    @property
    def loading_rows(self) -> bool:
        """It is assembling a new epoch (rows queued ahead of any Mlp, then copying them into slices):
        an Mlp sent now would wait behind that work and miss its step deadline."""
        return self.ready_epoch < self.load_epoch


class Cluster:
    def __init__(self, cfg: ServerConfig, weights: MLPWeights, model_name: str,
                 ctx: zmq.Context | None = None):
        self.cfg, self.weights, self.model_name = cfg, weights, model_name
        self.keyring = Keyring(cfg.cluster_key)
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if cfg.node_port:
            self.sock.bind(f"tcp://{cfg.node_host}:{cfg.node_port}")
        else:
            cfg.node_port = self.sock.bind_to_random_port(f"tcp://{cfg.node_host}")
        self.qtypes = weights.format.qtype_bytes() if weights.quantized else b""
        self.limits = wire.Limits(hidden=weights.hidden, layers=weights.layers)
        self.nodes: dict[int, NodeState] = {}
        self.by_ident: dict[bytes, int] = {}
        self.next_id = 1
        self.epoch, self.plan = 0, self._plan([])
        self.pending: tuple[int, Plan, float, str, int] | None = None  # epoch, plan, t0, reason, bytes
        self.history: list[dict] = []
        self.dropped = 0
        self.bad_peers: dict[bytes, int] = {}
        self.last_ping = 0.0
        self.last_reweight = time.monotonic()
        self.reweight_streak = 0
        self.unreachable: dict[int, str] = {}   # node id -> why a send failed; lost at the next tick
        self.on_mlp_out = None   # set by ClusterMLP: handles replies that arrive while idle

    # ------------------------------------------------------------------ event loop hooks
    def poll(self, timeout_ms: int) -> None:
        """Handle whatever nodes sent, waiting up to timeout_ms for the first message."""
        if self.sock.poll(timeout_ms):
            while self.sock.poll(0):
                self.handle(self.sock.recv_multipart(copy=False))
        self.tick()

    def tick(self) -> None:
        while self.unreachable:
            nid, why = self.unreachable.popitem()
            if nid in self.nodes:
                self.lose(self.nodes[nid], why)
        now = time.monotonic()
        if now - self.last_ping >= self.cfg.heartbeat_s:
            self.last_ping = now
            for n in list(self.nodes.values()):
                self.send(n, wire.Ping(time.time()))
        for n in list(self.nodes.values()):
            if now - n.last_seen > 3 * self.cfg.heartbeat_s:
                self.lose(n, f"no heartbeat for {now - n.last_seen:.1f}s")
        self.maybe_switch()
        if now - self.last_reweight >= self.cfg.reweight_s:
            self.last_reweight = now
            self.reweight()

    def reweight(self) -> None:
        """Re-estimate node weights from observed latency (neurons served per second), once every
        serving node has enough samples; `plan.reweigh` decides whether that is worth a re-plan."""
        if self.pending or len(self.plan.ranges) < 2:
            return
        nodes = [self.serving(i) for i in self.plan.ranges]
        if any(n is None or n.weight_override or n.samples < REWEIGHT_MIN_SAMPLES or not n.latency_ema
               for n in nodes):
            return
        try:
            verdict = reweigh(self.plan, {n.id: n.latency_ema for n in nodes}, self.members(),
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

    def send(self, n: NodeState, msg: wire.Message) -> bool:
        return self.send_frames(n, wire.encode(msg))

    def send_frames(self, n: NodeState, frames: list) -> bool:
        """Send encoded frames to n (encode once, send to many); False if n is unreachable."""
        try:
            self.sock.send_multipart([n.ident, *frames], copy=False)
            return True
        except zmq.ZMQError as e:   # EHOSTUNREACH: the peer's connection is gone
            if n.state != "gone":   # lost at the next tick, never in the middle of a replan
                self.unreachable.setdefault(n.id, f"unreachable ({e.strerror})")
            return False

    # ------------------------------------------------------------------ incoming
    def handle(self, frames) -> None:
        ident, body = bytes(frames[0]), frames[1:]
        if self.bad_peers.get(ident, 0) >= MAX_BAD_MESSAGES:
            self.dropped += 1
            return
        nid = self.by_ident.get(ident)
        node = self.nodes.get(nid) if nid is not None else None
        try:
            msg = wire.decode(body, self.limits)
        except wire.WireError as e:
            self._bad(node, ident, str(e))
            return
        if node is not None and node.id in self.unreachable:
            self.dropped += 1   # we cannot answer it: it is lost at the next tick, never used
            return
        if node is not None:
            node.last_seen = time.monotonic()
        if isinstance(msg, wire.Hello):
            self._hello(ident, msg)
        elif node is None:
            self._bad(None, ident, f"{msg.TYPE} from an unregistered peer")
        elif isinstance(msg, wire.Challenge):
            self._proof(node, msg)
        elif node.state == "joining":
            self._bad(node, ident, f"{msg.TYPE} before the handshake finished")
        elif isinstance(msg, wire.MlpOut):
            if self.on_mlp_out is None or not self.on_mlp_out(node, msg):
                self.dropped += 1   # a late reply: never summed into another step
        elif isinstance(msg, wire.Ready):
            self._ready(node, msg.epoch)
        elif isinstance(msg, wire.Ping):
            self.send(node, wire.Pong(msg.ts))
        elif isinstance(msg, wire.Bye):
            self.leave(node)
        elif not isinstance(msg, wire.Pong):   # a pong only says the node is alive
            self._bad(node, ident, f"{msg.TYPE} is not a message a node sends")

    def _bad(self, node: NodeState | None, ident: bytes, why: str) -> None:
        """Drop and count; a registered node is disconnected after MAX_BAD_MESSAGES, an unknown
        peer is ignored silently after that many (so garbage cannot flood the log either)."""
        self.dropped += 1
        if node is not None:
            node.bad += 1
            log.warning("dropped a message from node %r: %s", node.name, why)
            if node.bad > MAX_BAD_MESSAGES:
                self.lose(node, "too many bad messages")
            return
        if len(self.bad_peers) > 10_000:
            self.bad_peers.clear()
        count = self.bad_peers[ident] = self.bad_peers.get(ident, 0) + 1
        if count <= MAX_BAD_MESSAGES:
            log.warning("dropped a message from unknown peer %s: %s%s", ident.hex()[:10], why,
                        " (ignoring this peer from now on)" if count == MAX_BAD_MESSAGES else "")

    def _hello(self, ident: bytes, h: wire.Hello) -> None:
        if ident in self.by_ident:
            self.lose(self.nodes[self.by_ident[ident]], "registered again")
        n = NodeState(self.next_id, ident, h.name, h.cores, h.mem_bytes, h.gflops, h.weight, nonce=h.nonce)
        self.next_id += 1
        self.nodes[n.id], self.by_ident[ident] = n, n.id
        if self.keyring.enabled:   # the node proves first: no HMAC of ours for a stranger to attack
            n.server_nonce = self.keyring.nonce()
            self.send(n, wire.Challenge(n.server_nonce, b""))
        else:
            self._welcome(n)

    def _proof(self, n: NodeState, c: wire.Challenge) -> None:
        if n.state != "joining" or not self.keyring.check(b"node", n.server_nonce, n.nonce, c.proof):
            log.warning("node %r (%s) refused: wrong cluster key", n.name, n.ident.hex()[:10])
            self.send(n, wire.Bye("wrong cluster key"))
            self._forget(n)
            return
        # now the server proves it holds the key too, before anything else moves
        self.send(n, wire.Challenge(b"", self.keyring.proof(b"server", n.nonce, n.server_nonce)))
        self._welcome(n)

    def _welcome(self, n: NodeState) -> None:
        w = self.weights
        n.state = "loading"
        self.send(n, wire.Welcome(n.id, self.model_name, w.hidden, w.layers, w.neurons, self.cfg.heartbeat_s,
                                  self.qtypes))
        log.info("node %d %r joined: %d cores, %.1f GB free, %.1f GFLOP/s%s", n.id, n.name, n.cores,
                 n.mem_bytes / 1e9, n.gflops, f", weight {n.weight_override}" if n.weight_override else "")
        self.replan(f"node {n.name} joined")

    def _ready(self, n: NodeState, epoch: int) -> None:
        if epoch not in n.assigned:
            return
        n.ready_epoch = max(n.ready_epoch, epoch)
        self.maybe_switch()

    # ------------------------------------------------------------------ membership changes
    def leave(self, n: NodeState) -> None:
        """Graceful leave: plan the node out; it is released once the new plan serves."""
        if n.state in ("draining", "gone"):
            return
        log.info("node %d %r asked to leave; moving its neurons", n.id, n.name)
        n.state = "draining"
        self.replan(f"node {n.name} left")

    def lose(self, n: NodeState, why: str) -> None:
        """A node failed: stop using it now (its range is computed locally) and replan."""
        if n.state == "gone":
            return
        log.warning("node %d %r lost: %s", n.id, n.name, why)
        was_planned = n.id in self.plan.ranges or (self.pending and n.id in self.pending[1].ranges)
        n.state = "gone"
        try:
            self.sock.send_multipart([n.ident, *wire.encode(wire.Bye(why))])
        except zmq.ZMQError:
            pass
        self._forget(n)
        if was_planned:
            self.replan(f"node {n.name} lost: {why}")

    def _forget(self, n: NodeState) -> None:
        n.state = "gone"
        self.by_ident.pop(n.ident, None)
        self.nodes.pop(n.id, None)

    def serving(self, nid: int) -> NodeState | None:
        n = self.nodes.get(nid)
        return n if n is not None and n.state in ("active", "draining") else None

    # ------------------------------------------------------------------ plans
    def _plan(self, members: list[Member]) -> Plan:
        return plan(self.weights.neurons, members, self.cfg.local_weight, self.weights.granule)

    def members(self) -> list[Member]:
        row_bytes = self.weights.bytes_per_neuron()
        nodes = [n for n in sorted(self.nodes.values(), key=lambda n: n.id) if n.state in ("loading", "active")]
        # Observed weights are neurons/s, measured ones GFLOP/s: put unobserved nodes on the
        # observed scale through the observed nodes' average ratio.
        ratios = [n.observed / n.gflops for n in nodes if n.observed and n.gflops > 0]
        scale = sum(ratios) / len(ratios) if ratios else 1.0
        return [Member(n.id, n.weight if (n.weight_override or n.observed) else max(n.gflops, 1e-3) * scale,
                       max(1, n.mem_bytes // row_bytes) if n.mem_bytes else None) for n in nodes]

    def replan(self, reason: str) -> None:
        members = self.members()
        try:
            new = self._plan(members)
        except PlanError as e:   # more nodes than neuron blocks: the newest ones wait
            units = self.weights.neurons // self.weights.granule
            log.warning("cannot plan all nodes (%s); keeping the first %d", e, units)
            new = self._plan(members[:units])
        if new == self.plan and not self.pending:
            return
        if self.pending:   # the superseded plan's reason still explains this one
            reason = f"{self.pending[3]}; {reason}"
        epoch = max(self.epoch, self.pending[0] if self.pending else 0) + 1
        moved = sum(self._assign(self.nodes[nid], epoch, r) for nid, r in new.ranges.items())
        self.pending = (epoch, new, time.monotonic(), reason, moved)
        log.info("epoch %d planned (%s): %s, local %s; %.1f MB to move", epoch, reason,
                 {self.nodes[i].name: r for i, r in new.ranges.items()}, list(new.local), moved / 1e6)
        self.maybe_switch()

    def _assign(self, n: NodeState, epoch: int, rng: tuple[int, int]) -> int:
        """Tell n its range for `epoch` and send the rows it does not hold; returns bytes sent."""
        n.assigned[epoch] = rng
        held = n.held()
        self.send(n, wire.Assign(epoch, rng[0], rng[1], max(n.ready_epoch, 0) if held else 0))
        pieces = [rng] if held is None else _minus(rng, held)
        w, sent = self.weights, 0
        per_layer = max(1, w.bytes_per_neuron() // w.layers)
        step = max(1, LOAD_FRAME_BYTES // per_layer // w.granule) * w.granule   # on block bounds
        for layer in range(w.layers):
            for s, e in pieces:
                for a in range(s, e, step):
                    b = min(e, a + step)
                    g, u, d = w.rows(layer, a, b)
                    self.send(n, wire.Load(epoch, layer, a, b, g, u, d))
                    sent += g.nbytes + u.nbytes + d.nbytes
        n.bytes_sent += sent
        n.load_epoch = epoch
        return sent

    def maybe_switch(self) -> None:
        """At a step boundary: adopt the pending plan once all its nodes hold their rows."""
        if not self.pending:
            return
        epoch, new, t0, reason, moved = self.pending
        if any(nid not in self.nodes or self.nodes[nid].ready_epoch < epoch for nid in new.ranges):
            if any(nid not in self.nodes for nid in new.ranges):
                self.pending = None
                self.replan(reason + " (re-planned)")
            return
        old_ranges = self.plan.ranges
        self.epoch, self.plan, self.pending = epoch, new, None
        for nid in new.ranges:
            self.nodes[nid].state = "active"
            self.nodes[nid].samples = 0
        for nid in old_ranges:
            n = self.nodes.get(nid)
            if n is not None and n.state == "draining":
                log.info("node %d %r released", n.id, n.name)
                self.send(n, wire.Bye("released"))
                self._forget(n)
        secs = time.monotonic() - t0
        self.history.append({"epoch": epoch, "time": time.time(), "reason": reason,
                             "bytes_moved": moved, "seconds": round(secs, 3),
                             "ranges": {self.nodes[i].name: list(r) for i, r in new.ranges.items()},
                             "local": [list(r) for r in new.local]})
        self.history = self.history[-50:]
        log.info("epoch %d active after %.2fs (%s)", epoch, secs, reason)

    def close(self) -> None:
        for n in list(self.nodes.values()):
            self.send(n, wire.Bye("server shutting down"))
        self.sock.close(0)


def _minus(r: tuple[int, int], held: tuple[int, int]) -> list[tuple[int, int]]:
    """Parts of range r outside range held (0, 1 or 2 pieces)."""
    out = []
    if r[0] < held[0]:
        out.append((r[0], min(r[1], held[0])))
    if r[1] > held[1]:
        out.append((max(r[0], held[1]), r[1]))
    return [p for p in out if p[1] > p[0]]
