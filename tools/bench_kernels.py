#!/usr/bin/env python3
"""Times skynet.quant's kernels (1 thread unless marked) against numpy float32 matmuls of the same matrices.

Shapes of SmolLM2-135M (the default model, Q4_1): per layer gate and up (1536 x 576) and down
(576 x 1536, float64 output as the MLP slices use it), 30 layers; the LM head is Q8_0 49152 x 576;
the down projections again as Q4_K, Q5_K and Q6_K (what Q4_K_M files hold).
Weights are random blocks with realistic scales; numpy multiplies their float32 dequantization.

Every kernel path the CPU runs (generic, avx2, avx512) is timed in the same run; numpy once.
Run with the project's venv:  .venv/bin/python tools/bench_kernels.py [--layers 30] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from skynet import _qkernels, quant
from skynet.quant import BLOCKS, QMatrix, QType

H, I, VOCAB = 576, 1536, 49152


def random_matrix(rng: np.random.Generator, qtype: QType, rows: int, cols: int) -> QMatrix:
    """Random quants with small positive fp16 scales (and Q4_1 mins, K-quant dmins) like a trained checkpoint's."""
    values, size = BLOCKS[qtype]
    blocks = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)
    k = values == 256
    scale = (rng.uniform(0.002, 0.02, (rows, cols // values)) / (32 if k else 1)).astype(np.float16).view(np.uint8)
    at = 208 if qtype == QType.Q6_K else 0
    blocks[:, :, at:at + 2] = scale.reshape(rows, cols // values, 2)
    if qtype in (QType.Q4_1, QType.Q4_K, QType.Q5_K):
        m = ((1 / 32 if k else -8) * rng.uniform(0.002, 0.02, (rows, cols // values))).astype(np.float16).view(np.uint8)
        blocks[:, :, 2:4] = m.reshape(rows, cols // values, 2)
    return QMatrix(qtype, blocks.reshape(rows, -1), cols)


def best_ms(fn, repeat: int, clock=time.thread_time) -> float:
    """Best of `repeat` timings of fn() in ms, after one warm-up call. The best, not the median,
    because a shared 2-vCPU box adds noise that only ever makes a run slower; single-threaded runs
    use this thread's CPU time (time.thread_time), which other processes' load does not inflate."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return min(times)


def mlp_fns(layers, n: int, rng: np.random.Generator, threads: int = 1):
    """The quantized MLP and its numpy float32 reference over all layers, for n activation rows."""
    x = rng.standard_normal((n, H)).astype(np.float32)
    h = rng.standard_normal((n, I)).astype(np.float32)
    gu_out = np.empty((n, I), np.float32)
    down_out = np.empty((n, H), np.float64)

    def fast():
        for g, u, d, *_ in layers:
            xq = quant.quantize_act(x)
            g(xq, out=gu_out, threads=threads)
            u(xq, out=gu_out, threads=threads)
            d(h, out=down_out, threads=threads)

    def ref():
        for *_, wgu_t, down_t in layers:
            x @ wgu_t
            h @ down_t

    return fast, ref


def kernels() -> list[str]:
    """The kernel paths this CPU runs, slowest first."""
    found = [k for k in ("generic", "avx2", "avx512") if _qkernels.set_kernel(k) == k]
    _qkernels.set_kernel("auto")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kernels", default=",".join(kernels()), help="comma-separated paths to time")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    paths = args.kernels.split(",")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, auto kernel={quant.kernel_name()}, "
          f"{time.strftime('%Y-%m-%d')}, best of {args.repeat} (N=256: of {max(1, args.repeat // 2)}), ms "
          "(1 thread: thread CPU time; 2thr: wall clock)")
    layers = []
    for _ in range(args.layers):
        g, u, d = (random_matrix(rng, QType.Q4_1, I, H), random_matrix(rng, QType.Q4_1, I, H),
                   random_matrix(rng, QType.Q4_1, H, I))
        wgu_t = np.ascontiguousarray(np.concatenate([g.dequantize(), u.dequantize()]).T)   # (H, 2I)
        layers.append((g, u, d, wgu_t, np.ascontiguousarray(d.dequantize().T)))          # down_t (I, H)
    head = random_matrix(rng, QType.Q8_0, VOCAB, H)
    head_t = np.ascontiguousarray(head.dequantize().T)                                   # (H, V)
    cases = [(f"MLP x{args.layers} Q4_1 N={n}" + (f" {t}thr" if t > 1 else ""), n, t)
             for n, t in ((1, 1), (1, 2), (8, 1), (8, 2), (256, 1), (256, 2))]
    print(f"{'case':<26}" + "".join(f"{p:>10}" for p in paths) + f"{'numpy f32':>11}")
    with threadpool_limits(1):
        for label, n, t in cases:
            reps = args.repeat if n < 256 else max(1, args.repeat // 2)
            row = []
            for p in paths:
                _qkernels.set_kernel(p)
                fast, ref = mlp_fns(layers, n, np.random.default_rng(n), t)
                if p == "generic" and n * args.layers > 2000:
                    row.append(float("nan"))                    # minutes; not worth the wait
                    continue
                row.append(best_ms(fast, reps, time.thread_time if t == 1 else time.perf_counter))
            _qkernels.set_kernel("auto")
            r = best_ms(ref, reps) if t == 1 else float("nan")
            print(f"{label:<26}" + "".join(f"{v:10.2f}" for v in row) + f"{r:11.2f}")
        x = rng.standard_normal((1, H)).astype(np.float32)
        out = np.empty((1, VOCAB), np.float32)
        row = []
        for p in paths:
            _qkernels.set_kernel(p)
            row.append(best_ms(lambda: head(x, out=out), args.repeat * 4))
        _qkernels.set_kernel("auto")
        r = best_ms(lambda: x @ head_t, args.repeat * 4)
        print(f"{'LM head Q8_0 N=1':<26}" + "".join(f"{v:10.2f}" for v in row) + f"{r:11.2f}")
        # K-quants (Q4_K_M files): 576 columns is no multiple of 256, so in SmolLM2-135M only the down
        # projections (576 x 1536) can be Q4_K / Q5_K / Q6_K
        for qt in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
            downs = [random_matrix(rng, qt, H, I) for _ in range(args.layers)]
            downs_t = [np.ascontiguousarray(d.dequantize().T) for d in downs]
            for n, t in ((1, 1), (256, 1), (256, 2)):
                hx = np.random.default_rng(n).standard_normal((n, I)).astype(np.float32)
                o = np.empty((n, H), np.float64)
                reps = args.repeat if n < 256 else max(1, args.repeat // 2)
                row = []
                for p in paths:
                    _qkernels.set_kernel(p)
                    if p == "generic" and n * args.layers > 2000:
                        row.append(float("nan"))
                        continue
                    row.append(best_ms(lambda: [d(hx, out=o, threads=t) for d in downs], reps,
                                       time.thread_time if t == 1 else time.perf_counter))
                _qkernels.set_kernel("auto")
                r = best_ms(lambda: [hx @ d for d in downs_t], reps) if t == 1 else float("nan")
                label = f"down x{args.layers} {qt.name} N={n}" + (f" {t}thr" if t > 1 else "")
                print(f"{label:<26}" + "".join(f"{v:10.2f}" for v in row) + f"{r:11.2f}")
        tiny = random_matrix(rng, QType.Q4_1, 32, 32)
        xt = rng.standard_normal((1, 32)).astype(np.float32)
        xq, calls = quant.quantize_act(xt), 20000
        ys = np.empty((1, 32), np.float32)
        for name, fn in (("x float32", lambda: tiny(xt)), ("x QAct", lambda: tiny(xq)),
                         ("x, out=", lambda: tiny(xt, out=ys)),
                         ("quantize_act", lambda: quant.quantize_act(xt))):
            us = best_ms(lambda: [fn() for _ in range(calls)], 3) * 1e3 / calls
            print(f"per-call overhead, 32x32 Q4_1, {name:<13} {us:6.2f} us")


if __name__ == "__main__":
    main()
