"""The dispatch layer against an in-process Cluster and scripted nodes (threads speaking the
protocol): plans switch only at step boundaries, whatever arrives during a step."""
from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from skynet import wire
from skynet.cluster import MAX_MISSES, Cluster
from skynet.config import ServerConfig
from skynet.dispatch import ClusterMLP
from skynet.membership import EMA
from skynet.mlp import MLPWeights
from skynet.placement import rows_to_ship
from skynet.replicas import Latency

H, LAYERS, NEURONS = 8, 2, 12


class ScriptedNode(threading.Thread):
    """A node in a thread: registers, loads its rows, says ready (when `may_ready` is set) and
    answers every Mlp with zeros after running `before_reply(msg)`."""

    def __init__(self, port: int, name: str, before_reply=None):
        super().__init__(daemon=True)
        self.port, self.name, self.before_reply = port, name, before_reply
        self.may_ready, self.stop = threading.Event(), threading.Event()
        self.may_ready.set()
        self.mlp_epochs: list[int] = []
        self.missing, self.epoch, self.held, self.assigned = None, None, None, None
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def run(self):
        self.sock.send_multipart(wire.encode(wire.Hello(self.name, 1, 1 << 30, 1.0, 1.0, b"\0" * 16)))
        limits = wire.Limits(hidden=H, layers=LAYERS)
        try:
            while not self.stop.is_set():
                if self.missing == 0 and self.may_ready.is_set():
                    self.sock.send_multipart(wire.encode(wire.Ready(self.epoch)))
                    self.missing, self.held = None, self.assigned
                if not self.sock.poll(10):
                    continue
                m = wire.decode(self.sock.recv_multipart(), limits)
                if isinstance(m, wire.Assign):
                    need = rows_to_ship((m.start, m.end), self.held if m.base else None)
                    self.epoch, self.missing = m.epoch, sum(e - s for s, e in need) * LAYERS
                    self.assigned = (m.start, m.end)
                elif isinstance(m, wire.Welcome):   # nothing cached: it is planned on this
                    self.sock.send_multipart(wire.encode(wire.Holding(m.model_hash)))
                elif isinstance(m, wire.Load):
                    self.missing -= m.end - m.start
                elif isinstance(m, wire.Mlp):
                    self.mlp_epochs.append(m.epoch)
                    if self.before_reply:
                        self.before_reply(m)
                    y = np.zeros(m.x.shape, np.float32)
                    self.sock.send_multipart(wire.encode(wire.MlpOut(m.step, m.epoch, m.layer, y, m.start, m.end)))
                elif isinstance(m, wire.Ping):
                    self.sock.send_multipart(wire.encode(wire.Pong(m.ts)))
                elif isinstance(m, wire.Bye):
                    return
        finally:
            self.sock.close(0)


def _weights() -> MLPWeights:
    rng = np.random.default_rng(0)
    return MLPWeights(*[[rng.standard_normal((NEURONS, H), dtype=np.float32) for _ in range(LAYERS)]
                        for _ in range(3)])


def _until(cluster: Cluster, cond, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        cluster.poll(10)


def test_a_plan_switches_only_at_a_step_boundary():
    cluster = Cluster(ServerConfig(node_port=0, heartbeat_s=30), _weights(), "m")
    port = cluster.cfg.node_port
    late = None

    def b_ready_mid_call(m: wire.Mlp) -> None:
        if late is not None and m.layer == 0:   # b says ready while the server waits for a
            late.may_ready.set()
            time.sleep(0.2)

    a = ScriptedNode(port, "a", b_ready_mid_call)
    try:
        a.start()
        _until(cluster, lambda: len(cluster.plan.ranges) == 1 and not cluster.pending, "a to serve")
        mlp = ClusterMLP(cluster, min_deadline_s=5.0)
        late = ScriptedNode(port, "b")
        late.may_ready.clear()
        late.start()
        # a's Ready for the pending epoch must be in too: a node still loading rows is not asked
        # (dispatch._ask), which a loaded box can make last past b's rows
        _until(cluster, lambda: cluster.pending is not None and late.missing == 0
               and not any(n.loading_rows for n in cluster.nodes.values() if n.name == "a"),
               "b to hold its rows and a to be ready")
        epoch = cluster.epoch
        mlp.begin_step()
        x = np.ones((1, H), np.float32)
        mlp(0, x)                                      # b's ready arrives during this call
        assert cluster.epoch == epoch and cluster.pending is not None
        mlp(1, x)
        assert a.mlp_epochs == [epoch, epoch] and mlp.stats["fallbacks"] == 0
        mlp.begin_step()                               # the boundary: now it switches
        assert cluster.epoch == epoch + 1 and len(cluster.plan.ranges) == 2 and mlp.epoch == epoch + 1
        mlp(0, x)
        assert a.mlp_epochs[-1] == epoch + 1 and late.mlp_epochs == [epoch + 1]
    finally:
        cluster.close()
        for n in (a, late):
            if n is not None:
                n.stop.set()
                n.join(timeout=5)


@contextlib.contextmanager
def _replicated(before_reply=None, on_exit=lambda: None):
    """A --replicas 2 cluster of scripted nodes a (primary of [0, 6)) and b; both hold all 12.
    Yields (cluster, nodes); on the way out, on_exit() (to free a node a test holds), then every
    thread and socket is stopped."""
    cluster = Cluster(ServerConfig(node_port=0, heartbeat_s=30, replicas=2), _weights(), "m")
    nodes = [ScriptedNode(cluster.cfg.node_port, "a", before_reply), ScriptedNode(cluster.cfg.node_port, "b")]
    try:
        for n in nodes:
            n.start()
            _until(cluster, lambda: len(cluster.plan.ranges) == len([m for m in nodes if m.is_alive()])
                   and not cluster.pending, f"{n.name} to serve")
        yield cluster, nodes
    finally:
        on_exit()
        cluster.close()
        for n in nodes:
            n.stop.set()
            if n.is_alive():
                n.join(timeout=5)


def _steps(mlp: ClusterMLP, k: int) -> float:
    """k steps of LAYERS layers; the slowest step's seconds."""
    worst = 0.0
    for _ in range(k):
        t0 = time.perf_counter()
        mlp.begin_step()
        for layer in range(LAYERS):
            mlp(layer, np.ones((1, H), np.float32))
        worst = max(worst, time.perf_counter() - t0)
    return worst


def _busy_box_mlp(cluster: Cluster, monkeypatch) -> ClusterMLP:
    """Hedge and miss floors of 100 and 300 ms instead of 10 and 100: the scripted nodes are
    threads of this process, and a loaded box stalls them for tens of ms. A node that sleeps
    0.5 s or never answers still crosses both."""
    monkeypatch.setattr("skynet.replicas.HEDGE_FLOOR_S", 0.1)
    return ClusterMLP(cluster, min_deadline_s=0.3, miss_floor_s=0.3)


def _idle_until(mlp: ClusterMLP, cond, timeout: float = 5.0) -> None:
    """Step boundaries with no work, as an engine between requests takes them, until cond():
    late replies are read and deadlines pass."""
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
        mlp.begin_step()


def _read_strays(cluster: Cluster, count: int, timeout: float = 5.0) -> None:
    """Let the engine idle (Cluster.poll) until `count` replies came outside a step."""
    end = time.monotonic() + timeout
    while len(cluster.strays) < count and time.monotonic() < end:
        cluster.poll(20)


def test_a_late_primary_is_hedged_to_its_replica_and_one_slow_step_does_not_evict(monkeypatch):
    slow = threading.Event()
    with _replicated(lambda m: time.sleep(0.5) if slow.is_set() else None) as (cluster, nodes):
        assert cluster.plan.held(1) == cluster.plan.held(2) == (0, NEURONS)
        mlp = _busy_box_mlp(cluster, monkeypatch)
        _steps(mlp, 10)                       # the reply-time distribution is learnt
        hedges = mlp.stats["hedges"]          # 0 unless a stall past 100 ms hedged one
        assert mlp.stats["fallbacks"] == 0
        slow.set()
        worst = _steps(mlp, 1)                # a: 0.5 s per reply, for one step
        slow.clear()
        assert mlp.stats["hedges"] == hedges + 1 and mlp.stats["replica_replies"] >= LAYERS, mlp.stats
        assert mlp.stats["fallbacks"] == 0, mlp.stats
        assert worst < 0.5, worst             # the step never waited for a's answer
        _read_strays(cluster, 1)              # a's late reply: a duplicate, not summed
        _steps(mlp, 4)
        assert 1 in cluster.nodes and cluster.nodes[1].misses == 0, "one slow step evicted a healthy node"
        assert mlp.stats["duplicates"] >= 1


def test_a_hung_primary_is_lost_after_max_misses_steps_not_layers(monkeypatch):
    hung, release = threading.Event(), threading.Event()
    with _replicated(lambda m: release.wait() if hung.is_set() else None, release.set) as (cluster, nodes):
        mlp = _busy_box_mlp(cluster, monkeypatch)
        _steps(mlp, 10)
        hung.set()                            # a takes each Mlp and never answers
        for k in range(1, MAX_MISSES):
            _steps(mlp, 1)                    # hedged to b, the rest of the step skips a
            _idle_until(mlp, lambda: cluster.nodes[1].misses >= k)   # a's calls reach their deadline
            assert cluster.nodes[1].misses == k, (k, cluster.nodes[1].misses)   # one per step, not layer
        _steps(mlp, 1)
        _idle_until(mlp, lambda: 1 not in cluster.nodes)
        assert 1 not in cluster.nodes, "a hung node was never planned out"
        assert mlp.stats["fallbacks"] == 0, mlp.stats   # b answered every range a was asked


def test_always_both_asks_every_holder_and_sums_each_range_once():
    with _replicated() as (cluster, nodes):
        # A long classic deadline: on a busy box the scripted holder that loses the race can fall
        # several replies behind, and its answers must count as duplicates, not misses.
        mlp = ClusterMLP(cluster, min_deadline_s=5.0, always_both=True, miss_floor_s=5.0)
        _steps(mlp, 6)
        _idle_until(mlp, lambda: not mlp.outrun)   # read the losers' last answers
        s = mlp.stats
        assert s["fallbacks"] == 0 and s["hedges"] == 0, s
        assert s["calls"] == 6 * LAYERS and sum(s["replies"].values()) == 2 * s["calls"], s   # one per range
        assert s["duplicates"] == 2 * 6 * LAYERS, s    # the other holder's answers, read, never summed
        assert all(n.mlp_epochs for n in nodes)


def test_a_reply_read_while_idle_is_the_duplicate_it_answers_not_a_miss():
    """The losing holder answers after the step: the engine's idle poll reads its replies off
    the control socket. They reach the dispatcher at the next step as duplicates (and latency
    samples taken when read), never dropped, and the node is not charged a miss for them."""
    slow = threading.Event()
    with _replicated(lambda m: time.sleep(0.05) if slow.is_set() else None) as (cluster, nodes):   # a
        mlp = ClusterMLP(cluster, min_deadline_s=1.0, always_both=True, miss_floor_s=1.0)
        _steps(mlp, 3)
        _idle_until(mlp, lambda: not mlp.outrun)
        dup0, dropped0, a = mlp.stats["duplicates"], cluster.dropped, cluster.nodes[1]
        ema0 = a.latency_ema
        slow.set()
        t0 = time.perf_counter()
        _steps(mlp, 1)                        # b wins all 4 calls; a answers 0.05-0.2 s later
        slow.clear()
        outstanding = len(mlp.outrun)         # 4, unless the step itself outlasted a reply or two
        assert outstanding and outstanding + mlp.stats["duplicates"] - dup0 == 2 * LAYERS, mlp.stats
        _read_strays(cluster, outstanding)    # the engine, idle, reads them ...
        assert all(r.msg.y.nbytes == 0 and r.msg.y.shape[0] == 1 for r in cluster.strays)   # rows kept, not bytes
        while time.perf_counter() - t0 < 1.2:   # ... and stays idle past a's 1 s deadline
            cluster.poll(20)
        assert not cluster.nodes[1].misses
        mlp.begin_step()
        assert mlp.stats["duplicates"] == dup0 + 2 * LAYERS, mlp.stats
        assert cluster.dropped == dropped0 and a.misses == 0 and not mlp.outrun
        keep = (1 - EMA) ** (2 * LAYERS)   # 4 samples, each read 0.05-0.2 s after its send (<= 0.5 s)
        assert a.latency_ema <= keep * ema0 + (1 - keep) * 0.5, (ema0, a.latency_ema)   # not ~1.2 s


def test_the_miss_floor_holds_a_steady_nodes_deadline_up():
    """A node answering in 1 ms +- 0.1 would be missed after 100 ms (the floor, --miss-floor-ms);
    a noisy host raises the floor, and the classic deadline still caps it."""
    cluster = Cluster(ServerConfig(node_port=0), _weights(), "m")
    try:
        steady = SimpleNamespace(lat=Latency(0.001, 0.0001, 50), latency_ema=0.001)
        assert ClusterMLP(cluster, min_deadline_s=5.0)._miss_limit(steady, 1.0) == pytest.approx(0.1)
        raised = ClusterMLP(cluster, min_deadline_s=5.0, miss_floor_s=2.0)
        assert raised._miss_limit(steady, 1.0) == pytest.approx(2.0)
        assert ClusterMLP(cluster, min_deadline_s=0.3, miss_floor_s=2.0)._miss_limit(steady, 1.0) == pytest.approx(0.3)
    finally:
        cluster.close()
