"""Logprobs in the engine (in process, tiny random model): prompt and sampled tokens' logprobs are
HF's log_softmax within 1e-4, also when the prompt is prefilled in chunks next to a sequence that
asks for nothing; max_tokens 0 scores without generating; the top-k lists; the seeded streams."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_logits, hf_model, load_model
from skynet.engine import Engine, Sequence
from skynet.mlp import LocalMLP
from skynet.sampling import Sampler, SamplingParams, log_softmax, token_logprobs

TOL = 1e-4
PROMPT = [1, 504, 3458, 282, 4649, 314, 1345, 28, 99, 1000, 7, 48000, 17]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    d = tiny_model("llama", layers=2)
    return load_model(d), hf_model(d)


def _engine(model, **kw) -> Engine:
    return Engine(model, LocalMLP(model.mlp_weights), **kw)


def _run(engine, *seqs):
    for s in seqs:
        engine.submit(s)
    while engine.has_work:
        engine.step()


def test_prompt_and_token_logprobs_match_hf(tiny):
    """Chunks of 5 rows: the asking sequence's rows straddle steps; a plain one shares them."""
    model, hf = tiny
    engine = _engine(model, max_step_tokens=5)
    ask = Sequence(list(PROMPT), 6, logprobs=3, prompt_logprobs=3)
    plain = Sequence(list(PROMPT[3:]), 6)
    _run(engine, plain, ask)
    assert ask.finish_reason == plain.finish_reason == "length"
    ref = log_softmax(hf_logits(hf, PROMPT + ask.out[:-1]))                   # (T, V)
    want = ref[np.arange(len(PROMPT) + 5), PROMPT[1:] + ask.out]
    got = [lp.logprob for lp in ask.prompt_lps + ask.out_logprobs]
    assert [lp.token for lp in ask.prompt_lps] == PROMPT[1:]
    assert [lp.token for lp in ask.out_logprobs] == ask.out
    assert np.abs(np.asarray(got) - want).max() <= TOL
    for pos, lp in enumerate(ask.prompt_lps + ask.out_logprobs):
        top = np.argsort(-ref[pos], kind="stable")[:3]
        assert [t for t, _ in lp.top] == list(top)
        assert np.allclose([v for _, v in lp.top], ref[pos, top], atol=TOL)
    assert plain.prompt_lps == [] and plain.out_logprobs == []
    # asking changed nothing for the plain sequence nor for its own tokens
    alone = Sequence(list(PROMPT[3:]), 6)
    _run(_engine(model), alone)
    assert alone.out == plain.out


def test_max_tokens_zero_scores_only(tiny):
    model, hf = tiny
    engine = _engine(model, max_step_tokens=4)
    seq = Sequence(list(PROMPT), 0, logprobs=0, prompt_logprobs=0)
    _run(engine, seq)
    assert seq.finish_reason == "length" and seq.out == [] and seq.out_logprobs == []
    ref = log_softmax(hf_logits(hf, PROMPT))
    want = ref[np.arange(len(PROMPT) - 1), PROMPT[1:]]
    assert np.abs(np.asarray([lp.logprob for lp in seq.prompt_lps]) - want).max() <= TOL
    assert all(lp.top == () for lp in seq.prompt_lps)
    one = Sequence([PROMPT[0]], 0, prompt_logprobs=2)      # one token: nothing to score
    _run(engine, one)
    assert one.finish_reason == "length" and one.prompt_lps == []


def test_greedy_token_is_top_logprob(tiny):
    model, _ = tiny
    seq = Sequence(list(PROMPT), 5, logprobs=1)
    _run(_engine(model), seq)
    for lp in seq.out_logprobs:
        assert lp.top[0] == (lp.token, lp.logprob)


def test_logprobs_ignore_temperature_and_penalties(tiny):
    """Logprobs are of the raw logits: sampling hot with penalties reports the same numbers for
    the same tokens as a teacher-forced pass."""
    model, hf = tiny
    params = SamplingParams(temperature=1.7, top_k=50, seed=5, presence_penalty=2.0, frequency_penalty=1.0)
    seq = Sequence(list(PROMPT), 5, params, logprobs=0)
    _run(_engine(model), seq)
    ref = log_softmax(hf_logits(hf, PROMPT + seq.out[:-1]))[len(PROMPT) - 1:]
    want = ref[np.arange(5), seq.out]
    assert np.abs(np.asarray([lp.logprob for lp in seq.out_logprobs]) - want).max() <= TOL


def test_token_logprobs_unit():
    logits = np.array([[0.0, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    lps = token_logprobs(logits, [3, 0], 2)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    assert [lp.token for lp in lps] == [3, 0]
    assert np.allclose([lps[0].logprob, lps[1].logprob], [ref[0, 3], ref[1, 0]], atol=1e-6)
    assert [t for t, _ in lps[0].top] == [1, 2]          # a tie: the lower id first
    assert [t for t, _ in lps[1].top] == [0, 1]
    assert np.allclose(np.exp(log_softmax(logits)).sum(-1), 1.0, atol=1e-6)


def test_sampler_streams():
    p = SamplingParams(temperature=1.0, seed=7)
    logits = np.zeros(1000, np.float32)

    def draw(stream, params=p):
        s = Sampler(params, stream)
        return [s(logits) for _ in range(20)]

    assert draw(0) == draw(0) and draw(3) == draw(3)
    assert draw(0) != draw(1) != draw(2)
    plain = Sampler(p)                       # stream 0 is the seed's own, as before streams
    assert draw(0) == [plain(logits) for _ in range(20)]
    assert draw(1, SamplingParams(temperature=1.0)) != draw(1, SamplingParams(temperature=1.0))
