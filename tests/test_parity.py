"""Parity with HF transformers (the oracle), float32: same greedy tokens, logits within 1e-4.

Our side runs through the Engine (packed steps, KV cache, prefill chunks) with the MLP computed
locally, by an empty cluster, or by real node processes over ZeroMQ; HF runs a full-sequence
forward over the same tokens. A step's logits are the ones the engine sampled from.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import TINY_NEURONS, hf_logits, hf_model, load_model, run_greedy
from skynet.cluster import Cluster
from skynet.config import ServerConfig
from skynet.dispatch import ClusterMLP
from skynet.engine import Engine, RequestError, Sequence
from skynet.mlp import LocalMLP
from skynet.model import Segment

TOL = 1e-4
MISTRAL_WINDOW = 64   # tests/conftest.py's tiny Mistral: sliding_window below max_position_embeddings
STEPS = 40
PROMPT = [1, 504, 3458, 282, 4649, 314, 1345, 28, 99, 1000, 7, 48000, 17]


@functools.lru_cache(maxsize=None)
def _hf(model_dir):
    return hf_model(model_dir)


@functools.lru_cache(maxsize=None)
def _ours(model_dir):
    return load_model(model_dir)


def check_vs_hf(hf, prompt: list[int], out: list[int], logits: np.ndarray, label: str) -> float:
    """HF's logits at every generated position (one causal forward over prompt + out[:-1]) must
    pick our tokens greedily and match our logits within TOL. Returns the max abs difference."""
    assert len(out) == logits.shape[0]
    ref = hf_logits(hf, list(prompt) + list(out[:-1]))[len(prompt) - 1:]       # (steps, V)
    assert ref.shape == logits.shape
    hf_pick = ref.argmax(-1)
    bad = np.flatnonzero(hf_pick != np.asarray(out))
    assert bad.size == 0, f"{label}: greedy token differs from HF first at step {bad[0]}: " \
                          f"ours {out[bad[0]]}, HF {hf_pick[bad[0]]}"
    per_step = np.abs(ref - logits).max(axis=-1)
    worst = float(per_step.max())
    print(f"\n[parity] {label}: {len(out)} steps, max |logits - HF| = {worst:.3g}")
    assert worst <= TOL, f"{label}: logits differ from HF by {worst:.3g} (step {int(per_step.argmax())})"
    return worst


def assert_nodes_did_the_work(nc, steps: int) -> None:
    """Every started node answered every MLP call of every step, under one unchanged plan."""
    st, layers = nc.mlp.stats, nc.engine.model.arch.layers
    assert st["fallbacks"] == 0, f"some ranges were computed by the server instead: {st}\n{nc.logs()}"
    assert st["calls"] == steps * layers
    assert nc.cluster.epoch == nc.epoch0, "the plan changed during the run"
    planned = {nc.cluster.nodes[i].name for i in nc.cluster.plan.ranges}
    assert planned == set(nc.names), f"planned {planned}, started {nc.names}"
    for name in nc.names:
        assert st["replies"].get(name, 0) == steps * layers, f"node {name}: {st['replies']}\n{nc.logs()}"


# ---------------------------------------------------------------------------- zero nodes
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mlp_kind", ["local", "cluster-without-nodes"])
def test_tiny_zero_nodes(tiny_model, family, mlp_kind):
    d = tiny_model(family)
    model = _ours(d)
    if family == "qwen2":   # the q/k/v biases are really there and really used
        assert model.arch.qkv_bias and all(np.abs(l.bqkv).min() > 0 for l in model.layers)
    if mlp_kind == "local":
        out, logits = run_greedy(Engine(model, LocalMLP(model.mlp_weights)), PROMPT, STEPS)
        check_vs_hf(_hf(d), PROMPT, out, logits, f"tiny {family}, LocalMLP")
        return
    cluster = Cluster(ServerConfig(node_port=0), model.mlp_weights, "tiny")
    try:
        assert cluster.plan.ranges == {} and cluster.plan.local == ((0, TINY_NEURONS),)
        mlp = ClusterMLP(cluster)
        out, logits = run_greedy(Engine(model, mlp), PROMPT, STEPS)
        assert mlp.stats["calls"] == STEPS * model.arch.layers and mlp.stats["bytes_out"] == 0
    finally:
        cluster.close()
    check_vs_hf(_hf(d), PROMPT, out, logits, f"tiny {family}, ClusterMLP with 0 nodes")


# ---------------------------------------------------------------------------- node processes
@pytest.mark.parametrize("family,n,local_weight", [
    ("llama", 3, 0.0), ("llama", 7, 0.0), ("qwen2", 3, 0.0), ("qwen2", 7, 0.0),
    ("llama", 3, 0.5),   # the server keeps a share of its own alongside the nodes
    ("mistral", 3, 0.0),
])
def test_tiny_nodes(tiny_model, nodes, family, n, local_weight):
    d = tiny_model(family)
    model = _ours(d)
    with nodes(model, n, local_weight=local_weight) as nc:
        plan = nc.cluster.plan
        assert plan.covers() and len(plan.ranges) == n
        sizes = sorted(e - s for s, e in plan.ranges.values())
        if local_weight:
            assert len(plan.local) == 1 and plan.local[0][1] == TINY_NEURONS   # after the nodes
        else:
            assert not plan.local
            assert sizes[-1] - sizes[0] == 1   # 1000 neurons do not split evenly over 3 or 7
        out, logits = run_greedy(nc.engine, PROMPT, STEPS)
        assert_nodes_did_the_work(nc, STEPS)
    check_vs_hf(_hf(d), PROMPT, out, logits,
                f"tiny {family}, {n} nodes" + (f" + server share {plan.local}" if plan.local else ""))


def test_node_with_a_single_neuron(tiny_model, nodes):
    d = tiny_model("llama")
    model = _ours(d)
    with nodes(model, 2, weights=[1e-4, 1000.0]) as nc:
        ranges = nc.ranges()
        assert sorted(e - s for s, e in ranges.values()) == [1, TINY_NEURONS - 1], ranges
        assert ranges["n0"][1] - ranges["n0"][0] == 1
        out, logits = run_greedy(nc.engine, PROMPT, STEPS)
        assert_nodes_did_the_work(nc, STEPS)
    check_vs_hf(_hf(d), PROMPT, out, logits, f"tiny llama, node holding 1 neuron {ranges['n0']}")

    # The check above would catch a lost partial: without that one neuron the logits move a lot.
    s, e = ranges["n0"]
    w = model.mlp_weights
    rest = [[w.slice(li, a, b) for a, b in ((0, s), (e, w.neurons)) if b > a] for li in range(w.layers)]
    cache = model.new_cache(len(PROMPT))
    without = model.forward(np.asarray(PROMPT), [Segment(cache, 0, len(PROMPT), 0)],
                            lambda li, x: sum(sl(x) for sl in rest[li]))[0]
    assert np.abs(without - logits[0]).max() > 100 * TOL


def test_mistral_sliding_window_bounds_the_context(tiny_model):
    """Mistral attends within a sliding window; up to the window that is full attention, which is
    what we compute, so the window is the context: a request that would pass it is refused."""
    d = tiny_model("mistral")
    model = _ours(d)
    assert model.arch.family == "mistral" and model.arch.max_context == MISTRAL_WINDOW
    engine = Engine(model, LocalMLP(model.mlp_weights))
    engine.check(PROMPT, MISTRAL_WINDOW - len(PROMPT))             # exactly fills the window
    with pytest.raises(RequestError, match="context of 64 tokens"):
        engine.check(PROMPT, MISTRAL_WINDOW - len(PROMPT) + 1)


# ---------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def default_hf(default_model_dir):
    return hf_model(default_model_dir)


@pytest.mark.parametrize("n", [0, 2])
def test_default_model(default_model, default_hf, default_tokenizer, nodes, n):
    prompt = default_tokenizer("The three primary colors are")["input_ids"]
    if n == 0:
        out, logits = run_greedy(Engine(default_model, LocalMLP(default_model.mlp_weights)), prompt, STEPS)
    else:
        with nodes(default_model, n) as nc:
            out, logits = run_greedy(nc.engine, prompt, STEPS)
            assert_nodes_did_the_work(nc, STEPS)
            ranges = nc.ranges()
    check_vs_hf(default_hf, prompt, out, logits,
                "SmolLM2-135M, " + ("LocalMLP" if n == 0 else f"{n} nodes {sorted(ranges.values())}"))
    assert default_tokenizer.decode(out).strip()


# ---------------------------------------------------------------------------- KV cache, chunks, packing
def test_kv_cache_long_decode_matches_fresh_hf_forwards(tiny_model):
    """70 decode steps off the cache vs. HF recomputing the whole sequence at every step."""
    d = tiny_model("qwen2")
    model, hf = _ours(d), _hf(d)
    prompt, steps = PROMPT[:5], 70
    out, logits = run_greedy(Engine(model, LocalMLP(model.mlp_weights)), prompt, steps)
    ids, worst = list(prompt), 0.0
    for i in range(steps):
        ref = hf_logits(hf, ids)[-1]                       # fresh full forward, no cache
        assert int(ref.argmax()) == out[i], f"step {i}: ours {out[i]}, HF {int(ref.argmax())}"
        worst = max(worst, float(np.abs(ref - logits[i]).max()))
        ids.append(out[i])
    print(f"\n[parity] tiny qwen2, {steps} cached decode steps vs fresh HF forwards: max diff {worst:.3g}")
    assert worst <= TOL
    assert len(set(out)) > 10   # a non-degenerate trajectory


def test_chunked_prefill_and_packed_sequences(tiny_model):
    """Prompts prefilled 4 rows per step while other sequences decode in the same packed step."""
    d = tiny_model("llama")
    model, hf = _ours(d), _hf(d)
    eng = Engine(model, LocalMLP(model.mlp_weights), max_step_tokens=4)
    prompts = [PROMPT + PROMPT[::-1], PROMPT[:3], [5] + PROMPT[2:]]   # 26, 3 and 12 tokens
    seqs, seen = [], []
    for p in prompts:
        seq = eng.submit(Sequence(list(p), 12))
        seen.append([])
        seq.sampler = (lambda inner, rec: lambda l: (rec.append(l.copy()), inner(l))[1])(seq.sampler, seen[-1])
        seqs.append(seq)
    widths = []
    while any(not s.done for s in seqs):
        widths.append(eng.step())
    assert max(widths) == 4 and len(widths) > 12   # chunked and budgeted
    # several sequences shared steps: all three in one step, and more than half the steps packed
    print(f"\n[packing] {eng.stats['packed_steps']} of {eng.stats['steps']} steps packed")
    assert eng.stats["max_seqs"] == 3 and 2 * eng.stats["packed_steps"] > eng.stats["steps"], eng.stats
    for p, seq, rec in zip(prompts, seqs, seen):
        check_vs_hf(hf, p, seq.out, np.stack(rec), f"tiny llama, chunked+packed prompt of {len(p)}")

    # And every row of an uneven chunking, straight through Model.forward.
    ids = PROMPT + PROMPT[::-1]
    ref = hf_logits(hf, ids)
    cache, pos, rows = model.new_cache(len(ids)), 0, []
    for n in (7, 1, 9, 9):
        rows.append(model.forward(np.asarray(ids[pos:pos + n]), [Segment(cache, 0, n, pos)],
                                  LocalMLP(model.mlp_weights), last_only=False))
        pos += n
    assert pos == len(ids)
    diff = float(np.abs(np.concatenate(rows) - ref).max())
    print(f"\n[parity] tiny llama, every row of chunks 7/1/9/9: max diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=["linear", "llama3"])
def test_rope_scaling(tiny_model, rope):
    d = tiny_model("llama", layers=2, rope_scaling=rope)
    model = _ours(d)
    assert model.arch.rope_type == rope["rope_type"]
    out, logits = run_greedy(Engine(model, LocalMLP(model.mlp_weights)), PROMPT, 32)
    check_vs_hf(_hf(d), PROMPT, out, logits, f"tiny llama, rope {rope['rope_type']}")


def test_ranges_computed_here_are_counted_with_their_reason(tiny_model, nodes):
    """A planned node the server skips (here: one still loading rows) is a counted fallback, with
    its reason in the stats and in /metrics, and its range is still computed exactly."""
    from skynet.metrics import Metrics
    d = tiny_model("llama")
    model = _ours(d)
    with nodes(model, 2) as nc:
        metrics = Metrics().bind(nc.cluster, nc.engine)
        busy = next(iter(nc.cluster.nodes.values()))
        busy.load_epoch = busy.ready_epoch + 1          # as if assembling the next epoch
        out, logits = run_greedy(nc.engine, PROMPT, 4)
        st = nc.mlp.stats
        assert st["fallbacks"] == st["fallback_reasons"]["loading rows"] == 4 * model.arch.layers
        assert st["replies"].get(busy.name, 0) == 0
        text = metrics.render().decode()
        assert f'skynet_mlp_fallbacks_total{{reason="loading rows"}} {4.0 * model.arch.layers}' in text
    check_vs_hf(_hf(d), PROMPT, out, logits, "tiny llama, one node's range computed by the server")
