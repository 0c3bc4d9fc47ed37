"""The server's view of the cluster: membership changes, heartbeats, and the links the
dispatch layer scatters and gathers over.

The engine thread owns it: `poll()` when idle, `step_boundary()` before each step (the only
place a plan switches), and `send_mlp()` / `receive()` during a step. Plans, epochs and weight
shipping are in epochs.py (policy in placement.py); the control socket in transport.py, the
data links in links.py; the handshake in handshake.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import zmq

from . import cachepolicy, fastframe, slicecache, wire
from .auth import Keyring
from .config import ServerConfig
from .epochs import Epochs
from .handshake import Handshake
from .datalink import FramingError, LinkError
from .links import DataLinks
from .membership import Membership, NodeState, NodeStatus
from .mlp import MLPWeights
from .plan import Plan
from .polling import wait_readable
from .transport import MAX_BAD_MESSAGES, ControlSocket, PeerGuard

log = logging.getLogger("skynet.cluster")
MAX_MISSES = 3   # consecutive missed deadlines before a node is planned out
MAX_STRAYS = 1024   # replies read outside a step's wait, kept for the dispatcher (beyond: dropped)


@dataclass(frozen=True)
class Reply:
    """What a node sent during a step: its MlpOut, or None, why, and a short reason (a metrics
    label) when its message was refused or its data link broke."""

    node: NodeState
    msg: wire.MlpOut | None
    why: str = ""
    reason: str = "bad message"
    direct: bool = False   # it came over the node's data link
    read_at: float = 0.0   # perf_counter when read, for one read before the dispatcher saw it


class Cluster:
    def __init__(self, cfg: ServerConfig, weights: MLPWeights, model_name: str,
                 ctx: zmq.Context | None = None):
        self.cfg, self.weights, self.model_name = cfg, weights, model_name
        self.keyring = Keyring(cfg.cluster_key)
        self.ctrl = ControlSocket(cfg.node_host, cfg.node_port, ctx)
        cfg.node_port = self.ctrl.port
        self.links = DataLinks(cfg.node_host, cfg.data_port, wire.MAX_FRAME_BYTES) if cfg.direct else None
        if self.links:
            cfg.data_port = self.links.port
        self.qtypes = weights.format.qtype_bytes() if weights.quantized else b""
        t0 = time.perf_counter()
        self.model_hash = slicecache.content_hash(weights, max(2, cfg.threads))
        log.info("model content hash %s (%.2fs)", self.model_hash.hex()[:16], time.perf_counter() - t0)
        self.limits = wire.Limits(hidden=weights.hidden, layers=weights.layers)
        self.members = Membership()
        self.guard = PeerGuard()
        self.epochs = Epochs(cfg, weights, self.members, self.send, self._forget)
        self.handshake = Handshake(self.keyring, self.members, self.send, self._welcome_msg,
                                   lambda n: None,   # planned once its Holding arrives
                                   self.lose, self._forget)
        self.last_ping = 0.0
        self.drained_at = time.monotonic()   # when the control socket was last read empty
        self.last_reweight = time.monotonic()
        self.unreachable: dict[int, str] = {}   # node id -> why a send failed; lost at the next tick
        self.strays: list[Reply] = []   # MlpOut read while idle or at a step boundary (take_strays)

    @property
    def nodes(self) -> dict[int, NodeState]:
        return self.members.nodes

    @property
    def epoch(self) -> int:
        return self.epochs.epoch

    @property
    def plan(self) -> Plan:
        return self.epochs.plan

    @property
    def pending(self):
        return self.epochs.pending

    @property
    def history(self) -> list[dict]:
        return self.epochs.history

    def replan(self, reason: str) -> None:
        self.epochs.replan(reason)

    @property
    def by_ident(self) -> dict[bytes, int]:
        return self.members.by_ident

    @property
    def dropped(self) -> int:
        return self.guard.dropped

    def serving(self, nid: int) -> NodeState | None:
        return self.members.serving(nid)

    def poll_handles(self) -> list:
        """What an idle engine thread waits on (with zmq.Poller) before calling poll(0)."""
        return [self.ctrl.sock, *([self.links.fileno()] if self.links else [])]

    # ------------------------------------------------------------------ engine thread hooks
    def poll(self, timeout_ms: int, idle: bool = True) -> None:
        """Idle: handle whatever nodes sent (waiting up to timeout_ms), then a step boundary."""
        if self.ctrl.poll(timeout_ms):
            self._drain_control()
        else:
            self.drained_at = time.monotonic()
        if self.links:
            self.guard.dropped += self.links.accept(self.handshake.link_owner)
        self.tick()
        self.epochs.maybe_restore(idle)

    def step_boundary(self) -> tuple[int, Plan]:
        """Read what nodes sent, judge heartbeats, switch plans; the (epoch, plan) of this step."""
        self.poll(0, idle=False)
        return self.epoch, self.plan

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
        for n in list(self.nodes.values()):   # silence counts only while we listened
            if self.drained_at - n.last_seen > 3 * self.cfg.heartbeat_s:
                self.lose(n, f"no heartbeat for {self.drained_at - n.last_seen:.1f}s")
        self.epochs.plan_joins(now)
        self.epochs.maybe_switch()
        if now - self.last_reweight >= self.cfg.reweight_s:
            self.last_reweight = now
            self.epochs.reweight()

    def _drain_control(self) -> None:
        """Handle what came on the control socket. A reply read here (idle, or at a step boundary)
        is no step's: it is kept for the dispatcher, which counts it as the duplicate (and latency
        sample) it was waiting for, or as late; either way never summed."""
        while self.ctrl.poll(0):
            r = self.handle_frames(*self.ctrl.recv())
            if r is not None and r.msg is not None:
                if len(self.strays) < MAX_STRAYS:   # its rows' count is all it is still good for
                    y = r.msg.y
                    rows = np.empty(y.shape[:-1] + (0,), y.dtype)
                    self.strays.append(replace(r, msg=replace(r.msg, y=rows), read_at=time.perf_counter()))
                else:
                    self.guard.dropped += 1
        self.drained_at = time.monotonic()

    def take_strays(self) -> list[Reply]:
        """The replies read outside a step's wait since the last call (see _drain_control)."""
        strays, self.strays = self.strays, []
        return strays

    # ------------------------------------------------------------------ data plane (dispatch.py)
    def send_mlp(self, n: NodeState, out: fastframe.Outgoing, timeout_s: float = 1.0) -> bool:
        """Send one Mlp to a serving node: over its data link (fixed header) when it has one,
        else (or if the link breaks now) over ZeroMQ (msgpack); False if it cannot be reached."""
        return (self.links is not None and self.links.send(n, out.link, timeout_s)) or self.send_frames(n, out.zmq)

    def receive(self, waiting: list[int], timeout_s: float, spin_s: float = 0.0) -> list[Reply]:
        """Wait up to timeout_s for the nodes in `waiting`; returns the replies (and refusals)
        that came. Control messages that arrive meanwhile are handled, but plans switch only
        at step_boundary."""
        nodes = [n for n in map(self.serving, waiting) if n is not None]
        if not nodes:
            return []
        if self.links is None:
            ready, use_zmq = [], True
            wait_readable(self.ctrl.sock, timeout_s, spin_s)
        else:
            ready, use_zmq = self.links.wait(nodes, self.ctrl.sock, timeout_s, spin_s)
        replies = [self._read_link(n, timeout_s) for n in ready]
        while use_zmq and self.ctrl.poll(0):
            replies.append(self.handle_frames(*self.ctrl.recv()))
        return [r for r in replies if r is not None]

    def _read_link(self, n: NodeState, timeout_s: float) -> Reply:
        try:
            frames = self.links.read(n, timeout_s)
        except LinkError as e:
            if isinstance(e, FramingError):
                self.bad(n, f"data link: {e}")
            return Reply(n, None, str(e), "link lost")
        n.last_seen = time.monotonic()
        try:
            msg = fastframe.decode(frames, self.limits)   # a fixed or a msgpack header
        except wire.WireError as e:
            self.bad(n, f"data link: {e}")
            return Reply(n, None, str(e))
        if not isinstance(msg, wire.MlpOut):
            self.bad(n, f"data link: {msg.TYPE} is not an mlp_out")
            return Reply(n, None, f"{msg.TYPE} on the data link")
        return Reply(n, msg, direct=True)

    def late(self) -> None:
        """A reply for a call no longer in flight: never summed, only counted."""
        self.guard.dropped += 1

    def missed(self, nid: int, why: str) -> None:
        """A node missed a step's deadline (dispatch counts at most one per step; its range went
        to a replica or was computed here). One hiccup is not a failure, since evicting means
        reloading every row: MAX_MISSES steps in a row are."""
        n = self.nodes.get(nid)
        if n is None:
            return
        n.misses += 1
        if n.misses >= MAX_MISSES:
            self.lose(n, f"{why} {n.misses} times in a row")
        else:
            log.warning("node %r %s (%d in a row); its range went to a replica or was computed here",
                        n.name, why, n.misses)

    def bad(self, n: NodeState, why: str) -> None:
        """Drop and count a node's message; it is disconnected after MAX_BAD_MESSAGES."""
        self.guard.dropped += 1
        n.bad += 1
        log.warning("dropped a message from node %r: %s", n.name, why)
        if n.bad > MAX_BAD_MESSAGES:
            self.lose(n, "too many bad messages")

    # ------------------------------------------------------------------ control messages
    def send(self, n: NodeState, msg: wire.Message) -> bool:
        return self.send_frames(n, wire.encode(msg))

    def send_frames(self, n: NodeState, frames: list) -> bool:
        """Send encoded frames to n (encode once, send to many); False if n is unreachable."""
        why = self.ctrl.send(n.ident, frames)
        if why and n.state != NodeStatus.GONE:   # lost at the next tick, never in the middle of a replan
            self.unreachable.setdefault(n.id, why)
        return why is None

    def handle(self, frames) -> Reply | None:
        """One ROUTER message [identity, header, tensors...] outside a step: a reply is late."""
        r = self.handle_frames(bytes(frames[0]), frames[1:])
        if r is not None and r.msg is not None:
            self.late()
        return r

    def handle_frames(self, ident: bytes, body: list) -> Reply | None:
        if self.guard.ignored(ident):
            self.guard.dropped += 1
            return None
        node = self.members.by_identity(ident)
        try:
            msg = wire.decode(body, self.limits)
        except wire.WireError as e:
            return self._refuse(node, ident, str(e))
        if node is not None and node.id in self.unreachable:
            self.guard.dropped += 1   # we cannot answer it: it is lost at the next tick, never used
            return None
        if node is not None:
            node.last_seen = time.monotonic()
        if isinstance(msg, wire.Hello):
            self.handshake.hello(ident, msg)
        elif node is None:
            self._refuse(None, ident, f"{msg.TYPE} from an unregistered peer")
        elif isinstance(msg, wire.Challenge):
            self.handshake.proof(node, msg)
        elif node.state == NodeStatus.JOINING:
            return self._refuse(node, ident, f"{msg.TYPE} before the handshake finished")
        elif isinstance(msg, wire.MlpOut):
            return Reply(node, msg)
        elif isinstance(msg, wire.Ready):
            self._ready(node, msg.epoch)
        elif isinstance(msg, wire.Holding):
            return self._holding(node, ident, msg)
        elif isinstance(msg, wire.Ping):
            self.send(node, wire.Pong(msg.ts))
        elif isinstance(msg, wire.Bye):
            self.leave(node)
        elif not isinstance(msg, wire.Pong):   # a pong only says it is alive (last_seen)
            return self._refuse(node, ident, f"{msg.TYPE} is not a message a node sends")
        return None

    def _refuse(self, node: NodeState | None, ident: bytes, why: str) -> Reply | None:
        if node is not None:
            self.bad(node, why)
            return Reply(node, None, why)
        count = self.guard.strike(ident)
        if count <= MAX_BAD_MESSAGES:
            log.warning("dropped a message from unknown peer %s: %s%s", ident.hex()[:10], why,
                        " (ignoring this peer from now on)" if count == MAX_BAD_MESSAGES else "")
        return None

    def _welcome_msg(self, n: NodeState, token: bytes) -> wire.Welcome:
        w = self.weights
        return wire.Welcome(n.id, self.model_name, w.hidden, w.layers, w.neurons, self.cfg.heartbeat_s,
                            self.qtypes, self.links.port if self.links else 0, token, self.model_hash)

    def _holding(self, n: NodeState, ident: bytes, h: wire.Holding) -> Reply | None:
        """What a welcomed node has cached: counted on if the hash is ours; then it is planned in
        (with whoever joins with it: Epochs.joined)."""
        if n.state != NodeStatus.LOADING or n.reported:
            return self._refuse(n, ident, "a second holding")
        w, n.reported = self.weights, True
        n.cached = cachepolicy.reported_range(self.model_hash, h.model_hash, h.start, h.end, w.neurons, w.granule)
        if n.cached:
            log.info("node %d %r has neurons [%d, %d) cached", n.id, n.name, *n.cached)
        elif h.end:
            log.warning("node %d %r reported a cache for another model or an invalid range: shipping all",
                        n.id, n.name)
        self.epochs.joined(n.name, time.monotonic())
        return None

    def _ready(self, n: NodeState, epoch: int) -> None:
        if epoch in n.assigned:   # the switch itself waits for the next step boundary
            n.ready_epoch = max(n.ready_epoch, epoch)

    # ------------------------------------------------------------------ membership changes
    def leave(self, n: NodeState) -> None:
        """Graceful leave: plan the node out; it is released once the new plan serves."""
        if n.state in (NodeStatus.DRAINING, NodeStatus.GONE):
            return
        log.info("node %d %r asked to leave; moving its neurons", n.id, n.name)
        n.state = NodeStatus.DRAINING
        self.replan(f"node {n.name} left")

    def lose(self, n: NodeState, why: str) -> None:
        """A node failed: stop using it now (its range is computed locally) and replan."""
        if n.state == NodeStatus.GONE:
            return
        log.warning("node %d %r lost: %s", n.id, n.name, why)
        was_planned = self.epochs.planned(n.id)
        n.state = NodeStatus.GONE
        self.ctrl.send(n.ident, wire.encode(wire.Bye(why)))
        self._forget(n)
        if was_planned and not self.epochs.take_over(n.id, f"node {n.name} lost: {why}"):
            self.replan(f"node {n.name} lost: {why}")

    def _forget(self, n: NodeState) -> None:
        if n.link is not None:
            n.link.close()
            n.link = None
        self.members.forget(n)

    def close(self) -> None:
        for n in list(self.nodes.values()):
            self.send(n, wire.Bye("server shutting down"))
            if n.link is not None:
                n.link.close()
        if self.links:
            self.links.close()
        self.ctrl.close()

