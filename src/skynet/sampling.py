"""Turn one sequence's logits into its next token: penalties, temperature, top-k, top-p, seed.

Also the logprobs reported to clients. Convention (vLLM's default, "raw logprobs"): they are
`log_softmax` of the model's raw logits, the same logits the sampler starts from, before
penalties, temperature, top-k or top-p. So a token's logprob does not depend on how it was sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


def penalize(logits: np.ndarray, counts: dict[int, int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties on logits (V,), as a float64 copy: every token j generated c[j] > 0
    times so far loses  c[j] * frequency + presence."""
    out = logits.astype(np.float64)
    ids = np.fromiter(counts.keys(), np.int64, len(counts))
    n = np.fromiter(counts.values(), np.float64, len(counts))
    out[ids] -= presence + frequency * n
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob (None for a prompt's first token, which
    nothing predicts), and the `k` most likely tokens there (best first)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits (..., V) float32 -> logprobs (..., V) float32; the normaliser is summed in float64."""
    m = logits.max(axis=-1, keepdims=True)                                        # (..., 1)
    z = logits - m
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64))       # (..., 1)
    return z - lse.astype(np.float32)


def token_logprobs(logits: np.ndarray, tokens, k: int) -> list[TokenLogprob]:
    """logits (n, V) of n positions, `tokens` (n,) the token at each -> n TokenLogprobs with the
    top `k` of each row (ties broken by the lower token id)."""
    lp = log_softmax(np.asarray(logits, np.float32).reshape(-1, logits.shape[-1]))  # (n, V)
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    chosen = lp[np.arange(len(tokens)), tokens]                                    # (n,)
    out = []
    for i in range(len(tokens)):
        top = ()
        if k:
            idx = np.argpartition(-lp[i], k - 1)[:k]
            idx = idx[np.lexsort((idx, -lp[i, idx]))]
            top = tuple((int(t), float(lp[i, t])) for t in idx)
        out.append(TokenLogprob(int(tokens[i]), float(chosen[i]), top))
    return out


class Sampler:
    """Per-sequence sampling state: its parameters, its random stream and its token counts.

    `stream` picks one of several independent random streams of the same seed (the n choices
    of one request): stream 0 is the seed's own stream."""

    def __init__(self, params: SamplingParams, stream: int = 0):
        self.p = params
        self.rng = np.random.default_rng(params.seed if stream == 0 or params.seed is None
                                         else [params.seed, stream])
        self.counts: dict[int, int] = {}

    def __call__(self, logits: np.ndarray) -> int:
        """logits (V,) float32 -> token id."""
        p = self.p
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            logits = penalize(logits, self.counts, p.presence_penalty, p.frequency_penalty)
        if p.temperature == 0.0:
            tok = int(np.argmax(logits))
        else:
            tok = self._sample(np.asarray(logits, np.float64) / p.temperature)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        return tok

    def _sample(self, z: np.ndarray) -> int:
        p = self.p
        if p.top_k and p.top_k < z.shape[0]:
            idx = np.argpartition(-z, p.top_k - 1)[:p.top_k]
        else:
            idx = np.arange(z.shape[0])
        idx = idx[np.argsort(-z[idx], kind="stable")]      # candidates, most likely first
        probs = np.exp(z[idx] - z[idx[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
