"""`skynet bench`: SkyNet against HF transformers, in one run on one machine.

Same model, same prompt, float32, greedy. HF runs first in this process (2 torch threads) and is
freed before any cluster starts. SkyNet is measured end to end over HTTP on a LocalCluster
(server + node processes on 127.0.0.1). Prints tables, writes results.json and bench.png to --out.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from .bench_hf import PROMPT, decode_only, long_prompt, median, plot, ratio, run_hf, table

QUICK_TOKENS = 16
STREAMS = (1, 4, 8)
SCALING = (0, 1, 2)
KILL_TOKENS, KILL_AFTER = 64, 15
ENV = {"SKYNET_NO_PROGRESS": "1"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- HTTP
def complete(url: str, prompt, max_tokens: int, client: httpx.Client | None = None) -> tuple[float, dict]:
    """One non-streamed greedy completion of exactly max_tokens tokens: (seconds, response)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = (client or httpx).post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def concurrent(url: str, prompt, n: int, k: int) -> float:
    """k streams at once, n tokens each: aggregate generated tokens/s over the wall time."""
    barrier, done, errors = threading.Barrier(k + 1), [0] * k, []

    def worker(i: int) -> None:
        try:
            with httpx.Client() as c:
                barrier.wait()
                done[i] = complete(url, prompt, n, c)[1]["usage"]["completion_tokens"]
        except Exception as e:  # reported after the join
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) / wall


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


# ---------------------------------------------------------------------------- SkyNet
def single(lc, prompt: str, n: int, reps: int, nodes: int) -> dict:
    """Single-stream figures of a running cluster, with the per-token time and wire breakdown.

    The breakdown is the engine and MLP stats deltas over the `reps` timed requests divided by the
    tokens they generated (their prefill steps included); wire bytes are per token row (position)."""
    complete(lc.url, prompt, 4)   # warm-up: first-call allocations, node connections
    ttft_short = median(complete(lc.url, prompt, 1)[0] for _ in range(reps))
    before = lc.cluster()
    runs = [complete(lc.url, prompt, n) for _ in range(reps)]
    after = lc.cluster()
    t = median(r[0] for r in runs)
    got = runs[0][1]["usage"]["completion_tokens"]
    assert got == n, f"SkyNet generated {got} tokens, expected {n}"
    eng, mlp = delta(after["engine"], before["engine"]), delta(after["mlp"], before["mlp"])
    tokens, rows = reps * n, max(eng["rows"], 1)
    ms = lambda s: 1000 * s / tokens   # noqa: E731
    theory = 2 * nodes * after["layers"] * after["hidden"] * 4
    wire = (mlp["bytes_out"] + mlp["bytes_in"]) / rows
    wall = sum(r[0] for r in runs)
    return {
        "nodes": nodes, "decode_tok_s": n / t, "decode_only_tok_s": decode_only(n, t, ttft_short),
        "ttft_short_s": ttft_short, "text": runs[0][1]["choices"][0]["text"],
        "breakdown_ms_per_token": {
            "waiting on nodes (mlp wait)": ms(mlp["wait_s"]),
            "server-local MLP": ms(mlp["local_s"]),
            "attention + norms + other": ms(eng["forward_s"] - mlp["wait_s"] - mlp["local_s"]
                                            - eng["head_s"]),
            "LM head": ms(eng["head_s"]),
            "sampling": ms(eng["sample_s"]),
            "outside the engine (HTTP, queue, detok)": ms(wall - eng["forward_s"] - eng["sample_s"]),
            "total (wall)": ms(wall)},
        "wire": {"bytes_per_token": wire, "theory_bytes_per_token": theory, "ratio": ratio(wire, theory),
                 "rows": eng["rows"], "generated": tokens, "layers": after["layers"], "hidden": after["hidden"]},
        "fallbacks": mlp["fallbacks"], "plan_changes": after["epoch"] - before["epoch"]}


def cluster(args, nodes: int):
    from .launch import LocalCluster
    logs = Path(args.out) / f"logs-{nodes}-nodes"
    say(f"starting a local cluster: server + {nodes} node(s) (logs in {logs}) ...")
    logs.mkdir(parents=True, exist_ok=True)
    return LocalCluster(args.model, nodes, env=ENV, log_dir=str(logs))


def join_figures(lc, nodes: int) -> dict:
    """Add a node to the running cluster; the rebalance's time and bytes, as the server logged them."""
    epoch, t0 = lc.cluster()["epoch"], time.perf_counter()
    lc.add_node("joiner")
    lc.wait_active(nodes + 1, 180)
    wall = time.perf_counter() - t0
    hist = [h for h in lc.cluster()["rebalances"] if h["epoch"] > epoch]
    reb = next((h for h in hist if "joiner joined" in h["reason"]), hist[-1])
    return {"from_nodes": nodes, "to_nodes": nodes + 1, "rebalance_s": reb["seconds"],
            "bytes_moved": reb["bytes_moved"], "spawn_to_active_s": wall, "reason": reb["reason"]}


def kill_figures(lc, prompt: str, victim: str, nodes_after: int) -> dict:
    """Stream a request, SIGKILL a node after KILL_AFTER tokens; inter-token gaps around it."""
    before = lc.cluster()
    body = {"prompt": prompt, "max_tokens": KILL_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    times, fin, usage, killed_at = [], None, {}, None
    with httpx.stream("POST", lc.url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            choice = chunk["choices"][0]
            if choice["text"]:
                times.append(now)
                if len(times) == KILL_AFTER:
                    lc.signal_node(victim, signal.SIGKILL)
                    killed_at = len(times)
            if choice["finish_reason"]:
                fin, usage = choice["finish_reason"], chunk.get("usage", {})
    gaps = [b - a for a, b in zip(times, times[1:])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    try:
        lc.wait_active(nodes_after, 60)
    except TimeoutError:
        pass
    after = lc.cluster()
    hist = [h for h in after["rebalances"] if h["epoch"] > before["epoch"]]
    reb = next((h for h in hist if f"{victim} lost" in h["reason"]), None)
    return {"killed": victim, "killed_after_tokens": killed_at, "tokens": usage.get("completion_tokens"),
            "finish_reason": fin, "max_gap_s": gaps[worst], "median_gap_s": statistics.median(gaps),
            "extra_latency_s": gaps[worst] - statistics.median(gaps), "max_gap_after_token": worst + 1,
            "fallbacks": after["mlp"]["fallbacks"] - before["mlp"]["fallbacks"],
            "recovery_rebalance_s": reb["seconds"] if reb else None,
            "recovery_bytes_moved": reb["bytes_moved"] if reb else None,
            "rebalances_after_kill": [h["reason"] for h in hist]}


# ---------------------------------------------------------------------------- main
def main(args) -> int:
    from transformers import AutoTokenizer

    from . import loader

    n = min(args.tokens, QUICK_TOKENS) if args.quick else args.tokens
    reps = 1 if args.quick else 3
    if n < 2 or args.prompt_tokens < 1 or args.nodes < 0:
        say("skynet bench: need --tokens >= 2, --prompt-tokens >= 1, --nodes >= 0")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(ENV)
    t_start = phase_t = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal phase_t
        now = time.perf_counter()
        phases[name], phase_t = now - phase_t, now

    model_dir = loader.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = tok(PROMPT, add_special_tokens=True)["input_ids"]   # as the server encodes it
    long_ids = long_prompt(tok, args.prompt_tokens)

    say(f"[1/5] HF transformers baseline ({n} tokens, {reps} rep(s)) ...")
    hf = run_hf(model_dir, prompt_ids, long_ids, n, STREAMS, reps, say)
    hf_text = tok.decode(hf.pop("ids"), skip_special_tokens=True)
    gc.collect()
    phase("hf")

    say(f"[2/5] SkyNet: server + {args.nodes} node(s) ...")
    scaling: dict[str, dict] = {}
    elastic = None
    with cluster(args, args.nodes) as lc:
        sky = single(lc, PROMPT, n, reps, args.nodes)
        scaling[str(args.nodes)] = dict(sky)
        say(f"  SkyNet single stream: {sky['decode_tok_s']:.1f} tok/s")
        sky["identical"] = sky["text"] == hf_text
        if not sky["identical"]:
            at = next((i for i, (a, b) in enumerate(zip(sky["text"], hf_text)) if a != b),
                      min(len(sky["text"]), len(hf_text)))
            say(f"  tokens differ from HF at char {at}:\n    ours {sky['text']!r}\n    HF   {hf_text!r}")
        sky["ttft_s"] = median(complete(lc.url, long_ids, 1)[0] for _ in range(reps))
        say(f"  SkyNet TTFT ({len(long_ids)}-token prompt): {sky['ttft_s'] * 1000:.0f} ms")
        sky["concurrency_tok_s"] = {"1": sky["decode_tok_s"]}
        for k in STREAMS[1:]:
            sky["concurrency_tok_s"][str(k)] = concurrent(lc.url, PROMPT, n, k)
            say(f"  SkyNet {k} streams: {sky['concurrency_tok_s'][str(k)]:.1f} tok/s")
        phase("skynet")
        if not args.quick:
            say("[3/5] elastic: a node joins, then a node dies mid-request ...")
            elastic = join_figures(lc, args.nodes)
            if args.nodes >= 1:
                elastic.update(kill_figures(lc, PROMPT, "node0", args.nodes))
            phase("elastic")
    say("[4/5] scaling: single stream at 0, 1 and 2 nodes ...")
    for k in SCALING:
        if str(k) not in scaling:
            with cluster(args, k) as lc:
                scaling[str(k)] = single(lc, PROMPT, n, reps, k)
            say(f"  {k} node(s): {scaling[str(k)]['decode_tok_s']:.1f} tok/s")
    phase("scaling")

    results = {
        "meta": {"model": loader.model_name(model_dir, args.model), "model_dir": str(model_dir),
                 "nodes": args.nodes, "tokens": n, "prompt_tokens": len(long_ids),
                 "short_prompt_tokens": len(prompt_ids),
                 "reps": reps, "quick": bool(args.quick), "cpus": os.cpu_count(),
                 "machine": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "hf_threads": hf["threads"], "seconds": time.perf_counter() - t_start,
                 "phases_s": phases},
        "hf": hf, "skynet": sky, "scaling": scaling, "elastic": elastic}
    say("[5/5] report")
    print(report(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(out / "bench.png", hf, scaling, sky["concurrency_tok_s"], results["meta"]["model"])
    say(f"wrote {out / 'results.json'} and {out / 'bench.png'} ({results['meta']['seconds']:.0f}s)")
    return 0


def report(r: dict) -> str:
    hf, sky, m = r["hf"], r["skynet"], r["meta"]
    n, p = m["tokens"], m["prompt_tokens"]
    rows = [[f"single stream, {n} tokens (tok/s)", hf["decode_tok_s"], sky["decode_tok_s"]],
            ["decode after 1st token (tok/s)", hf["decode_only_tok_s"], sky["decode_only_tok_s"]],
            [f"TTFT, {m['short_prompt_tokens']}-token prompt (ms)", 1000 * hf["ttft_short_s"],
             1000 * sky["ttft_short_s"]],
            [f"TTFT, {p}-token prompt (ms)", 1000 * hf["ttft_s"], 1000 * sky["ttft_s"]],
            *([f"aggregate, {k} stream(s) (tok/s)", hf["batch_tok_s"][k], sky["concurrency_tok_s"][k]]
              for k in sky["concurrency_tok_s"])]
    out = [table(f"{m['model']}, float32, greedy; SkyNet = server + {m['nodes']} node(s) over HTTP",
                 ["metric", "HF transformers", "SkyNet", "SkyNet/HF"], [[*x, ratio(x[2], x[1])] for x in rows])
           + f"\ngreedy tokens identical to HF: {'yes' if sky['identical'] else 'no'}; during the timed "
           f"single-stream runs: {sky['fallbacks']} fallbacks, {sky['plan_changes']} plan changes"]
    out.append(table("scaling (single stream)", ["nodes", "tok/s", "decode tok/s", "wait ms/tok",
                                                 "wire B/tok", "theory B/tok", "fallbacks", "plan changes"],
                     [[int(k), s["decode_tok_s"], s["decode_only_tok_s"],
                       s["breakdown_ms_per_token"]["waiting on nodes (mlp wait)"],
                       s["wire"]["bytes_per_token"], s["wire"]["theory_bytes_per_token"], s["fallbacks"],
                       s["plan_changes"]]
                      for k, s in sorted(r["scaling"].items(), key=lambda kv: int(kv[0]))]))
    total = sky["breakdown_ms_per_token"]["total (wall)"]
    out.append(table(f"time per generated token, single stream, {m['nodes']} node(s)",
                     ["where", "ms/token", "share"],
                     [[k, v, f"{100 * v / total:.0f}%" if total else None]
                      for k, v in sky["breakdown_ms_per_token"].items()]))
    w = sky["wire"]
    out.append(table("wire bytes per token row (server <-> nodes, all layers)", ["", "bytes"],
                     [["measured (header + payload)", w["bytes_per_token"]],
                      ["theory 2*nodes*layers*hidden*4", w["theory_bytes_per_token"]],
                      ["measured / theory", w["ratio"]]]))
    e = r["elastic"]
    if e:
        rows = [[f"join {e['from_nodes']} -> {e['to_nodes']} nodes: rebalance (s)", e["rebalance_s"]],
                ["  bytes moved", e["bytes_moved"]], ["  spawn -> active (s)", e["spawn_to_active_s"]]]
        if "max_gap_s" in e:
            rows += [[f"kill {e['killed']} after {e['killed_after_tokens']} tokens: max gap (ms)",
                      1000 * e["max_gap_s"]],
                     ["  median gap (ms)", 1000 * e["median_gap_s"]],
                     ["  extra latency (ms)", 1000 * e["extra_latency_s"]],
                     ["  tokens / finish", f"{e['tokens']} / {e['finish_reason']}"],
                     ["  fallbacks", e["fallbacks"]],
                     ["  recovery rebalance (s)", e["recovery_rebalance_s"]],
                     ["  rebalances after the kill", len(e["rebalances_after_kill"])]]
        out.append(table("elastic", ["event", "value"], rows))
    return "\n\n".join(out)
