"""The server process minus HTTP: model, cluster, engine, and the engine thread that drives them.

Requests come in from any thread through `submit()` (or `submit_batch()` for several prompts
and choices), which returns `Stream`s of text deltas.
The engine thread owns the node socket: it steps the batch while there is work and otherwise
waits on the node socket and a wake-up pipe.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import zmq

from . import loader
from .arch import arch_from_config
from .cluster import Cluster
from .config import ServerConfig
from .dispatch import ClusterMLP
from .engine import Engine, RequestError, Sequence
from .metrics import Metrics
from .model import Model
from .replicas import holders
from .sampling import SamplingParams
from .textstream import Detokenizer

log = logging.getLogger("skynet.server")


class Busy(RuntimeError):
    """The request queue is full (back-pressure): try again later."""


class Unavailable(RuntimeError):
    """The engine has stopped for good; the server cannot generate any more."""


@dataclass
class Stream:
    """One choice's output as it is produced, as events on an asyncio queue (shared by the
    choices of one request): (index, text delta, finish reason or None, new TokenLogprobs)."""

    seq: Sequence
    queue: asyncio.Queue | None = None
    live: bool = True   # False: only the finish event is queued (the text is read at the end)
    text: str = ""
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    index: int = 0

    def cancel(self) -> None:
        self.seq.finish("cancelled")


class Runtime:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        t0 = time.perf_counter()
        source = loader.open_model(cfg.model)
        self.model_name, self.hf_config = source.name, source.config
        self.precision = source.precision(cfg.precision)
        self.arch = arch_from_config(self.hf_config)
        self.model = Model(self.arch, source.tensors(self.precision), cfg.threads)
        self.tokenizer = source.tokenizer()
        # no token covers more characters than its longest string: a bound checked before tokenizing
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.cluster = Cluster(cfg, self.model.mlp_weights, self.model_name)
        self.mlp = ClusterMLP(self.cluster, cfg.step_deadline_ms / 1000, cfg.spin_us / 1e6, cfg.overlap,
                              cfg.hedge == "always", miss_floor_s=cfg.miss_floor_ms / 1000)
        self.engine = Engine(self.model, self.mlp, cfg.max_batch, cfg.max_step_tokens)
        self.stop_ids = frozenset(self.arch.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self._token_texts: dict[int, str] = {}
        self.load_s = time.perf_counter() - t0
        self.started = time.time()
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.metrics = Metrics().bind(self.cluster, self.engine)
        self.mlp.on_latency = self.metrics.node_reply
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)   # a full pipe is a wake-up already pending
        self._stop = threading.Event()
        self.fatal: str | None = None   # why the engine stopped for good, if it did
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        log.info("model %s loaded in %.1fs (%s precision): %d layers, hidden %d, %d MLP neurons; "
                 "nodes connect to %s:%d", self.model_name, self.load_s, self.precision, self.arch.layers, self.arch.hidden, self.arch.neurons,
                 cfg.node_host, cfg.node_port)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Runtime":
        self.thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self.thread.join(timeout=5)
        self.cluster.close()

    def health(self) -> str | None:
        """None while the engine can serve, else why it cannot."""
        if self.fatal is None and self.thread.ident is not None and not self.thread.is_alive():
            return "the engine thread is not running"
        return self.fatal

    def _loop(self) -> None:
        """Never ends silently: a failed iteration fails the running requests and the loop goes
        on; if even that fails (or anything escapes), the engine stops for good and says so."""
        poller = zmq.Poller()
        for h in self.cluster.poll_handles():
            poller.register(h, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        why = "the engine thread ended"
        try:
            while not self._stop.is_set():
                try:
                    self._iterate(poller)
                except Exception:   # (a failed forward is handled inside the engine)
                    log.exception("engine loop failed; failing the running requests")
                    self.engine.fail_running("error")
                    time.sleep(0.05)   # a fault that repeats must not spin a core
        except Exception as e:   # even failing the running requests failed
            log.exception("the engine cannot continue")
            why = f"the engine failed and cannot continue: {e!r}"
        finally:
            if not self._stop.is_set():
                self._die(why)

    def _iterate(self, poller: zmq.Poller) -> None:
        self.metrics.sample()
        if self.engine.has_work:
            self.engine.step()
            return
        ready = dict(poller.poll(100))
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        self.cluster.poll(0)

    def _die(self, why: str) -> None:
        """The engine stops for good: /health reports it and every request gets an error."""
        self.fatal = why
        log.critical("%s; failing every request", why)
        self.engine.fail_all("error")

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams,
               stop: list[str] = (), loop: asyncio.AbstractEventLoop | None = None,
               ignore_eos: bool = False) -> Stream:
        """Queue a request; raises RequestError (bad request), Busy (queue full) or Unavailable."""
        return self.submit_batch([prompt], max_tokens, params, stop, loop, ignore_eos)[0]

    def submit_batch(self, prompts: list[list[int]], max_tokens: int, params: SamplingParams,
                     stop: list[str] = (), loop: asyncio.AbstractEventLoop | None = None,
                     ignore_eos: bool = False, n: int = 1, logprobs: int | None = None,
                     prompt_logprobs: int | None = None, live: bool = True) -> list[Stream]:
        """Queue n choices of each prompt, all or none; choice j of prompt i is stream i * n + j,
        with its own random stream (j) of the seed. `live=False` (a whole response): the queue
        gets each choice's finish only, so the event loop is not woken for every token.
        Raises RequestError, Busy or Unavailable."""
        if self.fatal:
            raise Unavailable(self.fatal)
        for prompt in prompts:
            self.engine.check(prompt, max_tokens)
        want = len(prompts) * n
        if want > self.cfg.max_queue:
            raise RequestError(f"{len(prompts)} prompt(s) x n={n} is more than the server queues "
                               f"({self.cfg.max_queue}, --max-queue)")
        if len(self.engine.waiting) + want > self.cfg.max_queue:
            raise Busy(f"{len(self.engine.waiting)} requests already queued")
        queue = asyncio.Queue() if loop else None
        streams = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                seq = Sequence(list(prompt), max_tokens, params,
                               frozenset() if ignore_eos else self.stop_ids, stream=j,
                               logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                streams.append(self._track(Stream(seq, queue, live, index=i * n + j), stop, loop))
        for st in streams:
            self.engine.submit(st.seq)
        if self.fatal:   # it died while these were being queued: nobody else will finish them
            self.engine.fail_all("error")
        self._wake()
        return streams

    def _track(self, stream: Stream, stop: list[str], loop) -> Stream:
        """Hook a stream's sequence up to its detokenizer, the metrics and its event queue."""
        seq, idx = stream.seq, stream.index
        detok = Detokenizer(self.tokenizer, list(stop))

        def push(event):
            if stream.queue is not None:
                loop.call_soon_threadsafe(stream.queue.put_nowait, event)

        def on_token(s: Sequence, tok: int) -> None:
            self.metrics.token(s)
            delta, hit_stop = detok.add(tok)
            stream.text += delta
            if hit_stop:
                s.finish("stop")
            if stream.live and (delta or s.logprobs is not None):
                push((idx, delta, None, s.out_logprobs[-1:]))

        def on_finish(s: Sequence) -> None:
            tail = detok.flush()   # text held back for a possible stop string
            stream.text += tail
            stream.finish_reason = s.finish_reason
            self.stats["generated_tokens"] += len(s.out)
            self.metrics.finish(s)
            stream.done.set()
            push((idx, tail, s.finish_reason, []))

        seq.on_token, seq.on_finish = on_token, on_finish
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(seq.prompt)
        self.metrics.request(len(seq.prompt))
        return stream

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:   # the engine has not drained earlier wake-ups: it will wake
            pass

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Text or token ids -> token ids (slow for long text: call it off the event loop)."""
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and 0 <= t < self.arch.vocab for t in prompt):
                raise RequestError(f"prompt token ids must be integers in [0, {self.arch.vocab})")
            return prompt
        self._check_chars(len(prompt))
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    def token_text(self, token: int) -> str:
        """One token on its own, special tokens included (the `tokens` of logprobs)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat messages -> token ids (slow for long text: call it off the event loop)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; use /v1/completions")
        self._check_chars(sum(len(str(m.get("content") or "")) for m in messages))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_chars(self, chars: int) -> None:
        """Refuse, before tokenizing it, text that cannot fit: every token covers at most
        max_token_chars characters, so it has at least chars / max_token_chars tokens."""
        ctx = self.arch.max_context
        if chars > ctx * self.max_token_chars:
            raise RequestError(f"prompt of {chars} characters exceeds the model's context of {ctx} "
                               f"tokens (no token is longer than {self.max_token_chars} characters)")

    # ------------------------------------------------------------------ views
    def _local_ranges(self) -> list[list[int]]:
        """What the server computes now: its planned ranges plus those of planned nodes that are
        not serving at the moment (lost, or still building a new epoch's slices)."""
        c = self.cluster
        out = [*c.plan.local]
        for rng, who in holders(c.plan).items():
            if not any(n is not None and not n.loading_rows for n in map(c.serving, who)):
                out.append(rng)
        return [list(r) for r in sorted(out)]

    def _range_view(self) -> list[dict]:
        """Each node range of the plan and its holders (primary first), by name."""
        c = self.cluster
        name = lambda i: c.nodes[i].name if i in c.nodes else f"node {i} (gone)"  # noqa: E731
        return [{"neurons": list(rng), "primary": name(who[0]), "holders": [name(i) for i in who]}
                for rng, who in sorted(holders(c.plan).items())]

    def cluster_view(self) -> dict:
        c = self.cluster
        now = time.monotonic()
        nodes = []
        for n in sorted(c.nodes.values(), key=lambda n: n.id):
            rng = c.plan.ranges.get(n.id)
            nodes.append({
                "id": n.id, "name": n.name, "state": n.state,
                "neurons": [list(rng)] if rng else [], "holds": [list(c.plan.held(n.id))] if rng else [],
                "weight": round(n.weight, 3),
                "cores": n.cores, "mem_bytes": n.mem_bytes, "gflops": round(n.gflops, 2),
                "latency_ms": None if n.latency_ema is None else round(n.latency_ema * 1000, 3),
                "last_heartbeat_s": round(now - n.last_seen, 3), "bytes_sent": n.bytes_sent,
                "direct_link": n.link is not None})
        return {"model": self.model_name, "precision": self.precision, "layers": self.arch.layers, "hidden": self.arch.hidden,
                "neurons": self.arch.neurons, "epoch": c.epoch,
                "uptime_s": round(time.time() - self.started, 1),
                "pending_epoch": c.pending.epoch if c.pending else None, "nodes": nodes,
                "replicas": c.cfg.replicas, "ranges": self._range_view(),
                "local_neurons": self._local_ranges(), "rebalances": list(c.history),
                "active_requests": len(self.engine.running), "queued_requests": len(self.engine.waiting),
                "dropped_messages": c.dropped, "mlp": dict(self.mlp.stats),
                "engine": dict(self.engine.stats), **self.stats}

