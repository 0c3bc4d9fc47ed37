"""Two micro-batches in flight (overlap.py): whole sequences split evenly, the same logits bit for
bit as the one-batch forward, and the same tokens with real nodes."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_model
from skynet import engine as engine_mod
from skynet import overlap
from skynet.engine import Engine, Sequence
from skynet.mlp import LocalMLP
from skynet.model import Segment

PROMPTS = [[1, 504, 3458, 282, 4649], [1, 77, 12], [1, 9000, 33, 44, 55, 66, 77], [1, 5]]


def segs(*ns):
    out, row = [], 0
    for n in ns:
        out.append(Segment(None, row, n, 0))
        row += n
    return out


@pytest.mark.parametrize("ns,cut", [((1, 1), 1), ((1, 1, 1, 1), 2), ((1, 1, 1), 2), ((10, 1, 1), 1),
                                    ((1, 1, 10), 2), ((3, 3, 3, 3, 3), 3)])
def test_split_keeps_sequences_whole_and_balances_rows(ns, cut):
    a, b = overlap.split(segs(*ns))
    assert [s.n for s in a] == list(ns[:cut]) and [s.n for s in b] == list(ns[cut:])
    assert [s.row for s in a] == [s.row for s in segs(*ns[:cut])]
    assert [s.row for s in b] == [s.row for s in segs(*ns[cut:])]   # renumbered from 0


def test_one_sequence_is_not_split():
    assert overlap.split(segs(5)) is None
    assert overlap.split(segs(127)) is None


@pytest.mark.parametrize("n,cut", [(128, 64), (150, 64), (256, 128), (300, 128)])
def test_one_long_prompt_chunk_is_cut_in_two(n, cut):
    """At a multiple of ATTN_BLOCK (64): the second half's rows from 0, its positions after the first's."""
    s = Segment("cache", 0, n, 7)
    a, b = overlap.split([s])
    assert [(x.row, x.n, x.pos, x.cache) for x in a] == [(0, cut, 7, "cache")]
    assert [(x.row, x.n, x.pos, x.cache) for x in b] == [(0, n - cut, 7 + cut, "cache")]


class Pipelined:
    """A LocalMLP with the scatter/gather interface, recording the order of calls."""

    def __init__(self, weights):
        self.local, self.log = LocalMLP(weights), []

    def scatter(self, layer, x, micro=0):
        self.log.append(("scatter", layer, micro))
        return layer, micro, x

    def gather(self, call):
        layer, micro, x = call
        self.log.append(("gather", layer, micro))
        return self.local(layer, x)


def test_a_long_prompt_cut_in_two_keeps_its_logits_bit_for_bit(tiny_model):
    """One 200-token prompt as two pipelined halves: every row's logits (prompt logprobs need
    them all) are the one-batch forward's, in exact (numpy blocks) and in fast (C attention)."""
    from skynet import loader
    from skynet.arch import arch_from_config
    from skynet.model import Model
    src = loader.open_model(str(tiny_model("llama", intermediate_size=1024)))   # whole Q8_0 blocks
    fast = Model(arch_from_config(src.config), src.tensors("fast"))
    assert fast.compiled_attention
    prompt = np.random.default_rng(5).integers(3, 200, 200)
    for model in (load_model(tiny_model("llama")), fast):
        want = model.forward(prompt, [Segment(model.new_cache(256), 0, 200, 0)], LocalMLP(model.mlp_weights),
                             rows=list(range(200)))
        mlp = Pipelined(model.mlp_weights)
        got = overlap.forward(model, prompt, [Segment(model.new_cache(256), 0, 200, 0)], mlp, rows=list(range(200)))
        np.testing.assert_array_equal(got, want)
        assert ("scatter", 0, 1) in mlp.log


@pytest.mark.parametrize("asked", [None, [0, 3, 4, 7, 14]])   # last rows, or rows asked (logprobs)
def test_logits_are_bit_identical_to_the_one_batch_forward(tiny_model, asked):
    model = load_model(tiny_model("llama"))
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]

    def run(fn):
        segments, row = [], 0
        for p in rows:
            segments.append(Segment(model.new_cache(64), row, len(p), 0))
            row += len(p)
        return fn(np.asarray([t for p in rows for t in p], np.int64), segments)

    want = run(lambda t, s: model.forward(t, s, LocalMLP(model.mlp_weights), rows=asked))
    mlp = Pipelined(model.mlp_weights)
    got = run(lambda t, s: overlap.forward(model, t, s, mlp, rows=asked))
    assert got.shape[0] == (3 if asked is None else len(asked))
    np.testing.assert_array_equal(got, want)
    layers = model.arch.layers   # the nodes' MLP for one micro-batch spans the other's attention
    assert mlp.log[:4] == [("scatter", 0, 0), ("scatter", 0, 1), ("gather", 0, 0), ("scatter", 1, 0)]
    assert len(mlp.log) == 4 * layers


def _together(engine, prompts, steps):
    seqs = [engine.submit(Sequence(list(p), steps)) for p in prompts]
    while not all(s.done for s in seqs):
        engine.step()
    engine.step()
    return [s.out for s in seqs]


def test_tokens_do_not_change_with_nodes_and_micro_batches(tiny_model, nodes, monkeypatch):
    model = load_model(tiny_model("llama"))
    want = [Engine(model, LocalMLP(model.mlp_weights)).generate(p, 8).out for p in PROMPTS]
    used = []
    real = overlap.forward
    monkeypatch.setattr(engine_mod.overlap, "forward", lambda *a, **k: used.append(1) or real(*a, **k))
    with nodes(model, 2) as nc:
        nc.mlp.overlap = True
        assert _together(nc.engine, PROMPTS, 8) == want
        assert nc.engine.generate(PROMPTS[0], 8).out == want[0]     # one sequence: no split
        st = nc.mlp.stats
        assert used and st["fallbacks"] == 0, (st, nc.logs())
        assert not nc.mlp.inflight
        nc.mlp.overlap, used[:] = False, []                              # off (the default)
        assert _together(nc.engine, PROMPTS, 8) == want and not used
