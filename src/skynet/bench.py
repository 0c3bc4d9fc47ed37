"""`skynet bench`: SkyNet against HF transformers, in one run on one machine.

Same model, same prompt, greedy. HF (float32) runs first in this process (2 torch threads); the
same loaded model then gives the quality reference (bench_quality.py: teacher-forced agreement of
our fast and exact models, in process) and is freed before any cluster starts. SkyNet is measured
end to end over HTTP on LocalClusters (server + node processes on 127.0.0.1) in the precision
asked (--precision; auto = fast for a quantized GGUF); when that is not exact, one more exact
single-stream run checks greedy tokens against HF. Then: scaling over 0/1/2 nodes, server RSS
with 2 nodes, the bytes shipped when a 3rd node joins 2, a server's cold start with empty caches,
llama.cpp on the same GGUF where installed, and issue 9's targets. Prints tables, writes
results.json and bench.png to --out.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from .bench_hf import (PROMPT, decode_only, generator, load_hf, long_context, long_prompt, median, paired, plot, ratio,
                       run_hf, table)

QUICK_TOKENS = 16
CONTEXT_TOKENS, QUICK_CONTEXT, CONTEXT_NEW = 1024, 128, 32   # the long-context rows: prompt, then decode
STREAMS = (1, 4, 8)
TTFT_PAIRS, TTFT_PAIRS_QUICK = 6, 2   # the long prompt's TTFT, HF and SkyNet alternated (bench_hf.paired)
SCALING = (0, 1, 2)
KILL_TOKENS, KILL_AFTER = 64, 15
ENV = {"SKYNET_NO_PROGRESS": "1", "SKYNET_NO_CACHE": "1"}   # no node reuses an earlier run's slices
THREAD_BUDGET = 2   # cores for each side: HF's torch threads, llama.cpp's figure we compare with


def server_threads(budget: int, nodes: int, precision: str = "fast") -> int:
    """The server's --threads in the bench. fast: the whole budget, nodes or not. In a single
    stream the nodes sit idle while the server attends and runs the head, and our kernel workers
    yield while they wait, so they take no core a node needs (measured, 2 nodes, interleaved:
    59-75 tok/s with 2 threads against 49-64 with 1, TTFT 372-379 against 359-437 ms). exact: the
    budget less one core per node on the box, at least 1: there the linear layers are BLAS calls,
    whose idle threads spin on a core a node needs."""
    if budget < 1 or nodes < 0:
        raise ValueError(f"need budget >= 1 and nodes >= 0, got {budget}, {nodes}")
    return budget if precision == "fast" else max(1, budget - nodes)


def _fmt_rate(tok_s) -> str:
    return "n/a" if tok_s is None else f"{tok_s:.1f} tok/s"


def _pairs(tp: dict) -> str:
    """bench_hf.paired's result, as the progress lines print it."""
    return (f"{tp['pairs']} pairs alternated with HF: {tp['second_median_s'] * 1000:.0f} against "
            f"{tp['first_median_s'] * 1000:.0f} ms, median ratio {tp['ratio']:.3f}")


def _pairs_row(what: str, tp: dict) -> str:
    """bench_hf.paired's result, as the report prints it."""
    return (f"\n{what}, {tp['pairs']} pairs alternated with HF: HF {1000 * tp['first_median_s']:.0f} ms, "
            f"SkyNet {1000 * tp['second_median_s']:.0f} ms (medians); median of the pairs' ratios {tp['ratio']:.3f}")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- HTTP
def complete(url: str, prompt, max_tokens: int, client: httpx.Client | None = None) -> tuple[float, dict]:
    """One non-streamed greedy completion of exactly max_tokens tokens: (seconds, response).
    Timed figures pass a kept-alive `client`: without one, httpx builds a client (and its TLS
    context) per call, ~25-30 ms of the benchmark's own time that no server sees."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = (client or httpx).post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def concurrent(url: str, prompt, n: int, k: int) -> float:
    """k streams at once, n tokens each: aggregate generated tokens/s over the wall time. Each
    stream's client has its connection open before the clock starts, as HF's batch has its
    model in memory (a first request through a new httpx client costs it ~25 ms of setup)."""
    barrier, done, errors = threading.Barrier(k + 1), [0] * k, []

    def worker(i: int) -> None:
        try:
            with httpx.Client() as c:
                c.get(f"{url}/health").raise_for_status()   # the connection is made before the clock
                barrier.wait()
                done[i] = complete(url, prompt, n, c)[1]["usage"]["completion_tokens"]
        except Exception as e:  # reported after the join
            errors.append(e)
            barrier.abort()   # one that fails before the barrier must not leave the others waiting

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:   # a stream failed before the start: its error is raised below
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return sum(done) / wall


def delta(after: dict, before: dict) -> dict:
    """Counter increments (nested counters, e.g. per-node replies, recursively)."""
    return {k: delta(v, before.get(k) or {}) if isinstance(v, dict) else v - before.get(k, 0)
            for k, v in after.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------- SkyNet
def single(lc, prompt: str, n: int, reps: int, nodes: int) -> dict:
    """Single-stream figures of a running cluster, with the per-token time and wire breakdown.

    The breakdown is the engine and MLP stats deltas over the `reps` timed requests divided by the
    tokens they generated (their prefill steps included); wire bytes are per token row (position)."""
    with httpx.Client() as c:   # one kept-alive connection, as an API client keeps it (see complete)
        complete(lc.url, prompt, 4, c)   # warm-up: first-call allocations, node connections
        ttft_short = median(complete(lc.url, prompt, 1, c)[0] for _ in range(reps))
        before = lc.cluster()
        runs = [complete(lc.url, prompt, n, c) for _ in range(reps)]
        after = lc.cluster()
    t = median(r[0] for r in runs)
    got = runs[0][1]["usage"]["completion_tokens"]
    assert got == n, f"SkyNet generated {got} tokens, expected {n}"
    eng, mlp = delta(after["engine"], before["engine"]), delta(after["mlp"], before["mlp"])
    tokens, rows = reps * n, max(eng["rows"], 1)
    ms = lambda s: 1000 * s / tokens   # noqa: E731
    precision = after.get("precision", "exact")
    reply_bytes = 8 if precision == "fast" else 4   # fast: float64 partials back, float32 out
    theory = nodes * after["layers"] * after["hidden"] * (4 + reply_bytes)
    wire = (mlp["bytes_out"] + mlp["bytes_in"]) / rows
    wall = sum(r[0] for r in runs)
    return {
        "nodes": nodes, "precision": precision, "decode_tok_s": n / t, "decode_only_tok_s": decode_only(n, t, ttft_short),
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
                 "rows": eng["rows"], "generated": tokens, "layers": after["layers"], "hidden": after["hidden"],
                 "bytes_out": mlp["bytes_out"], "bytes_in": mlp["bytes_in"], "mlp_calls": mlp["calls"],
                 "replies": mlp.get("replies"),
                 "request_bytes_per_value": 4, "reply_bytes_per_value": reply_bytes},
        "fallbacks": mlp["fallbacks"], "plan_changes": after["epoch"] - before["epoch"]}


def cluster(args, nodes: int, precision: str):
    from .launch import LocalCluster
    logs = Path(args.out) / f"logs-{precision}-{nodes}-nodes"
    threads = server_threads(THREAD_BUDGET, nodes, precision)
    say(f"starting a local cluster: server ({precision}, {threads} thread(s)) + {nodes} "
        f"node(s) (logs in {logs}) ...")
    logs.mkdir(parents=True, exist_ok=True)
    return LocalCluster(args.model, nodes, server_args=["--precision", precision, "--threads", str(threads)],
                        env=ENV, log_dir=str(logs))


def rss_mib(pid: int) -> float | None:
    """Resident memory (VmRSS) of a process, MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory(lc) -> dict:
    return {"server_rss_mib": rss_mib(lc.server.pid),
            "node_rss_mib": {name: rss_mib(p.pid) for name, p in lc.nodes.items() if p.poll() is None}}


def cold_start(args, precision: str, model: str | None) -> dict:
    """Popen -> first /health 200 of a server alone, with SkyNet's and HF's caches empty (fresh dirs)."""
    from .launch import LocalCluster
    tmp = Path(tempfile.mkdtemp(prefix="skynet-cold-"))
    env = {**ENV, "SKYNET_CACHE": str(tmp / "skynet"), "XDG_CACHE_HOME": str(tmp / "xdg"),
           "HF_HOME": str(tmp / "hf")}
    logs = Path(args.out) / "logs-cold-start"
    lc = LocalCluster(model, 0, server_args=["--precision", precision], env=env, log_dir=str(logs))
    try:
        t0 = time.perf_counter()
        lc.start_server(timeout=300)   # polls /health every 0.1 s
        secs = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        return {"seconds": secs, "precision": precision, "cache_bytes_written": written,
                "server_rss_mib": rss_mib(lc.server.pid)}
    finally:
        lc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
for threads in (2, 1):
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, seed=0,
                verbose=False)
    toks = llm.tokenize(prompt.encode("utf-8"))

    def run(k):
        llm.reset()
        t0, got = time.perf_counter(), 0
        for _ in llm.generate(toks, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
            got += 1
            if got >= k:
                break
        return time.perf_counter() - t0, got

    run(4)
    runs = sorted(run(n) for _ in range(reps))
    t, got = runs[len(runs) // 2]
    out[str(threads)] = {"tok_s": got / t, "tokens": got}
    del llm
print("RESULT " + json.dumps(out))
"""


def llama_cpp_figures(n: int, reps: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same GGUF, greedy, n tokens, 2 and 1 threads, in a subprocess."""
    import importlib.util
    import subprocess

    from . import loader
    if importlib.util.find_spec("llama_cpp") is None:
        return {"installed": False, "note": "not installed"}
    gguf = str(loader.default_gguf())
    try:
        p = subprocess.run([sys.executable, "-c", LLAMA_CPP, gguf, PROMPT, str(n), str(reps)],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"installed": True, "note": "timed out"}
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        note = "not installed" if "No module named" in tail[0] else f"failed: {tail[0][:200]}"
        return {"installed": "No module named" not in tail[0], "note": note}
    return {"installed": True, "gguf": gguf, "threads_tok_s": {k: v["tok_s"] for k, v in
                                                              json.loads(line[7:]).items()}}


def join_figures(lc, nodes: int) -> dict:
    """Add a node to the running cluster; the rebalance's time and bytes, as the server logged them
    (bytes_moved: its plan's count; bytes_shipped: what the server's per-node counters say it sent)."""
    before = lc.cluster()
    epoch, t0 = before["epoch"], time.perf_counter()
    sent0 = {n["name"]: n["bytes_sent"] for n in before["nodes"]}
    lc.add_node("joiner")
    lc.wait_active(nodes + 1, 180)
    wall = time.perf_counter() - t0
    after = lc.cluster()
    hist = [h for h in after["rebalances"] if h["epoch"] > epoch]
    reb = next((h for h in hist if "joiner joined" in h["reason"]), hist[-1])
    shipped = sum(n["bytes_sent"] - sent0.get(n["name"], 0) for n in after["nodes"])
    return {"from_nodes": nodes, "to_nodes": nodes + 1, "rebalance_s": reb["seconds"],
            "bytes_moved": reb["bytes_moved"], "bytes_shipped": shipped, "spawn_to_active_s": wall,
            "reason": reb["reason"], "rebalances": len(hist)}


def kill_figures(lc, prompt: str, victim: str, nodes_after: int) -> dict:
    """Stream a request, SIGKILL a node after KILL_AFTER tokens; inter-token gaps around it, and
    whether its text equals the same request's undisturbed answer (taken first)."""
    undisturbed = complete(lc.url, prompt, KILL_TOKENS)[1]["choices"][0]["text"]
    before = lc.cluster()
    body = {"prompt": prompt, "max_tokens": KILL_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    times, fin, usage, killed_at, pieces = [], None, {}, None, []
    with httpx.stream("POST", lc.url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            choice = chunk["choices"][0]
            pieces.append(choice["text"])
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
            "finish_reason": fin, "identical_to_undisturbed": "".join(pieces) == undisturbed,
            "max_gap_s": gaps[worst], "median_gap_s": statistics.median(gaps),
            "extra_latency_s": gaps[worst] - statistics.median(gaps), "max_gap_after_token": worst + 1,
            "fallbacks": after["mlp"]["fallbacks"] - before["mlp"]["fallbacks"],
            "recovery_rebalance_s": reb["seconds"] if reb else None,
            "recovery_bytes_moved": reb["bytes_moved"] if reb else None,
            "rebalances_after_kill": [h["reason"] for h in hist]}


# ---------------------------------------------------------------------------- main
def main(args) -> int:
    from transformers import AutoTokenizer

    from . import bench_quality, loader

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
    precision = loader.open_model(args.model).precision(getattr(args, "precision", "auto"))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = tok(PROMPT, add_special_tokens=True)["input_ids"]   # as the server encodes it
    long_ids = long_prompt(tok, args.prompt_tokens)
    ctx_ids = long_prompt(tok, QUICK_CONTEXT if args.quick else CONTEXT_TOKENS)
    q_prompts = bench_quality.PROMPTS[:bench_quality.QUICK_PROMPTS] if args.quick else bench_quality.PROMPTS
    q_tokens = bench_quality.QUICK_TOKENS if args.quick else bench_quality.TOKENS

    pairs = TTFT_PAIRS_QUICK if args.quick else TTFT_PAIRS
    say(f"[1/7] HF transformers baseline ({n} tokens, {reps} rep(s)) and quality reference ...")
    hf_model = load_hf(model_dir)
    try:
        hf = run_hf(hf_model, prompt_ids, long_ids, n, STREAMS, reps, say)
        hf_gen = generator(hf_model)   # kept (with the model) for the paired TTFTs of phases 3 and 5
        hf["context"] = long_context(lambda ids, k: hf_gen(ids, k)[0], ctx_ids, CONTEXT_NEW, reps)
        say(f"  HF {len(ctx_ids)}-token context: TTFT {hf['context']['ttft_s'] * 1000:.0f} ms, "
            f"then {_fmt_rate(hf['context']['decode_tok_s'])}")
        phase("hf")
        ref = bench_quality.hf_reference(hf_model, tok, q_prompts, q_tokens, say)
    finally:
        hf_model = None   # hf_gen keeps the model for the paired TTFTs; freed after the scaling phase
        gc.collect()
    hf_text = tok.decode(hf.pop("ids"), skip_special_tokens=True)
    say("[2/7] quality: our fast and exact models, teacher-forced on HF's continuations ...")
    quality = bench_quality.run(args.model, ref, say)
    ref = None
    gc.collect()
    phase("quality")

    say(f"[3/7] SkyNet ({precision}): server + {args.nodes} node(s) ...")
    scaling: dict[str, dict] = {}
    elastic: dict = {}
    resources: dict = {}
    with cluster(args, args.nodes, precision) as lc:
        sky = single(lc, PROMPT, n, reps, args.nodes)
        scaling[str(args.nodes)] = dict(sky)
        if args.nodes == 2:
            resources.update(memory(lc))
        say(f"  SkyNet single stream: {sky['decode_tok_s']:.1f} tok/s")
        sky["same_text_as_hf"] = sky["text"] == hf_text
        sky["identical"] = sky["same_text_as_hf"] if precision == "exact" else None
        with httpx.Client() as c:
            complete(lc.url, PROMPT, 1, c)   # the connection (as in single: it is not the prompt's time)
            sky["ttft_s"] = median(complete(lc.url, long_ids, 1, c)[0] for _ in range(reps))
            sky["ttft_pairs"] = paired(lambda: hf_gen(long_ids, 1)[0], lambda: complete(lc.url, long_ids, 1, c)[0],
                                       pairs)
            sky["context"] = long_context(lambda ids, k: complete(lc.url, ids, k, c)[0], ctx_ids, CONTEXT_NEW, reps)
        tp = sky["ttft_pairs"]
        say(f"  SkyNet TTFT ({len(long_ids)}-token prompt): {sky['ttft_s'] * 1000:.0f} ms; {_pairs(tp)}")
        say(f"  SkyNet {len(ctx_ids)}-token context: TTFT {sky['context']['ttft_s'] * 1000:.0f} ms, "
            f"then {_fmt_rate(sky['context']['decode_tok_s'])}")
        sky["concurrency_tok_s"] = {"1": sky["decode_tok_s"]}
        for k in STREAMS[1:]:
            sky["concurrency_tok_s"][str(k)] = concurrent(lc.url, PROMPT, n, k)
            say(f"  SkyNet {k} streams: {sky['concurrency_tok_s'][str(k)]:.1f} tok/s")
        sky["server_rss_after_streams_mib"] = rss_mib(lc.server.pid)
        phase("skynet")
        if args.nodes == 2:
            say("  elastic: a 3rd node joins ...")
            elastic.update(join_figures(lc, args.nodes))
        if not args.quick and args.nodes >= 1:
            say("  elastic: a node dies mid-request ...")
            elastic.update(kill_figures(lc, PROMPT, "node0", len(lc.active_nodes()) - 1))
    if not args.quick:   # issue 11 item 7: six nodes started together on a 0.5B-shaped model
        from . import bench_settle
        say("  elastic: 6 nodes started together (Qwen2.5-0.5B shape, random float32) ...")
        elastic["settle"] = bench_settle.settle(bench_settle.random_model(Path(args.out) / "qwen05-shape"), 6)
        say(f"  settled in {elastic['settle']['settled_s']} s through {elastic['settle']['plans']} plan(s)")
    if not args.quick:
        from . import bench_replicas
        say("  elastic: a node dies mid-request, 4 nodes with --replicas 2 ...")
        elastic["replicas"] = bench_replicas.kill_gap(args.model, precision, out)
    phase("elastic")

    if precision == "exact":
        exact = sky
    else:
        say(f"[4/7] SkyNet (exact): server + {args.nodes} node(s), single stream ...")
        with cluster(args, args.nodes, "exact") as lc:
            exact = single(lc, PROMPT, n, reps, args.nodes)
        exact["identical"] = exact["same_text_as_hf"] = exact["text"] == hf_text
        say(f"  exact single stream: {exact['decode_tok_s']:.1f} tok/s")
        phase("exact")
    if not exact["identical"]:
        at = next((i for i, (a, b) in enumerate(zip(exact["text"], hf_text)) if a != b),
                  min(len(exact["text"]), len(hf_text)))
        say(f"  exact tokens differ from HF at char {at}:\n    ours {exact['text']!r}\n    HF   {hf_text!r}")

    say(f"[5/7] scaling ({precision}): single stream at 0, 1 and 2 nodes ...")
    for k in SCALING:
        if str(k) in scaling:
            continue
        with cluster(args, k, precision) as lc:
            scaling[str(k)] = single(lc, PROMPT, n, reps, k)
            if k == 0:   # the engine's own TTFT on the same 2 threads, no node beside it
                with httpx.Client() as c:
                    complete(lc.url, PROMPT, 1, c)
                    scaling["0"]["ttft_pairs"] = tp = paired(
                        lambda: hf_gen(long_ids, 1)[0], lambda: complete(lc.url, long_ids, 1, c)[0], pairs)
                say(f"  server alone, TTFT ({len(long_ids)}-token prompt), {_pairs(tp)}")
            if k == 2:
                resources.update(memory(lc))
                if "bytes_moved" not in elastic:
                    say("  elastic: a 3rd node joins ...")
                    elastic.update(join_figures(lc, k))
        say(f"  {k} node(s): {scaling[str(k)]['decode_tok_s']:.1f} tok/s")
    hf_gen = None   # the HF model is no more needed
    gc.collect()
    phase("scaling")

    say("[6/7] cold start (empty caches) and llama.cpp ...")
    cold_model = args.model
    if args.model and not Path(args.model).expanduser().exists():
        cold_model = str(model_dir)   # a hub id: its files live in the HF cache we empty
    resources["cold_start"] = cold_start(args, precision, cold_model)
    say(f"  cold start to /health: {resources['cold_start']['seconds']:.2f} s")
    from .bench_cache import restart_figures
    say("  elastic: a node restarts with its slice cache ...")
    logs = Path(args.out) / f"logs-{precision}-restart"
    logs.mkdir(parents=True, exist_ok=True)
    elastic.update(restart_figures(args.model, precision, ENV, str(logs), PROMPT))
    say(f"  restart: {elastic['restart_bytes_shipped']} of {elastic['slice_bytes']} bytes shipped, "
        f"{elastic['restart_to_active_s']:.2f} s to active")
    llama = llama_cpp_figures(n, reps)
    say(f"  llama.cpp: {llama.get('threads_tok_s') or llama.get('note')}")
    phase("cold+llama.cpp")
    from . import bench_rtt
    say("  round trip per layer: raw TCP vs direct link vs ZeroMQ (2 nodes, no compute) ...")
    rtt = bench_rtt.measure(steps=8 if args.quick else 40, rounds=2 if args.quick else 8)
    if not args.quick:
        rtt["delays"] = bench_rtt.measure_delays()
    phase("rtt")
    emul = None
    if not args.quick and (os.cpu_count() or 1) >= 2:
        from . import bench_emul
        say("  two machines emulated: pinned cores, then added link delays ...")
        emul = {"pinned": bench_emul.pinned(args, precision, n, reps),
                "delayed": bench_emul.delayed(args, precision, n, reps)}
        phase("emulation")

    results = {
        "meta": {"model": loader.model_name(model_dir, args.model), "model_dir": str(model_dir),
                 "precision": precision, "nodes": args.nodes, "tokens": n,
                 "prompt_tokens": len(long_ids), "short_prompt_tokens": len(prompt_ids),
                 "reps": reps, "quick": bool(args.quick), "cpus": os.cpu_count(),
                 "machine": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "hf_threads": hf["threads"],
                 "server_threads": {str(k): server_threads(THREAD_BUDGET, k, precision) for k in sorted({args.nodes, *SCALING})},
                 "seconds": time.perf_counter() - t_start,
                 "phases_s": phases},
        "hf": hf, "skynet": sky, "exact": exact, "scaling": scaling, "elastic": elastic or None,
        "quality": quality, "resources": resources, "llama_cpp": llama, "rtt": rtt,
        "emulation": emul}
    results["targets"] = targets(results)
    say("[7/7] report")
    print(report(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(out / "bench.png", hf, scaling, sky["concurrency_tok_s"], f"{results['meta']['model']} ({precision})")
    say(f"wrote {out / 'results.json'} and {out / 'bench.png'} ({results['meta']['seconds']:.0f}s)")
    return 0


MB, MIB = 1e6, 1024 * 1024


def targets(r: dict) -> list[dict]:
    """Issue 9's targets: each figure, its bound and whether it is met (None: not measured)."""
    hf, sky, sc, m = r["hf"], r["skynet"], r["scaling"], r["meta"]
    res, e, q = r["resources"], r["elastic"] or {}, r["quality"]
    p = m["precision"]

    def row(name, value, op, bound, unit=""):
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        return {"name": name, "value": value, "target": f"{op} {bound:g}{unit}", "met": met}

    sc8 = sky["concurrency_tok_s"].get("8")
    return [
        row(f"server alone, single stream ({p}) / HF", ratio(sc["0"]["decode_tok_s"], hf["decode_tok_s"])
            if "0" in sc else None, ">=", 5, "x"),
        row(f"server + 2 nodes, single stream ({p}) / HF", ratio(sc["2"]["decode_tok_s"], hf["decode_tok_s"])
            if "2" in sc else None, ">=", 2.5, "x"),
        row(f"8 streams aggregate ({m['nodes']} nodes) / HF batch 8", ratio(sc8, hf["batch_tok_s"].get("8")),
            ">=", 2.5, "x"),
        row(f"TTFT {m['prompt_tokens']}-token prompt / HF (median of alternated pairs)", sky["ttft_pairs"]["ratio"],
            "<=", 1.0, "x") if sky.get("ttft_pairs") else
        row(f"TTFT {m['prompt_tokens']}-token prompt / HF", ratio(sky["ttft_s"], hf["ttft_s"]), "<=", 1.0, "x"),
        row("server RSS, 2 nodes (MiB)", res.get("server_rss_mib"), "<=", 300),
        row("bytes shipped when a 3rd node joins 2 (MB)",
            e["bytes_moved"] / MB if "bytes_moved" in e else None, "<=", 40),
        row("node SIGKILLed, --replicas 2, 4 nodes: max gap / median gap",
            e["replicas"]["gap_ratio"] if e.get("replicas") else None, "<=", 3, "x"),
        row("  same: output identical to the undisturbed run (1 = yes)",
            float(e["replicas"]["identical_to_undisturbed"]) if e.get("replicas") else None, ">=", 1),
        row("cold start to /health, empty cache (s)", res.get("cold_start", {}).get("seconds"), "<=", 5),
        row("node restarted with its cache: bytes shipped / its slice", e.get("restart_bytes_ratio"), "<=", 0.01),
        row("node restarted with its cache: process start -> active (s)", e.get("restart_to_active_s"), "<=", 1.5),
        row("teacher-forced agreement, fast (%)", 100 * q["fast"]["agreement"], ">=",
            100 * q["target_fast"]),
        row("fast agreement - ideal Q8_0 reference (points)",
            100 * (q["fast"]["agreement"] - q["q8_ref"]), ">=", 0),
        row("greedy tokens identical to HF, exact (1 = yes)", float(bool(r["exact"]["identical"])), ">=", 1),
    ]


def report(r: dict) -> str:
    hf, sky, m, ex = r["hf"], r["skynet"], r["meta"], r["exact"]
    n, p, prec = m["tokens"], m["prompt_tokens"], m["precision"]
    rows = [[f"single stream, {n} tokens (tok/s)", hf["decode_tok_s"], sky["decode_tok_s"]],
            ["decode after 1st token (tok/s)", hf["decode_only_tok_s"], sky["decode_only_tok_s"]],
            [f"TTFT, {m['short_prompt_tokens']}-token prompt (ms)", 1000 * hf["ttft_short_s"],
             1000 * sky["ttft_short_s"]],
            [f"TTFT, {p}-token prompt (ms)", 1000 * hf["ttft_s"], 1000 * sky["ttft_s"]],
            *([f"aggregate, {k} stream(s) (tok/s)", hf["batch_tok_s"][k], sky["concurrency_tok_s"][k]]
              for k in sky["concurrency_tok_s"])]
    if hf.get("context") and sky.get("context"):
        hc, sc = hf["context"], sky["context"]
        rows += [[f"TTFT, {hc['prompt_tokens']}-token prompt (ms)", 1000 * hc["ttft_s"], 1000 * sc["ttft_s"]],
                 [f"decode at position ~{hc['prompt_tokens']}, {hc['new_tokens']} tokens (tok/s)",
                  hc["decode_tok_s"], sc["decode_tok_s"]]]
    if prec != "exact":
        rows.insert(2, [f"single stream, exact (float32), {n} tokens (tok/s)", hf["decode_tok_s"],
                        ex["decode_tok_s"]])
    same = "yes" if ex["identical"] else "no"
    ident = (f"greedy tokens identical to HF: {same}" if prec == "exact" else
             f"greedy tokens identical to HF: exact run {same}; {prec}: n/a (quantized; see quality)")
    out = [table(f"{m['model']}, SkyNet precision {prec}, greedy; HF float32; SkyNet = server + {m['nodes']} "
                 f"node(s) over HTTP", ["metric", "HF transformers", "SkyNet", "SkyNet/HF"],
                 [[*x, ratio(x[2], x[1])] for x in rows])
           + f"\n{ident}; during the timed single-stream runs: {sky['fallbacks']} fallbacks, "
           f"{sky['plan_changes']} plan changes"]
    tp = sky.get("ttft_pairs")
    if tp:
        out[0] += _pairs_row(f"TTFT, {p}-token prompt", tp)
    lc = r.get("llama_cpp") or {}
    if lc.get("threads_tok_s"):
        out.append(table(f"llama.cpp on the same GGUF, single stream, {n} tokens, greedy",
                         ["threads", "tok/s", "SkyNet/llama.cpp"],
                         [[int(k), v, ratio(sky["decode_tok_s"], v)] for k, v in lc["threads_tok_s"].items()]))
    else:
        out.append(f"llama.cpp: {lc.get('note', 'not measured')}")
    out.append(table(f"scaling (single stream, {prec})", ["nodes", "tok/s", "decode tok/s", "wait ms/tok",
                                                         "wire B/tok", "theory B/tok", "fallbacks",
                                                         "plan changes"],
                     [[int(k), s["decode_tok_s"], s["decode_only_tok_s"],
                       s["breakdown_ms_per_token"]["waiting on nodes (mlp wait)"],
                       s["wire"]["bytes_per_token"], s["wire"]["theory_bytes_per_token"], s["fallbacks"],
                       s["plan_changes"]]
                      for k, s in sorted(r["scaling"].items(), key=lambda kv: int(kv[0]))]))
    tp0 = r["scaling"].get("0", {}).get("ttft_pairs")
    if tp0:
        out[-1] += _pairs_row(f"server alone: TTFT, {p}-token prompt", tp0)
    q = r["quality"]
    pct = lambda v: None if v is None else f"{100 * v:.1f}%"   # noqa: E731
    out.append(table(f"quality: teacher-forced agreement with HF float32 greedy ({q['prompts']} prompts x "
                     f"{q['tokens']} tokens), perplexity of that text, and the shipped {q['mc_items']}-item "
                     f"multiple-choice task (tests/data/lm_eval) scored by loglikelihood",
                     ["model", "argmax = HF token", "mean |dlogprob|", "perplexity", "MC accuracy",
                      "MC mean |d loglik|"],
                     [["SkyNet fast", pct(q["fast"]["agreement"]), q["fast"]["mean_abs_dlogprob"], q["fast"]["ppl"],
                       pct(q["fast"]["mc_acc"]), q["fast"]["mc_mean_abs_dll"]],
                      ["SkyNet exact", pct(q["exact"]["agreement"]), q["exact"]["mean_abs_dlogprob"],
                       q["exact"]["ppl"], pct(q["exact"]["mc_acc"]), q["exact"]["mc_mean_abs_dll"]],
                      ["HF transformers float32", pct(q["hf_self"]), 0.0, q["hf_ppl"], pct(q["mc_hf_acc"]), 0.0],
                      ["ideal: HF, nn.Linear inputs Q8_0", pct(q["q8_ref"]), None, None, None, None]]))
    total = sky["breakdown_ms_per_token"]["total (wall)"]
    out.append(table(f"time per generated token, single stream, {m['nodes']} node(s)",
                     ["where", "ms/token", "share"],
                     [[k, v, f"{100 * v / total:.0f}%" if total else None]
                      for k, v in sky["breakdown_ms_per_token"].items()]))
    w = sky["wire"]
    out.append(table("wire bytes per token row (server <-> nodes, all layers)", ["", "bytes"],
                     [["measured (request headers + payloads, reply payloads)", w["bytes_per_token"]],
                      [f"theory nodes*layers*hidden*({w['request_bytes_per_value']}+{w['reply_bytes_per_value']})",
                       w["theory_bytes_per_token"]],
                      ["measured / theory", w["ratio"]]]))
    res = r["resources"]
    cs = res.get("cold_start", {})
    out.append(table("resources", ["", "value"],
                     [["server RSS after single stream, 2 nodes (MiB)", res.get("server_rss_mib")],
                      *[[f"  {k} RSS (MiB)", v] for k, v in res.get("node_rss_mib", {}).items()],
                      [f"server RSS after 8 streams, {m['nodes']} nodes (MiB)", sky.get("server_rss_after_streams_mib")],
                      ["cold start, Popen -> /health, empty cache (s)", cs.get("seconds")],
                      ["  cache bytes written meanwhile", cs.get("cache_bytes_written")]]))
    e = r["elastic"]
    if e:
        rows = []
        if "bytes_moved" in e:
            rows += [[f"join {e['from_nodes']} -> {e['to_nodes']} nodes: rebalance (s)", e["rebalance_s"]],
                     ["  bytes moved (plan)", e["bytes_moved"]], ["  bytes shipped (node counters)", e["bytes_shipped"]],
                     ["  spawn -> active (s)", e["spawn_to_active_s"]]]
        if "max_gap_s" in e:
            rows += [[f"kill {e['killed']} after {e['killed_after_tokens']} tokens: max gap (ms)",
                      1000 * e["max_gap_s"]],
                     ["  median gap (ms)", 1000 * e["median_gap_s"]],
                     ["  extra latency (ms)", 1000 * e["extra_latency_s"]],
                     ["  tokens / finish", f"{e['tokens']} / {e['finish_reason']}"],
                     ["  text identical to the undisturbed run", "yes" if e["identical_to_undisturbed"] else "NO"],
                     ["  fallbacks", e["fallbacks"]],
                     ["  recovery rebalance (s)", e["recovery_rebalance_s"]],
                     ["  rebalances after the kill", len(e["rebalances_after_kill"])]]
        if "restart_bytes_ratio" in e:
            rows += [["node restarted with its cache: bytes shipped / slice", e["restart_bytes_ratio"]],
                     ["  bytes shipped / slice bytes", f"{e['restart_bytes_shipped']} / {e['slice_bytes']}"],
                     ["  start -> active, restart / first start (s)",
                      f"{e['restart_to_active_s']:.2f} / {e['first_start_to_active_s']:.2f}"],
                     ["  same range, text identical", f"{e['restart_same_range']}, {e['restart_identical']}"]]
        if e.get("settle"):
            st = e["settle"]
            rows += [[f"{st['nodes']} nodes started together: all active (s)", st["settled_s"]],
                     ["  plans / losses", f"{st['plans']} / {st['losses']}"],
                     ["  bytes shipped", st["bytes_shipped"]],
                     ["  text identical to the server alone", "yes" if st["same_text_as_alone"] else "NO"]]
        if e.get("replicas"):
            k = e["replicas"]
            rows += [[f"kill node1, {k['nodes']} nodes, --replicas {k['replicas']}: max / median gap",
                      f"{1000 * k['max_gap_s']:.1f} / {1000 * k['median_gap_s']:.1f} ms = {k['gap_ratio']:.2f}x"],
                     ["  text identical to the undisturbed run", "yes" if k["identical_to_undisturbed"] else "NO"],
                     ["  hedges / replica replies / fallbacks", f"{k['hedges']} / {k['replica_replies']} / "
                                                               f"{k['fallbacks']}"]]
        out.append(table("elastic", ["event", "value"], rows))
    out.append(table("targets (issue 9)", ["figure", "value", "target", "met"],
                     [[t["name"], t["value"], t["target"],
                       "-" if t["met"] is None else "met" if t["met"] else "NOT met"] for t in r["targets"]]))
    if r.get("rtt"):
        from .bench_rtt import table as rtt_table
        out.append(rtt_table(r["rtt"]))
    if r.get("emulation"):
        from .bench_emul import table as emul_table
        out.append(emul_table(r["emulation"]))
    return "\n\n".join(out)
