"""Two machines emulated on this box (issue 10, item 3), and the latency model checked on them.

- pinned: the server on core 0 and one node on core 1 (`--cpus`), against the server alone on
  core 0; single stream and 8 streams. Each process then has a core of its own, as on two
  machines (other users of the box aside), so the node may spin for the next layer (`spin_us`).
- delayed: the same pair, with an added one-way delay d on the node's data link
  (`--link-delay-ms d`, datalink.pause), single stream, d in 0, 0.1, 0.25, 0.5 ms.

The pinned server runs with `--overlap` (unless args.overlap is False): with 8 streams its
attention for one micro-batch runs while the node computes the other's MLP (overlap.py);
a single stream's decode is not split, a long prompt's prefill is cut into two pipelined halves
(TTFT is measured too).

The latency model (docs/benchmarks.md), per generated token:

    t_token(d) ≈ t_server + max_k t_node_k + layers · RTT(d),   RTT(d) = RTT(0) + 2 d

Its first three terms are what the d = 0 run measures, so the model predicts each delayed point
as t_token(0) + layers · 2 d; `delayed` reports both and their ratio.
"""
from __future__ import annotations

from pathlib import Path

import httpx

from .bench import ENV, complete, concurrent, say, single
from .bench_hf import PROMPT, long_prompt, median

PIN_STREAMS = 8
DELAYS_MS = (0.0, 0.1, 0.25, 0.5)
SPIN_US = 1000.0   # each pinned process has a core to itself, as on its own machine: spinning for the
                   # next message costs nobody anything (on a shared box it does: the default is 0)


def _cluster(args, nodes: int, precision: str, tag: str, node_args: list[str] = (), server_args: list[str] = ()):
    from .launch import LocalCluster
    logs = Path(args.out) / f"logs-emul-{tag}"
    logs.mkdir(parents=True, exist_ok=True)
    return LocalCluster(args.model, nodes, server_args=["--precision", precision, "--cpus", "0", *server_args],
                        node_args=["--cpus", "1", *node_args], env=ENV, log_dir=str(logs))


def _run(lc, n: int, reps: int, nodes: int, streams: bool, long_ids: list[int] | None = None) -> dict:
    s = single(lc, PROMPT, n, reps, nodes)
    row = {"tok_s_1": s["decode_tok_s"], "ms_per_token": 1000 / s["decode_tok_s"],
           "breakdown_ms_per_token": s["breakdown_ms_per_token"], "fallbacks": s["fallbacks"],
           "text": s["text"], "layers": s["wire"]["layers"]}
    if streams:
        complete(lc.url, PROMPT, 4)
        row[f"tok_s_{PIN_STREAMS}"] = concurrent(lc.url, PROMPT, n, PIN_STREAMS)
    if long_ids:
        with httpx.Client() as c:   # kept alive, as single's (bench.complete)
            complete(lc.url, long_ids, 1, c)   # first-call allocations of a long prompt
            row["ttft_long_s"] = median(complete(lc.url, long_ids, 1, c)[0] for _ in range(reps))
    return row


def _long_ids(args) -> list[int]:
    from transformers import AutoTokenizer

    from . import loader
    return long_prompt(AutoTokenizer.from_pretrained(str(loader.resolve(args.model))),
                       getattr(args, "prompt_tokens", 256))


def pinned(args, precision: str, n: int, reps: int, spin_us: float = SPIN_US) -> dict:
    """Server alone on core 0 vs server on core 0 + 1 node on core 1: tok/s at 1 and 8 streams."""
    out = {"spin_us": spin_us, "overlap": getattr(args, "overlap", True)}
    say("  emulation, pinned: the server alone on core 0 ...")
    long_ids = _long_ids(args)
    out["prompt_tokens"] = len(long_ids)
    with _cluster(args, 0, precision, "alone") as lc:
        out["alone"] = _run(lc, n, reps, 0, True, long_ids)
    say("  emulation, pinned: server on core 0 + 1 node on core 1 ...")
    spin = ["--spin-us", str(spin_us)]
    overlap = ["--overlap"] if getattr(args, "overlap", True) else []   # 8 streams: two micro-batches
    with _cluster(args, 1, precision, "pinned", node_args=spin, server_args=[*spin, *overlap]) as lc:
        out["pinned"] = _run(lc, n, reps, 1, True, long_ids)
    for k in ("1", str(PIN_STREAMS)):
        out[f"ratio_{k}"] = out["pinned"][f"tok_s_{k}"] / out["alone"][f"tok_s_{k}"]
    out["same_text"] = out["pinned"]["text"] == out["alone"]["text"]
    return out


def predict(t0_ms: float, layers: int, delay_ms: float) -> float:
    """The latency model's t_token (ms) at an added one-way delay, from the d = 0 point."""
    return t0_ms + layers * 2 * delay_ms


def delayed(args, precision: str, n: int, reps: int, delays=DELAYS_MS,
            spin_us: float = SPIN_US) -> list[dict]:
    """Server (core 0) + 1 node (core 1), single stream, at each added one-way link delay."""
    rows, t0 = [], None
    spin = ["--spin-us", str(spin_us)]
    for d in delays:
        say(f"  emulation, delayed: +{d} ms each way on the node link ...")
        with _cluster(args, 1, precision, f"delay-{d}", node_args=[*spin, "--link-delay-ms", str(d)],
                      server_args=spin) as lc:
            r = _run(lc, n, reps, 1, False)
        t0 = r["ms_per_token"] if t0 is None else t0
        model = predict(t0, r["layers"], d)
        rows.append({"delay_ms": d, "tok_s": r["tok_s_1"], "ms_per_token": r["ms_per_token"],
                     "model_ms_per_token": model, "measured_over_model": r["ms_per_token"] / model,
                     "wait_ms_per_token": r["breakdown_ms_per_token"]["waiting on nodes (mlp wait)"],
                     "fallbacks": r["fallbacks"]})
    return rows


def table(r: dict) -> str:
    """Markdown rows for the report."""
    out = []
    p = r.get("pinned")
    if p:
        a, b = p["alone"], p["pinned"]
        out += ["two machines emulated: pinned (server core 0, node core 1; spin "
                f"{p['spin_us']:.0f} µs, overlap {'on' if p.get('overlap') else 'off'}) vs the server alone on core 0",
                "| streams | server alone tok/s | server + 1 node tok/s | ratio |", "|---|---|---|---|",
                f"| 1 | {a['tok_s_1']:.1f} | {b['tok_s_1']:.1f} | {p['ratio_1']:.2f} |",
                f"| {PIN_STREAMS} | {a[f'tok_s_{PIN_STREAMS}']:.1f} | {b[f'tok_s_{PIN_STREAMS}']:.1f} | "
                f"{p[f'ratio_{PIN_STREAMS}']:.2f} |"]
        if "ttft_long_s" in a and "ttft_long_s" in b:
            out.append(f"TTFT, {p.get('prompt_tokens', '?')}-token prompt: server alone {a['ttft_long_s'] * 1000:.0f} ms, "
                       f"server + 1 node {b['ttft_long_s'] * 1000:.0f} ms")
    if r.get("delayed"):
        out += ["delayed (pinned pair, single stream): measured vs model t(0) + layers · 2d",
                "| added delay each way | tok/s | ms/token | model ms/token | measured ÷ model |",
                "|---|---|---|---|---|"]
        out += [f"| {d['delay_ms']} ms | {d['tok_s']:.1f} | {d['ms_per_token']:.1f} | "
                f"{d['model_ms_per_token']:.1f} | {d['measured_over_model']:.3f} |" for d in r["delayed"]]
    return "\n".join(out)
