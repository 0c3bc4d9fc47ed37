#!/usr/bin/env python3
"""The fast precision's MLP slice (quant.qmlp, one C call) against the numpy composition it
replaced, silu(g) * u alone, and a prefill of the default model in process.

- qmlp: 30 layers of the default model's whole MLP, 1 and 8 rows, thread CPU, best of 5;
  "numpy silu" is quantize_act -> gate/up -> numpy's silu_mul -> down (the earlier path).
- memory: one row through 30 layers in turn (weights from L3/DRAM, as in a decode step) against
  one layer again and again (its 1.7 MB stay in L2); the ratio is what the weight stream costs.
- head: the LM head (Q8_0, 49152 x 576) for one row, 1 thread.
- silu: 8 x 1536 values, our C loop (whichever clone the CPU picked) against numpy's.
- prefill: Model.forward over a 256-token (and an 11-token) prompt, server alone, 2 threads.
- decode: 64 tokens after an 11-token prompt, 2 threads, the C attention (`compiled_attention`)
  against numpy's, 6 alternating rounds.
Run with the project's venv:  .venv/bin/python tools/bench_slice.py
"""
from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from skynet import _qkernels, loader, quant
from skynet.arch import arch_from_config
from skynet.mlp import LocalMLP, silu_mul
from skynet.model import Model, Segment


def best(fn, reps: int = 5, inner: int = 10) -> float:
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        out.append((time.thread_time() - t0) / inner)
    return min(out)


def main() -> None:
    src = loader.open_model(None)
    model = Model(arch_from_config(src.config), src.tensors("fast"), 2)
    w = model.mlp_weights
    slices = [w.slice(i, 0, w.neurons) for i in range(w.layers)]
    for sl in slices:   # 1 thread: thread CPU counts only the calling thread's work
        sl.threads = 1

    def numpy_path(sl, x):
        xq = quant.quantize_act(x)
        return sl.down(silu_mul(sl.gate(xq), sl.up(xq)), dtype=np.float64)

    rng = np.random.default_rng(0)
    for rows in (1, 8):
        x = rng.standard_normal((rows, w.hidden), dtype=np.float32)
        ours = best(lambda: [sl(x) for sl in slices])
        theirs = best(lambda: [numpy_path(sl, x) for sl in slices])
        print(f"MLP, {w.layers} layers, {rows} row(s), 1 thread: qmlp {ours * 1e3:.2f} ms, numpy silu {theirs * 1e3:.2f} ms")
    x = rng.standard_normal((1, w.hidden), dtype=np.float32)
    turn = best(lambda: [sl(x) for sl in slices]) / w.layers
    one = best(lambda: [slices[0](x) for _ in slices]) / w.layers
    print(f"MLP per layer, 1 row, 1 thread: {turn * 1e6:.1f} µs with 30 layers in turn, {one * 1e6:.1f} µs "
          f"L2-resident ({turn / one:.2f}x)")
    print(f"LM head, 1 row, 1 thread: {best(lambda: model.lm_head(x, threads=1), inner=5) * 1e3:.2f} ms")
    g = rng.standard_normal(8 * w.neurons).astype(np.float32)
    u = g.copy()
    c = best(lambda: _qkernels.silu_mul(g.copy(), u, g.size), inner=1000)
    n = best(lambda: silu_mul(g.copy(), u), inner=1000)
    print(f"silu * u over {g.size} values: C {c * 1e6:.1f} µs, numpy {n * 1e6:.1f} µs")
    mlp = LocalMLP(w)
    for sl in mlp.slices:
        sl.threads = 2
    with threadpool_limits(1):   # BLAS: 1 thread in fast (config.blas_threads)
        for n_tok in (256, 11):
            toks = np.arange(1000, 1000 + n_tok)

            def run():
                t0 = time.perf_counter()
                model.forward(toks, [Segment(model.new_cache(512), 0, n_tok, 0)], mlp)
                return time.perf_counter() - t0
            run()
            ts = sorted(run() for _ in range(7))
            print(f"prefill {n_tok} tokens in process, 2 threads: best {ts[0] * 1e3:.0f} ms, median {ts[3] * 1e3:.0f} ms")
        per = {True: [], False: []}
        for _ in range(6):
            for compiled in (True, False):
                model.compiled_attention = compiled
                cache = model.new_cache(80)
                model.forward(np.arange(1000, 1011), [Segment(cache, 0, 11, 0)], mlp)
                t0 = time.perf_counter()
                for i in range(64):
                    model.forward(np.array([1000 + i]), [Segment(cache, 0, 1, 11 + i)], mlp)
                per[compiled].append((time.perf_counter() - t0) / 64)
        model.compiled_attention = True
        for compiled, name in ((True, "C attention"), (False, "numpy attention")):
            ts = sorted(per[compiled])
            print(f"decode, {name}, 2 threads: best {ts[0] * 1e3:.2f} ms/token, median {ts[3] * 1e3:.2f}")


if __name__ == "__main__":
    main()
