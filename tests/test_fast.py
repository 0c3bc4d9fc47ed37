"""The fast precision end to end: GGUF blocks in place, 8-bit activations, nodes holding blocks.

Invariants (issue: fast precision): a request's tokens do not depend on the node count, the split,
a join mid-generation, or what else shares its batch; loading a GGUF for `exact` gives exactly the
weights HF transformers dequantises; a GGUF of any kernel format (K-quants included) runs.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest

from conftest import hf_logits, run_greedy, spawn_node
from test_parity import assert_nodes_did_the_work
from skynet import loader, quant
from skynet.arch import arch_from_config
from skynet.cluster import Cluster
from skynet.config import ServerConfig
from skynet.dispatch import ClusterMLP
from skynet.engine import Engine, Sequence
from skynet.gguf_file import GGUFFile
from skynet.mlp import LocalMLP
from skynet.model import Model

PROMPT = [1, 504, 3458, 282, 4649, 314, 1345, 28, 99, 1000, 7, 480, 17]
STEPS = 24
NEURONS = 1024   # 32 blocks of 32: room for 7 nodes


# ---------------------------------------------------------------------------- the default GGUF
def test_reader_matches_gguf_py():
    from gguf import GGUFReader
    path = loader.default_gguf()
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == int(t.tensor_type) and info.offset == t.data_offset
        assert tuple(int(d) for d in reversed(t.shape)) == info.shape
        assert np.array_equal(ours.tensor(t.name).reshape(-1).view(np.uint8), t.data.reshape(-1).view(np.uint8))
    assert ours.meta["llama.block_count"] == 30 and len(ours.meta["tokenizer.ggml.tokens"]) == 49152
    assert not ours.tensor("blk.0.ffn_up.weight").flags.writeable   # the file itself, mapped read-only


def test_exact_from_gguf_is_what_transformers_dequantises(default_model_dir):
    """No conversion cache: the mapped file dequantised here equals transformers' float32 copy."""
    src = loader.open_model(None)
    assert src.quantized() and src.precision(None) == "fast" and src.precision("exact") == "exact"
    ours, ref = src.tensors("exact"), loader.read_weights(default_model_dir)
    assert set(ours) == set(ref)
    differ = [k for k in ref if not np.array_equal(ours[k], ref[k])]
    assert not differ, differ[:5]


def test_gguf_tokenizer_matches_transformers(default_tokenizer):
    tok = loader.open_model(None).tokenizer()
    for text in ["Hello world", "  The  café costs 3.50€!\n\n\tOK", "<|im_start|>user\nhi<|im_end|>", "日本語 123456"]:
        assert tok(text)["input_ids"] == default_tokenizer(text)["input_ids"], text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        default_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token_id, tok.bos_token_id) == (default_tokenizer.eos_token_id, default_tokenizer.bos_token_id)


def test_default_model_fast_keeps_blocks_and_tracks_exact():
    """Fast keeps every matmul weight in the file's blocks and predicts the same next token as
    exact on most positions of a real text (the bench measures agreement precisely)."""
    src = loader.open_model(None)
    arch = arch_from_config(src.config)
    fast, exact = Model(arch, src.tensors("fast")), Model(arch, src.tensors("exact"))
    w = fast.mlp_weights
    assert w.quantized and w.granule == 32 and {g.qtype for g in w.gate} == {quant.QType.Q4_1}
    assert fast.lm_head.qtype == quant.QType.Q8_0 and fast.lm_head.data.base is not None   # a view
    ids = src.tokenizer()("The capital of France is Paris. The capital of Germany is Berlin. "
                          "Water boils at 100 degrees Celsius, and freezes at zero.")["input_ids"]
    from skynet.model import Segment
    picks = []
    for m in (fast, exact):
        c = m.new_cache(len(ids))
        picks.append(m.forward(np.asarray(ids), [Segment(c, 0, len(ids), 0)], LocalMLP(m.mlp_weights),
                               last_only=False).argmax(-1))
    assert (picks[0] == picks[1]).mean() >= 0.9



def test_default_model_logits_do_not_depend_on_threads():
    """The default model in fast on 1 and on 2 kernel threads (its decode matmuls are big enough
    for the persistent workers): the same tokens and bit-identical logits, prefill and decode."""
    from skynet import _qkernels
    src = loader.open_model(None)
    arch, tensors = arch_from_config(src.config), src.tensors("fast")
    runs = []
    for threads in (1, 2):
        m = Model(arch, tensors, threads)
        jobs = _qkernels.pool_stats()[1]
        runs.append(run_greedy(Engine(m, LocalMLP(m.mlp_weights)), PROMPT, 6))
        if threads == 2:   # every 1-row matmul of SmolLM2 went through the pool
            assert _qkernels.pool_stats()[1] - jobs >= 6 * arch.layers * 4
    (out1, logits1), (out2, logits2) = runs
    assert out1 == out2 and np.array_equal(logits1, logits2)

# ---------------------------------------------------------------------------- tiny fast models
@functools.lru_cache(maxsize=None)
def _fast(model_dir) -> Model:
    src = loader.open_model(str(model_dir))
    return Model(arch_from_config(src.config), src.tensors("fast"))


@pytest.fixture(scope="module")
def tiny_fast(tiny_model):
    return _fast(tiny_model("llama", intermediate_size=NEURONS))


def _alone(model):
    cluster = Cluster(ServerConfig(node_port=0), model.mlp_weights, "tiny")
    try:
        return run_greedy(Engine(model, ClusterMLP(cluster)), PROMPT, STEPS)
    finally:
        cluster.close()


def test_safetensors_quantized_to_q8_0_at_load(tiny_fast):
    w = tiny_fast.mlp_weights
    assert w.quantized and {g.qtype for g in w.gate} == {quant.QType.Q8_0} and w.granule == 32
    out, logits = _alone(tiny_fast)
    out2, logits2 = run_greedy(Engine(tiny_fast, LocalMLP(w)), PROMPT, STEPS)
    assert out == out2 and np.array_equal(logits, logits2)
    assert len(set(out)) > 5


@pytest.mark.parametrize("n,weights", [(1, None), (2, [1.0, 3.0]), (3, [5.0, 1.0, 2.0]),
                                       (7, [1.0, 2.0, 3.0, 1.0, 1.0, 4.0, 1.0])])
def test_fast_tokens_do_not_depend_on_the_split(tiny_fast, nodes, n, weights):
    ref_out, ref_logits = _alone(tiny_fast)
    with nodes(tiny_fast, n, weights=weights) as nc:
        ranges = sorted(nc.cluster.plan.ranges.values())
        assert all(s % 32 == 0 and e % 32 == 0 for s, e in ranges) and len(ranges) == n
        out, logits = run_greedy(nc.engine, PROMPT, STEPS)
        assert_nodes_did_the_work(nc, STEPS)
        assert nc.mlp.stats["fast_calls"] == nc.mlp.stats["calls"], "the compiled path (fastpath.py) was not taken"
    assert out == ref_out, f"{n} nodes {ranges}: tokens differ from the server alone"
    diff = float(np.abs(logits - ref_logits).max())
    print(f"\n[fast] {n} nodes {ranges}: same tokens, max |logits - alone| = {diff:.3g}")
    assert diff <= 1e-5


def _first_whole_call(nc, x):
    """A new step's first whole call of x on a running cluster: (its ClusterMLP, the sum, the route)."""
    m = nc.mlp
    m.begin_step()
    y = m(0, x)
    return m, y, m.fast.route(x)


def test_whole_call_route_is_kept_within_a_step(tiny_fast, nodes):
    """fastpath.Route: made on a step's first whole call of a row count and reused for its other
    layers; made again in the next step, for another row count, and not used once a node's link
    broke (that call takes the Python path, over ZeroMQ, and sums the same bits)."""
    from skynet.links import unlink
    w = tiny_fast.mlp_weights
    x = np.random.default_rng(3).standard_normal((2, w.hidden)).astype(np.float32)
    with nodes(tiny_fast, 2, weights=[1.0, 1.0]) as nc:
        m, y0, r = _first_whole_call(nc, x)
        assert r is not None and len(r.nodes) == 2
        m(1, x)
        assert m.fast.route(x) is r and m.fast.route(x[:1]) is not r
        m.begin_step()
        r2 = m.fast.route(x)
        assert r2 is not None and r2 is not r
        calls = m.stats["fast_calls"]
        unlink(r2.nodes[0], "test")
        assert m.fast.route(x) is None
        y = m(0, x)
        assert m.stats["fast_calls"] == calls, "a call took the compiled path without a link"
    assert np.array_equal(y, y0)
    np.testing.assert_allclose(y0, LocalMLP(w)(0, x), rtol=1e-5, atol=1e-6)


def test_whole_call_whose_send_fails_asks_that_range_again(tiny_fast, nodes):
    """A link that breaks under the compiled whole call's send (status 4): nothing is waited for
    in C, the node is unlinked, its range is asked again over ZeroMQ, and the sum keeps its bits."""
    import socket
    w = tiny_fast.mlp_weights
    x = np.random.default_rng(4).standard_normal((3, w.hidden)).astype(np.float32)
    with nodes(tiny_fast, 2, weights=[1.0, 1.0]) as nc:
        m, y0, r = _first_whole_call(nc, x)
        victim = r.nodes[1]
        victim.link.sock.shutdown(socket.SHUT_WR)   # the route still holds this link: its next send fails
        calls = m.stats["fast_calls"]
        y = m(0, x)
        assert victim.link is None and m.fast.route(x) is None
        assert m.stats["fast_calls"] == calls + 1 and not m.inflight
    assert np.array_equal(y, y0)


def test_fast_micro_batches_take_the_compiled_path_and_keep_tokens(tiny_fast, nodes, monkeypatch):
    """--overlap in fast: two micro-batches in flight go through FastPath.scatter / gather (the
    compiled send and wait), every call, and each sequence's tokens are those it gets alone."""
    from skynet import engine as engine_mod, overlap
    prompts = [PROMPT, [1, 77, 12], [1, 9000, 33, 44, 55, 66, 77], [1, 5]]
    want = [run_greedy(Engine(tiny_fast, LocalMLP(tiny_fast.mlp_weights)), p, 8)[0] for p in prompts]
    splits = []
    real = overlap.split
    monkeypatch.setattr(engine_mod.overlap, "split", lambda *a: splits.append(real(*a)) or splits[-1])
    with nodes(tiny_fast, 2, weights=[1.0, 1.0]) as nc:
        nc.mlp.overlap = True
        seqs = [nc.engine.submit(Sequence(list(p), 8)) for p in prompts]
        while not all(q.done for q in seqs):
            nc.engine.step()
        st = nc.mlp.stats
        assert st["calls"] > 0 and st["fast_calls"] == st["calls"] and st["fallbacks"] == 0, (st, nc.logs())
        assert not nc.mlp.inflight
    assert sum(g is not None for g in splits) >= 7, "the steps were not run as two micro-batches"
    assert [q.out for q in seqs] == want


def test_fast_tokens_survive_a_join_mid_generation(tiny_fast, nodes, tmp_path):
    ref_out, _ = _alone(tiny_fast)
    with nodes(tiny_fast, 2, weights=[1.0, 1.0]) as nc:
        epoch = nc.cluster.epoch
        seq = nc.engine.submit(Sequence(list(PROMPT), STEPS))
        for _ in range(5):
            nc.engine.step()
        nc.procs.append(spawn_node(nc.cluster.cfg.node_port, "late", tmp_path, 2.0))
        nc.names.append("late")
        deadline = time.monotonic() + 60   # the sequence waits mid-generation until the plan switches
        while nc.cluster.epoch == epoch or nc.cluster.pending:
            assert time.monotonic() < deadline, nc.logs()
            nc.cluster.poll(20)
        while not seq.done:
            nc.engine.step()
        nc.engine.step()
        assert nc.cluster.epoch > epoch and len(nc.cluster.plan.ranges) == 3, nc.logs()
    assert seq.out == ref_out


def test_fast_rows_do_not_depend_on_the_batch(tiny_fast):
    """A sequence's logits are bit-identical alone and packed with others (prefill chunks and
    decode rows of other sequences in the same steps)."""
    alone_out, alone_logits = run_greedy(Engine(tiny_fast, LocalMLP(tiny_fast.mlp_weights)), PROMPT, STEPS)
    eng = Engine(tiny_fast, LocalMLP(tiny_fast.mlp_weights), max_step_tokens=8)
    others = [eng.submit(Sequence(PROMPT[::-1] * 2, STEPS)), eng.submit(Sequence(PROMPT[:4], STEPS))]
    seq, seen = eng.submit(Sequence(list(PROMPT), STEPS)), []
    inner = seq.sampler
    seq.sampler = lambda logits: (seen.append(logits.copy()), inner(logits))[1]
    widths = []
    while not seq.done:
        widths.append(eng.step())
    assert max(widths) > 1 and all(not o.done or o.out for o in others)
    # the three sequences shared steps: at least as many packed steps as this one has tokens
    print(f"\n[packing] {eng.stats['packed_steps']} of {eng.stats['steps']} steps packed")
    assert eng.stats["max_seqs"] == 3 and eng.stats["packed_steps"] >= STEPS, eng.stats
    assert seq.out == alone_out and np.array_equal(np.stack(seen), alone_logits)


# ---------------------------------------------------------------------------- K-quant GGUF files
KQ = {"token_embd": 8, "attn_q": 12, "attn_k": 13, "attn_v": 14, "attn_output": 2,
      "ffn_gate": 12, "ffn_up": 3, "ffn_down": 14, "output": 14}   # Q4_K_M-like mix


def _random_blocks(qtype: int, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes are valid blocks once their fp16 scales are finite and small."""
    values, size = quant.BLOCKS[quant.QType(qtype)]
    b = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)
    scale = lambda n: (rng.uniform(0.2, 1.0, (rows, cols // values, n)) * (0.02 if values == 32 else 0.002)  # noqa: E731
                       ).astype(np.float16).view(np.uint8)
    if qtype == 14:
        b[..., 208:210] = scale(1)
    elif qtype in (12, 13, 3):
        b[..., 0:4] = scale(2)
    else:
        b[..., 0:2] = scale(1)
    return b.reshape(rows, -1)


def write_tiny_gguf(path, hidden=256, neurons=512, layers=2, heads=4, kv_heads=2, vocab=512, seed=0):
    import gguf
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(neurons)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    d = hidden // heads

    def mat(name, kind, rows, cols):
        w.add_tensor(name, _random_blocks(KQ[kind], rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType(KQ[kind]))

    def vec(name, n):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", "token_embd", vocab, hidden)
    for i in range(layers):
        vec(f"blk.{i}.attn_norm.weight", hidden)
        vec(f"blk.{i}.ffn_norm.weight", hidden)
        mat(f"blk.{i}.attn_q.weight", "attn_q", heads * d, hidden)
        mat(f"blk.{i}.attn_k.weight", "attn_k", kv_heads * d, hidden)
        mat(f"blk.{i}.attn_v.weight", "attn_v", kv_heads * d, hidden)
        mat(f"blk.{i}.attn_output.weight", "attn_output", hidden, heads * d)
        mat(f"blk.{i}.ffn_gate.weight", "ffn_gate", neurons, hidden)
        mat(f"blk.{i}.ffn_up.weight", "ffn_up", neurons, hidden)
        mat(f"blk.{i}.ffn_down.weight", "ffn_down", hidden, neurons)
    vec("output_norm.weight", hidden)
    mat("output.weight", "output", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("kq") / "tiny-q4km.gguf")


def test_kquant_gguf_exact_matches_hf(kquant_gguf):
    import torch
    from transformers import AutoModelForCausalLM
    src = loader.open_model(str(kquant_gguf))
    model = Model(arch_from_config(src.config), src.tensors("exact"))
    hf = AutoModelForCausalLM.from_pretrained(str(kquant_gguf.parent), gguf_file=kquant_gguf.name,
                                              dtype=torch.float32).eval()
    prompt = [3, 100, 7, 250, 31, 9]
    out, logits = run_greedy(Engine(model, LocalMLP(model.mlp_weights)), prompt, 8)
    ref = hf_logits(hf, prompt + out[:-1])[len(prompt) - 1:]
    assert list(ref.argmax(-1)) == out
    assert float(np.abs(ref - logits).max()) <= 1e-5 * float(np.abs(ref).max())   # float32 noise at |logit| ~ 70


def test_kquant_gguf_fast_over_nodes(kquant_gguf, nodes):
    src = loader.open_model(str(kquant_gguf))
    fast = Model(arch_from_config(src.config), src.tensors("fast"))
    w = fast.mlp_weights
    assert w.granule == 256 and {d.qtype for d in w.down} == {quant.QType.Q6_K}
    assert {fast.layers[0].qkv.parts[i].qtype for i in range(3)} == {12, 13, 14}
    prompt = [3, 100, 7, 250, 31, 9]
    ref_out, ref_logits = run_greedy(Engine(fast, LocalMLP(w)), prompt, 12)
    with nodes(fast, 2) as nc:
        assert sorted(nc.cluster.plan.ranges.values()) == [(0, 256), (256, 512)]
        out, logits = run_greedy(nc.engine, prompt, 12)
        assert_nodes_did_the_work(nc, 12)
    assert out == ref_out and float(np.abs(logits - ref_logits).max()) <= 1e-5
