"""Incremental detokenisation: exact concatenation, stop strings, and a constant cost per token."""
from __future__ import annotations

import random

import pytest

from skynet.textstream import Detokenizer

TEXT = ("Once upon a time, in a small village by the sea, there lived an old fisherman. "
        "Il était une fois, à Noël: « déjà vu » — 東京で寿司を食べました。 🐟🌊🎣 👩‍👩‍👧 Ünïcödé! ")


class Counting:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def stream(tok, ids, stop=()):
    """-> (concatenated deltas + flush, whether a stop string was hit)"""
    d, out, hit = Detokenizer(tok, list(stop)), [], False
    for t in ids:
        delta, hit = d.add(t)
        out.append(delta)
        if hit:
            break
    out.append(d.flush())
    return "".join(out), hit


def long_ids(tok, n: int) -> list[int]:
    ids = []
    while len(ids) < n:
        ids += tok(TEXT, add_special_tokens=False)["input_ids"]
    return ids[:n]


def test_concatenation_is_the_full_decode(default_tokenizer):
    tok = default_tokenizer
    ids = long_ids(tok, 600)
    ids[100:100] = [tok.eos_token_id, 1, 0]   # special tokens in the middle: skipped in both
    assert stream(tok, ids) == (tok.decode(ids, skip_special_tokens=True), False)


@pytest.mark.parametrize("seed", range(5))
def test_concatenation_with_random_ids(default_tokenizer, seed):
    """Random ids include lone UTF-8 continuation bytes and split characters."""
    tok = default_tokenizer
    rnd = random.Random(seed)
    ids = [rnd.randrange(len(tok)) for _ in range(300)]
    assert stream(tok, ids) == (tok.decode(ids, skip_special_tokens=True), False)


@pytest.mark.parametrize("stop", [["village"], ["寿司"], ["🌊"], ["sea, th", "xyz"], ["no such text"]])
def test_stop_strings_cut_before_the_first_one(default_tokenizer, stop):
    tok = default_tokenizer
    ids = long_ids(tok, 200)
    full = tok.decode(ids, skip_special_tokens=True)
    hits = [i for i in (full.find(s) for s in stop) if i >= 0]
    want = full[:min(hits)] if hits else full
    assert stream(tok, ids, stop) == (want, bool(hits))


def test_cost_per_token_is_constant(default_tokenizer):
    """Token ids decoded for token 50 and for token 4,000: the same small window, not the whole
    sequence (which made a 4,000-token answer decode ~8 M ids)."""
    tok = Counting(default_tokenizer)
    ids = long_ids(default_tokenizer, 4000)
    d, cost = Detokenizer(tok, ["never appears"]), {}
    for i, t in enumerate(ids, 1):
        before = tok.decoded
        d.add(t)
        cost[i] = tok.decoded - before
    assert cost[50] <= 16 and cost[4000] <= 16, (cost[50], cost[4000])
    assert tok.decoded <= 16 * len(ids)
