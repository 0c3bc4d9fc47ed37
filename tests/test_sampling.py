"""The sampler's properties, on logits directly: greedy, top-k, seeds, temperature, penalties.

The live API passes these parameters through unchanged (tests/test_serving.py checks a few of
them end to end); here each property is checked where it is decided, with exact expectations.
"""
from __future__ import annotations

import numpy as np
import pytest

from skynet.sampling import Sampler, SamplingParams, penalize

V = 50


def logits_set(count: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(V) * 3).astype(np.float32) for _ in range(count)]


def draws(params: SamplingParams, logits: np.ndarray, n: int) -> list[int]:
    """n tokens from one sampler fed the same logits each time (its counts grow as it goes)."""
    s = Sampler(params)
    return [s(logits) for _ in range(n)]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------------------- greedy and top-k
@pytest.mark.parametrize("seed", [None, 0, 1, 12345])
def test_temperature_zero_is_argmax_whatever_the_seed(seed):
    for z in logits_set():
        assert Sampler(SamplingParams(temperature=0.0, seed=seed))(z) == int(np.argmax(z))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_top_k_1_equals_greedy(temperature):
    for i, z in enumerate(logits_set()):
        assert Sampler(SamplingParams(temperature=temperature, top_k=1, seed=i))(z) == int(np.argmax(z))
    # with penalties too: the same penalised argmax at every step of a sequence
    pen = dict(presence_penalty=0.7, frequency_penalty=0.4)
    z = logits_set(1, seed=3)[0]
    assert draws(SamplingParams(temperature=temperature, top_k=1, seed=9, **pen), z, 30) == \
        draws(SamplingParams(temperature=0.0, **pen), z, 30)


def test_top_k_never_picks_outside_the_k_best():
    z = logits_set(1, seed=5)[0]
    best3 = set(np.argsort(-z)[:3].tolist())
    got = draws(SamplingParams(temperature=5.0, top_k=3, seed=1), z, 300)
    assert set(got) == best3   # all three are drawn at a high temperature, nothing else ever


def test_top_p_keeps_the_smallest_nucleus():
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float64)).astype(np.float32)
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=2), z, 400))
    assert got == {0, 1}   # 0.5 < 0.75 <= 0.5 + 0.3: exactly the first two


# ---------------------------------------------------------------------------- seeds
def test_same_seed_repeats_and_different_seeds_differ():
    z = np.zeros(V, np.float32)   # uniform: 40 draws agree by chance with probability 50^-40
    p = SamplingParams(temperature=1.0, seed=42)
    a = draws(p, z, 40)
    assert draws(p, z, 40) == a
    others = [draws(SamplingParams(temperature=1.0, seed=s), z, 40) for s in (1, 2, 3)]
    assert all(o != a for o in others) and len({tuple(o) for o in others}) == 3


# ---------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(temperature):
    z = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    n = 20000
    s = Sampler(SamplingParams(temperature=temperature, seed=7))
    freq = np.bincount([s(z) for _ in range(n)], minlength=z.size) / n
    want = softmax(z.astype(np.float64) / temperature)
    # 4.5 standard errors of a binomial proportion: a wrong temperature misses by far more
    assert np.all(np.abs(freq - want) <= 4.5 * np.sqrt(want * (1 - want) / n) + 1e-9), (freq, want)


def test_higher_temperature_flattens_and_zero_never_varies():
    z = logits_set(1, seed=11)[0]
    spread = {t: len(set(draws(SamplingParams(temperature=t, seed=1), z, 300))) for t in (0.0, 0.2, 1.0, 3.0)}
    assert spread[0.0] == 1
    assert spread[0.2] < spread[1.0] < spread[3.0], spread


# ---------------------------------------------------------------------------- penalties (OpenAI)
def test_penalties_follow_openai_formula_on_logits():
    """mu[j] -> mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty"""
    z = np.arange(6, dtype=np.float32)
    counts = {1: 1, 4: 3}
    out = penalize(z, counts, presence=0.5, frequency=0.25)
    want = z.astype(np.float64)
    want[1] -= 0.5 + 0.25 * 1
    want[4] -= 0.5 + 0.25 * 3
    assert np.array_equal(out, want)
    assert np.array_equal(z, np.arange(6, dtype=np.float32))   # the caller's logits are untouched
    # negative values encourage repetition, by the same amounts
    assert np.array_equal(penalize(z, counts, -0.5, -0.25) - z, -(out - z))


def test_frequency_penalty_grows_with_each_repeat():
    z = np.array([2.0, 1.5, -5.0], np.float32)
    # token 0 leads by 0.5: after 2 picks (penalty 0.6) token 1 leads, then they alternate
    assert draws(SamplingParams(frequency_penalty=0.3), z, 6) == [0, 0, 1, 0, 1, 0]
    assert draws(SamplingParams(), z, 6) == [0] * 6


def test_presence_penalty_is_paid_once():
    z = np.array([2.0, 1.5, -5.0], np.float32)
    assert draws(SamplingParams(presence_penalty=0.4), z, 5) == [0] * 5     # 1.6 still beats 1.5
    assert draws(SamplingParams(presence_penalty=0.6), z, 5) == [0, 1, 0, 0, 0]   # both paid: 1.4 > 0.9


def test_penalties_shift_the_sampled_distribution():
    """A token already drawn twice is drawn with exactly its penalised softmax probability."""
    z = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, seed=3, presence_penalty=1.0, frequency_penalty=0.5))
    n, got = 20000, []
    for _ in range(n):
        s.counts = {0: 2}   # the same step each time: token 0 generated twice so far
        got.append(s(z))
    seen = np.bincount(got, minlength=4) / n
    want = softmax(penalize(z, {0: 2}, 1.0, 0.5))   # token 0: e^-2 / (e^-2 + 3), about 0.043
    assert np.all(np.abs(seen - want) < 0.01), (seen, want)
    assert seen[0] < 0.1 < 0.25 < seen[1:].min()
