"""The dispatch layer against an in-process Cluster and scripted nodes (threads speaking the
protocol): plans switch only at step boundaries, whatever arrives during a step."""
from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from skynet import wire
from skynet.cluster import Cluster
from skynet.config import ServerConfig
from skynet.dispatch import ClusterMLP
from skynet.mlp import MLPWeights
from skynet.placement import rows_to_ship

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
                    self.sock.send_multipart(wire.encode(wire.MlpOut(m.step, m.epoch, m.layer, y)))
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
        _until(cluster, lambda: cluster.pending is not None and late.missing == 0, "b to hold its rows")
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
