"""Round trip per layer with 2 nodes and (almost) no node compute, next to a raw TCP ping-pong
measured in the same run, on the same machine.

Three ways to move one decode row (hidden H, float32) to two node processes and a partial back:

- raw: a bare TCP_NODELAY ping-pong with two echo processes, the same bytes each way as our
  messages' payload (the floor: what the kernel and the wake-ups cost);
- direct: ClusterMLP over each node's direct data link (datalink.py);
- zmq: ClusterMLP with `--no-direct`, every Mlp/MlpOut through ZeroMQ.

Our nodes are real `skynet node` processes that each hold 32 neurons per layer, so their compute
is a few microseconds. The three are measured in interleaved rounds (raw, direct, zmq, raw, ...)
so that load from other processes hits each alike; figures are medians of per-call times.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import numpy as np

ECHO = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf, out = bytearray(int(sys.argv[2])), bytes(int(sys.argv[3]))
while True:
    view = memoryview(buf)
    while view.nbytes:
        k = s.recv_into(view)
        if not k:
            sys.exit(0)
        view = view[k:]
    s.sendall(out)
"""


def _weights(hidden: int, layers: int, neurons: int):
    """Random MLP weights in Q8_0 blocks (the fast precision, as the bench's model runs)."""
    from .mlp import MLPWeights
    from .quant import QMatrix, QType, quantize_q8_0
    rng = np.random.default_rng(0)
    rand = lambda rows, cols: QMatrix(QType.Q8_0, quantize_q8_0(   # noqa: E731
        rng.standard_normal((rows, cols), dtype=np.float32) * 0.01), cols)
    return MLPWeights([rand(neurons, hidden) for _ in range(layers)], [rand(neurons, hidden) for _ in range(layers)],
                      [rand(hidden, neurons) for _ in range(layers)])


@contextlib.contextmanager
def _echo_peers(payload: int, nodes: int):
    """Connected sockets to `nodes` echo processes that answer `payload` bytes with as many."""
    srv = socket.create_server(("127.0.0.1", 0))
    procs = [subprocess.Popen([sys.executable, "-c", ECHO, str(srv.getsockname()[1]), str(payload),
                               str(payload)]) for _ in range(nodes)]
    conns = []
    try:
        for _ in procs:
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(c)
        yield conns
    finally:
        for c in conns:
            c.close()
        srv.close()
        for p in procs:
            p.kill()
            p.wait()


def _raw_round(conns, out: bytes, buf: bytearray) -> None:
    for c in conns:
        c.sendall(out)
    for c in conns:
        view = memoryview(buf)
        while view.nbytes:
            view = view[c.recv_into(view):]


@contextlib.contextmanager
def _cluster(weights, nodes: int, direct: bool, spin_us: float = 0.0, delay_ms: float = 0.0,
             timeout: float = 120.0):
    """An in-process Cluster + ClusterMLP with `nodes` real node processes, all serving."""
    from .cluster import Cluster
    from .config import ServerConfig
    from .dispatch import ClusterMLP
    cluster = Cluster(ServerConfig(node_port=0, direct=direct, heartbeat_s=5.0), weights, "rtt")
    args = [sys.executable, "-m", "skynet.cli", "node", "--server", f"127.0.0.1:{cluster.cfg.node_port}",
            "--gflops", "1", "--spin-us", str(spin_us), "--link-delay-ms", str(delay_ms)]
    procs = [subprocess.Popen(args + ["--name", f"rtt{k}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for k in range(nodes)]
    try:
        end = time.monotonic() + timeout
        while not (len(cluster.plan.ranges) == nodes and cluster.pending is None
                   and all(n.state == "active" for n in cluster.nodes.values())):
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                raise RuntimeError("bench-rtt: the nodes did not become active")
            cluster.poll(20)
        yield ClusterMLP(cluster, min_deadline_s=5.0, spin_s=spin_us / 1e6, miss_floor_s=5.0)
    finally:
        cluster.close()
        for p in procs:
            p.kill()
            p.wait()


def _ours_round(mlp, x: np.ndarray, layers: int, times: list) -> None:
    mlp.begin_step()
    for layer in range(layers):
        t0 = time.perf_counter()
        mlp(layer, x)
        times.append(time.perf_counter() - t0)


def measure(hidden: int = 576, layers: int = 30, steps: int = 40, rounds: int = 8, nodes: int = 2,
            spin_us: float = 0.0) -> dict:
    """Median round trip per layer (µs) of raw TCP, our direct link and ZeroMQ, and the ratios."""
    weights = _weights(hidden, layers, 32 * nodes)
    x = np.ones((1, hidden), np.float32)
    out, buf = bytes(hidden * 4), bytearray(hidden * 4)
    times = {"raw": [], "direct": [], "zmq": []}
    with _echo_peers(hidden * 4, nodes) as conns, _cluster(weights, nodes, True, spin_us) as direct, \
            _cluster(weights, nodes, False, spin_us) as zmq_mlp:
        for _ in range(steps):   # warm-up: caches, the nodes' first calls
            _raw_round(conns, out, buf)
        _ours_round(direct, x, layers, [])
        _ours_round(zmq_mlp, x, layers, [])
        for _ in range(rounds):
            for _ in range(steps * layers // 4):
                t0 = time.perf_counter()
                _raw_round(conns, out, buf)
                times["raw"].append(time.perf_counter() - t0)
            for _ in range(steps // 4):
                _ours_round(direct, x, layers, times["direct"])
                _ours_round(zmq_mlp, x, layers, times["zmq"])
        fallbacks = direct.stats["fallbacks"] + zmq_mlp.stats["fallbacks"]
        direct_share = direct.stats["direct_replies"] / max(1, sum(direct.stats["replies"].values()))
    us = {k: float(np.median(v) * 1e6) for k, v in times.items()}
    return {"nodes": nodes, "hidden": hidden, "spin_us": spin_us, "calls": {k: len(v) for k, v in times.items()},
            "raw_tcp_us": round(us["raw"], 1), "direct_us": round(us["direct"], 1), "zmq_us": round(us["zmq"], 1),
            "direct_over_raw": round(us["direct"] / us["raw"], 2), "zmq_over_raw": round(us["zmq"] / us["raw"], 2),
            "fallbacks": fallbacks, "direct_reply_share": round(direct_share, 3)}


def measure_delays(delays_ms=(0.0, 0.1, 0.25, 0.5), hidden: int = 576, layers: int = 30, steps: int = 10,
                   nodes: int = 2) -> list[dict]:
    """Direct-link round trip per layer with an added one-way delay each way (`--link-delay-ms`):
    measured, and what `RTT(0) + 2 delay` predicts."""
    weights = _weights(hidden, layers, 32 * nodes)
    x = np.ones((1, hidden), np.float32)
    rows, base = [], None
    for d in delays_ms:
        times: list = []
        with _cluster(weights, nodes, True, delay_ms=d) as mlp:
            _ours_round(mlp, x, layers, [])
            for _ in range(steps):
                _ours_round(mlp, x, layers, times)
        us = float(np.median(times) * 1e6)
        base = us if base is None else base
        rows.append({"delay_ms": d, "rtt_us": round(us, 1), "predicted_us": round(base + 2000 * d, 1)})
    return rows


def table(r: dict) -> str:
    delays = [f"| direct, +{d['delay_ms']} ms each way | {d['rtt_us']} | predicted {d['predicted_us']} |"
              for d in r.get("delays", [])]
    return "\n".join([
        f"round trip per layer, {r['nodes']} nodes, 1 row of hidden {r['hidden']}, no node compute (median µs)",
        "| transport | µs | ÷ raw TCP |", "|---|---|---|",
        f"| raw TCP ping-pong (same bytes, same run) | {r['raw_tcp_us']} | 1.00 |",
        f"| SkyNet, direct data link | {r['direct_us']} | {r['direct_over_raw']} |",
        f"| SkyNet, ZeroMQ (--no-direct) | {r['zmq_us']} | {r['zmq_over_raw']} |", *delays])
