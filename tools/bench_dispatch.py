#!/usr/bin/env python3
"""The server's three ways through one distributed MLP call, interleaved in one process.

Two real `skynet node` processes (bench_rtt's cluster: 32 Q8_0 neurons each, hidden 576, 30
layers, so their compute is a few µs) and one decode row; rounds of 30 layers per path, in a
shuffled order each round, so load from elsewhere hits every path alike:

- whole call: FastPath.call (compiled send and wait, books without a Call);
- scatter + gather: the compiled send and wait with a Call (what overlap's micro-batches use);
- python: ClusterMLP's Python path on the server (the nodes keep their compiled loop).

Prints each path's median, p10 and p90 wall time per call and the server thread's CPU per call.
Run with the project's venv:  .venv/bin/python tools/bench_dispatch.py [--rounds 40]
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from skynet import bench_rtt

PATHS = ("whole call", "scatter + gather", "python")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    layers, x = 30, np.ones((1, 576), np.float32)
    with bench_rtt._cluster(bench_rtt._weights(576, layers, 64), 2, True) as mlp:
        fast = mlp.fast
        whole = fast.call
        for _ in range(5):
            bench_rtt._ours_round(mlp, x, layers, [])
        wall = {p: [] for p in PATHS}
        cpu = dict.fromkeys(PATHS, 0.0)
        order = list(PATHS)
        for _ in range(a.rounds):
            random.shuffle(order)
            for p in order:
                mlp.fast = None if p == "python" else fast
                fast.call = whole if p == "whole call" else (lambda *_: None)
                mlp.begin_step()
                c0 = time.thread_time()
                for layer in range(layers):
                    t0 = time.perf_counter()
                    mlp(layer, x)
                    wall[p].append(time.perf_counter() - t0)
                cpu[p] += time.thread_time() - c0
        mlp.fast, fast.call = fast, whole
    print(f"one decode row, 2 nodes, {a.rounds} rounds x {layers} layers per path (µs per call)")
    print("| path | median | p10 | p90 | server CPU |\n|---|---|---|---|---|")
    for p in PATHS:
        w = np.array(wall[p]) * 1e6
        print(f"| {p} | {np.median(w):.1f} | {np.percentile(w, 10):.1f} | {np.percentile(w, 90):.1f} | "
              f"{cpu[p] * 1e6 / len(w):.1f} |")


if __name__ == "__main__":
    main()
