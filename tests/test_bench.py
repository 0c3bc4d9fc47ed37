"""`skynet bench --quick` end to end: it runs, exits 0 and writes complete, self-consistent results.

No speed targets are asserted (the targets table's figures depend on the machine), but what must
hold on any machine does: the exact run's greedy tokens equal HF's, and the wire bytes the server
counted equal a count made here from the model's shape and the run's token counts, not from the
bench's own formula.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = {"meta", "hf", "skynet", "exact", "scaling", "elastic", "quality", "resources", "llama_cpp", "targets"}
TOKENS, NODES = 8, 1
HEADER_MAX = 256   # msgpack header frame of one Mlp request, generous


def check_wire(s: dict, meta: dict, layers: int, hidden: int) -> None:
    """Bytes of one single-stream measurement, recounted from first principles.

    Each timed request is one prefill step over the prompt's rows then one step per further token,
    every step calling all layers' MLPs; each call sends every node the (rows, hidden) float32
    activations and gets (rows, hidden) partials back: float32 in exact, float64 in fast."""
    w, nodes, reps = s["wire"], s["nodes"], meta["reps"]
    rows = reps * (meta["short_prompt_tokens"] + TOKENS - 1)
    steps = reps * TOKENS
    assert w["rows"] == rows and w["mlp_calls"] == steps * layers, w
    reply = {"fast": 8, "exact": 4}[s["precision"]]
    payload_in, payload_out = nodes * layers * rows * hidden * reply, nodes * layers * rows * hidden * 4
    assert w["bytes_per_token"] == pytest.approx((w["bytes_in"] + w["bytes_out"]) / rows)
    if s["fallbacks"]:   # a node missed a deadline on a loaded machine: its reply was not counted
        assert w["bytes_in"] < payload_in and w["bytes_out"] <= payload_out + nodes * steps * layers * HEADER_MAX
        return
    assert w["bytes_in"] == payload_in, (s["precision"], w)
    assert payload_out <= w["bytes_out"] <= payload_out + nodes * steps * layers * HEADER_MAX, w
    if w.get("replies") is not None:
        assert sum(w["replies"].values()) == nodes * steps * layers, w
    if nodes:
        assert 1.0 <= w["ratio"] < 1.05, w


def test_quick_bench_writes_results(tmp_path, default_model_dir):
    pytest.importorskip("matplotlib", reason="the bench extra is not installed (pip install -e '.[bench]')")
    cfg = json.loads((default_model_dir / "config.json").read_text())
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    out = tmp_path / "bench"
    env = {**os.environ, "SKYNET_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "skynet.cli", "bench", "--quick", "--tokens", str(TOKENS),
                        "--nodes", str(NODES), "--out", str(out)], capture_output=True, text=True,
                       timeout=480, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "HF transformers" in p.stdout and "targets (issue 9)" in p.stdout
    assert (out / "bench.png").stat().st_size > 0

    r = json.loads((out / "results.json").read_text())
    assert KEYS <= r.keys()
    m = r["meta"]
    assert m["tokens"] == TOKENS and m["nodes"] == NODES and m["precision"] == "fast"  # auto, quantized GGUF
    hf, sky, exact = r["hf"], r["skynet"], r["exact"]
    for d in (hf, sky):
        for k in ("decode_tok_s", "ttft_short_s", "ttft_s"):
            assert d[k] > 0, k
    tp = sky["ttft_pairs"]   # the long prompt's TTFT, alternated with HF's
    assert tp["pairs"] == len(tp["first_s"]) == len(tp["second_s"]) == 2 and min(tp["first_s"] + tp["second_s"]) > 0
    assert min(y / x for x, y in zip(tp["first_s"], tp["second_s"])) <= tp["ratio"] \
        <= max(y / x for x, y in zip(tp["first_s"], tp["second_s"]))
    assert "pairs alternated with HF" in p.stdout
    tp0 = r["scaling"]["0"]["ttft_pairs"]   # the server alone's, alternated with HF's too
    assert tp0["pairs"] == 2 and min(tp0["first_s"] + tp0["second_s"]) > 0 and tp0["ratio"] > 0
    assert "server alone: TTFT" in p.stdout
    ttft_row = next(t for t in r["targets"] if t["name"].startswith("TTFT"))
    assert ttft_row["value"] == tp["ratio"], ttft_row
    for d in (hf["context"], sky["context"]):   # the long-context rows (--quick: a 128-token prompt)
        assert d["prompt_tokens"] == 128 and d["new_tokens"] == 32 and d["ttft_s"] > 0, d
        assert d["decode_tok_s"] is None or d["decode_tok_s"] > 0, d
    assert "128-token prompt (ms)" in p.stdout and "decode at position ~128" in p.stdout
    assert set(hf["batch_tok_s"]) == set(sky["concurrency_tok_s"]) == {"1", "4", "8"}
    assert all(v > 0 for v in [*hf["batch_tok_s"].values(), *sky["concurrency_tok_s"].values()])

    # greedy tokens: checked on the exact run, not applicable to the quantized one
    assert sky["precision"] == "fast" and sky["identical"] is None
    assert exact["precision"] == "exact" and exact["nodes"] == NODES and exact["decode_tok_s"] > 0
    assert exact["identical"] is True, (exact["text"], sky["text"])
    assert "exact run yes" in p.stdout

    # wire bytes: the server's counters against a count made here
    assert set(r["scaling"]) == {"0", "1", "2"}
    assert all(s["decode_tok_s"] > 0 and s["precision"] == "fast" for s in r["scaling"].values())
    for s in (sky, exact, *r["scaling"].values()):
        check_wire(s, m, layers, hidden)
    assert r["scaling"]["0"]["wire"]["bytes_in"] == r["scaling"]["0"]["wire"]["bytes_out"] == 0
    bd = sky["breakdown_ms_per_token"]
    assert bd["total (wall)"] > 0 and bd["waiting on nodes (mlp wait)"] > 0

    # quality: teacher-forced agreement of fast, exact and the ideal Q8_0 reference
    q = r["quality"]
    assert q["prompts"] == 4 and q["tokens"] == 8   # the quick subset
    for k in ("fast", "exact"):
        assert q[k]["positions"] == q["prompts"] * q["tokens"] and 0 <= q[k]["agreement"] <= 1
    assert q["exact"]["agreement"] >= 0.9 and q["exact"]["mean_abs_dlogprob"] < 1e-3
    assert 0 < q["fast"]["mean_abs_dlogprob"] < 1 and 0 < q["q8_ref"] <= 1 and q["hf_self"] >= 0.9

    # resources and the join: 2 -> 3 nodes (in the 2-node scaling cluster, since --nodes is 1)
    res, e = r["resources"], r["elastic"]
    assert 0 < res["server_rss_mib"] < 8192 and len(res["node_rss_mib"]) == 2
    assert res["cold_start"]["seconds"] > 0
    assert e["from_nodes"] == 2 and e["to_nodes"] == 3 and "max_gap_s" not in e   # --quick: no kill
    mlp_f32 = layers * 3 * cfg["intermediate_size"] * hidden * 4
    assert 0 < e["bytes_moved"] <= e["bytes_shipped"] < mlp_f32
    assert r["llama_cpp"].get("threads_tok_s") or r["llama_cpp"]["note"]
    # a node restarted with its slice cache: its range again, nothing shipped, the same text
    assert e["restart_same_range"] and e["restart_identical"] and e["slice_bytes"] > 0, e
    assert e["restart_bytes_ratio"] <= 0.01 and e["restart_to_active_s"] > 0, e

    names = [t["name"] for t in r["targets"]]
    assert len(names) == 14, names
    not_quick = {n for n in names if "--replicas 2" in n or n.startswith("  same:")}   # the kill-gap run
    assert len(not_quick) == 2 and all(t["value"] is None for t in r["targets"] if t["name"] in not_quick)
    assert all(t["met"] in (True, False) for t in r["targets"] if t["name"] not in not_quick), r["targets"]


def test_server_threads_follow_the_budget():
    """fast: the server takes the whole thread budget (its workers yield to the nodes); exact:
    each node on the box takes one core of it (BLAS threads spin)."""
    from skynet.bench import server_threads
    assert [server_threads(2, k) for k in (0, 1, 2, 3)] == [2, 2, 2, 2]
    assert [server_threads(2, k, "exact") for k in (0, 1, 2, 3)] == [2, 1, 1, 1]
    assert server_threads(4, 1, "exact") == 3
    with pytest.raises(ValueError):
        server_threads(0, 0)


def test_paired_alternates_the_order_and_takes_the_median_of_ratios():
    from skynet.bench_hf import paired
    order, a, b = [], iter([1.0, 2.0, 4.0]), iter([2.0, 3.0, 2.0])

    def first():
        order.append("first")
        return next(a)

    def second():
        order.append("second")
        return next(b)

    r = paired(first, second, 3, settle_s=0)
    assert order == ["first", "second", "second", "first", "first", "second"]
    assert r["first_s"] == [1.0, 2.0, 4.0] and r["second_s"] == [2.0, 3.0, 2.0]
    assert r["ratio"] == 1.5 and r["first_median_s"] == 2.0 and r["second_median_s"] == 2.0   # ratios 2, 1.5, 0.5


def test_concurrent_reports_a_stream_that_cannot_connect():
    """A stream whose connection fails before the start must not leave the others (and the
    caller) waiting at the start line: the error comes back."""
    import socket
    import threading

    import httpx

    from skynet.bench import concurrent
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there
    out = []

    def run():
        try:
            concurrent(f"http://127.0.0.1:{port}", "hi", 2, 3)
        except Exception as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "concurrent() hung"
    assert len(out) == 1 and isinstance(out[0], httpx.ConnectError), out
