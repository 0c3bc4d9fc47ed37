"""The engine: a batch of sequences stepped together, one packed forward per step.

Each step takes every running sequence's next rows: one token for a sequence that is decoding,
a chunk of its prompt for one that is prefilling (within a per-step token budget). Sequences
join at step boundaries and leave when they finish or are cancelled; each owns its KV cache,
freed with it. The engine knows nothing of HTTP; callers get tokens through `on_token`.

Logprobs, when a sequence asks: each sampled token's from the row it was sampled from
(`Sequence.logprobs`), and each prompt token's from the row before it (`prompt_logprobs`, for
echo and scoring). Only asking sequences make the head compute more than their last row.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import overlap
from .model import Model, Segment
from .sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs

_ids = itertools.count(1)
log = logging.getLogger("skynet.engine")


class RequestError(ValueError):
    """A request that cannot run (too long for the context, empty prompt...)."""


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    on_token: Callable[["Sequence", int], None] | None = None   # called in the engine thread
    on_finish: Callable[["Sequence"], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop", "length", "cancelled", "error: ..."
    cached: int = 0                    # tokens already in the KV cache
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    cache: object = None
    sampler: Sampler | None = None
    stream: int = 0                    # which random stream of the seed (one per choice of a request)
    logprobs: int | None = None        # None: none; k: each sampled token's logprob and top k
    prompt_logprobs: int | None = None # None: none; k: the same for prompt tokens 1.. (token 0 has none)
    out_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_lps: list[TokenLogprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def tokens(self) -> list[int]:
        return self.prompt + self.out

    def finish(self, reason: str) -> None:
        """Mark finished (thread-safe: the engine drops it at the next step boundary)."""
        if self.finish_reason is None:
            self.finish_reason = reason


class Engine:
    def __init__(self, model: Model, mlp, max_batch: int = 16, max_step_tokens: int = 512):
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError("max_batch and max_step_tokens must be >= 1")
        self.model, self.mlp = model, mlp
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Lock()
        # packed_steps: steps that carried rows of two or more sequences; max_seqs: the most in one
        self.stats = {"steps": 0, "rows": 0, "packed_steps": 0, "max_seqs": 0,
                      "forward_s": 0.0, "head_s": 0.0, "sample_s": 0.0}

    # ------------------------------------------------------------------ admission
    def check(self, prompt: list[int], max_tokens: int) -> None:
        ctx = self.model.arch.max_context
        if not prompt:
            raise RequestError("the prompt is empty")
        if max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {max_tokens}")
        if len(prompt) + max_tokens > ctx:
            raise RequestError(f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                               f"exceeds the model's context of {ctx} tokens")

    def submit(self, seq: Sequence) -> Sequence:
        self.check(seq.prompt, seq.max_tokens)
        seq.sampler = Sampler(seq.params, seq.stream)
        with self.lock:
            self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ stepping
    def step(self) -> int:
        """Run one forward over all running sequences; returns the number of rows computed."""
        self._admit()
        batch = self._schedule()
        if not batch:
            return 0
        tokens, segments, sampled, rows, scored = [], [], [], [], []
        for seq, n in batch:
            toks = seq.tokens()
            segments.append(Segment(seq.cache, len(tokens), n, seq.cached))
            sampled.append(seq.cached + n == len(toks))  # this chunk ends with the newest token
            m = self._prompt_rows(seq, n)
            scored.append((len(rows), m))
            rows.extend(range(len(tokens), len(tokens) + m))
            if m < n:
                rows.append(len(tokens) + n - 1)
            tokens.extend(toks[seq.cached:seq.cached + n])
        t0 = time.perf_counter()
        every = len(rows) > len(batch)   # somebody wants prompt logprobs: more than the last rows
        try:
            begin = getattr(self.mlp, "begin_step", None)
            if begin:
                begin()
            ids, asked = np.asarray(tokens, np.int64), rows if every else None
            if getattr(self.mlp, "overlaps", False) and overlap.split(segments) is not None:   # nodes to overlap with
                logits = overlap.forward(self.model, ids, segments, self.mlp, rows=asked)  # (len(rows), V)
            else:
                logits = self.model.forward(ids, segments, self.mlp, rows=asked)          # (len(rows), V)
        except Exception:   # their KV caches are half written: this step's requests fail, no others
            log.exception("step failed; failing its %d request(s)", len(batch))
            for seq, _ in batch:
                seq.finish("error")
            self._reap()
            return 0
        t1 = time.perf_counter()
        for i, (seq, n) in enumerate(batch):
            first, m = scored[i]
            if m:
                nxt = seq.prompt[seq.cached + 1:seq.cached + 1 + m]
                seq.prompt_lps.extend(token_logprobs(logits[first:first + m], nxt, seq.prompt_logprobs))
            seq.cached += n
            if sampled[i] and not seq.done:   # the chunk's last row follows its scored rows
                if len(seq.out) >= seq.max_tokens:   # max_tokens 0: the prompt is scored, no token
                    seq.finish("length")
                else:
                    self._sample(seq, logits[first + m])
        st = self.stats
        st["steps"] += 1
        st["rows"] += len(tokens)
        st["packed_steps"] += len(batch) > 1
        st["max_seqs"] = max(st["max_seqs"], len(batch))
        st["forward_s"] += t1 - t0
        st["head_s"] += self.model.last_head_s
        st["sample_s"] += time.perf_counter() - t1
        self._reap()
        return len(tokens)

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < self.max_batch:
                seq = self.waiting.popleft()
                if seq.done:   # cancelled while waiting
                    self._finished(seq)
                    continue
                seq.cache = self.model.new_cache(len(seq.prompt) + seq.max_tokens)
                self.running.append(seq)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Decoding sequences first (1 row each), then prompt chunks within the token budget."""
        self._reap()
        budget, batch = self.max_step_tokens, []
        for seq in self.running:
            if len(seq.tokens()) - seq.cached == 1:
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            left = len(seq.tokens()) - seq.cached
            if left > 1 and budget > 0:
                n = min(left, budget)
                batch.append((seq, n))
                budget -= n
        return batch

    @staticmethod
    def _prompt_rows(seq: Sequence, n: int) -> int:
        """How many of this chunk's n rows score a prompt token (row j predicts token j + 1)."""
        if seq.prompt_logprobs is None:
            return 0
        return max(0, min(seq.cached + n, len(seq.prompt) - 1) - seq.cached)

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        """Sample and emit one token; whatever goes wrong here fails this request only."""
        try:
            self._emit(seq, seq.sampler(logits), logits)
        except Exception:
            log.exception("request %d failed while sampling or emitting a token", seq.id)
            seq.finish("error")

    def _emit(self, seq: Sequence, tok: int, logits: np.ndarray) -> None:
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        if seq.logprobs is not None:
            seq.out_logprobs.extend(token_logprobs(logits[None], [tok], seq.logprobs))
        seq.out.append(tok)
        if seq.on_token:
            seq.on_token(seq, tok)
        if tok in seq.stop_ids:
            seq.finish("stop")
        elif len(seq.out) >= seq.max_tokens:
            seq.finish("length")

    def _reap(self) -> None:
        keep = []
        for seq in self.running:
            if seq.done:
                self._finished(seq)
            else:
                keep.append(seq)
        self.running = keep

    def _finished(self, seq: Sequence) -> None:
        seq.cache = None  # frees the KV cache
        if seq.on_finish:
            try:
                seq.on_finish(seq)
            except Exception:   # the request is over either way; the others must not notice
                log.exception("request %d: finish callback failed", seq.id)

    def fail_running(self, reason: str = "error") -> None:
        """Finish every running request with `reason` now (waiting ones keep their place)."""
        for seq in self.running:
            seq.finish(reason)
        self._reap()

    def fail_all(self, reason: str = "error") -> None:
        """Finish every running and waiting request with `reason` now: the engine stops."""
        with self.lock:
            seqs, self.running, self.waiting = [*self.running, *self.waiting], [], deque()
        for seq in seqs:
            seq.finish(reason)
            self._finished(seq)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_ids=frozenset()) -> Sequence:
        """Run one sequence to completion in the calling thread (tests, bench, CLI)."""
        seq = self.submit(Sequence(list(prompt), max_tokens, params, frozenset(stop_ids)))
        while not seq.done:
            self.step()
        self._reap()
        return seq
