"""Shared fixtures: the default model, tiny random HF checkpoints, and real node processes.

Everything runs on 127.0.0.1 with ephemeral ports, and every process a fixture starts is killed
at teardown, even when the test fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

os.environ["SKYNET_NO_PROGRESS"] = "1"   # inherited by every process the tests spawn
os.environ["SKYNET_NO_CACHE"] = "1"      # nodes keep no slices on disk unless a test gives --cache-dir
threadpool_limits(1)   # few, shared cores: BLAS threads in this process only spin against each other

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
TINY_NEURONS = 1000  # divisible by neither 3 nor 7: uneven node ranges


def expf_reference(x: np.ndarray) -> np.ndarray:
    """sk_expf (_qkernels.h), step by step in numpy float32: each operation rounds once, as IEEE
    float32 arithmetic in C does, so C must match it bit for bit."""
    f = np.float32
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        c = np.clip(x, f(-87.0), f(88.0))
        c = np.where(np.isnan(x), x, c)
        n = (c * f(1.44269504088896341) + f(12582912.0)) - f(12582912.0)
        r = c - n * f(0.693359375)
        r = r - n * f(-2.12194440e-4)
        p = np.full_like(r, f(1.9875691500e-4))
        for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = p * r + f(k)
        p = p * (r * r) + r + f(1.0)
        e = np.nan_to_num(n, nan=0).astype(np.int32)
        scale = ((e + 127) * (1 << 23)).astype(np.int32).view(np.float32)
        return np.where(x > f(88.72283935546875), f(np.inf), p * scale)


def child_env(**extra) -> dict:
    return {**os.environ, "SKYNET_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **extra}


def stop_procs(procs) -> None:
    """Kill processes we started (by handle) and reap them."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ---------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct GGUF) as a float32 HF directory (cached)."""
    from skynet import loader
    return loader.resolve(None)


def load_model(model_dir):
    from skynet import loader
    from skynet.arch import arch_from_config
    from skynet.model import Model
    return Model(arch_from_config(loader.read_config(model_dir)), loader.read_weights(model_dir))


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """Our numpy Model of the default checkpoint (loaded once per session)."""
    return load_model(default_model_dir)


@pytest.fixture(scope="session")
def default_fast_model():
    """The default GGUF in the fast precision (blocks in place), as `skynet server` runs it."""
    from skynet import loader
    from skynet.arch import arch_from_config
    from skynet.model import Model
    src = loader.open_model(None)
    return Model(arch_from_config(src.config), src.tensors("fast"))


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model_dir):
    """Factory: tiny_model("llama" | "qwen2" | "mistral", layers=3, **config overrides) -> checkpoint dir.

    Random weights (seeded) at a larger scale than HF's default init so that every part of the
    network (norm weights, biases, a single MLP neuron) moves the logits far above the parity
    tolerance; the default model's tokenizer is copied in so a server can serve it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from skynet import loader

    torch.set_num_threads(1)
    vocab = loader.read_config(default_model_dir)["vocab_size"]   # the copied tokenizer's (49152)
    built: dict = {}

    def make(family: str = "llama", layers: int = 3, seed: int = 0, **overrides) -> Path:
        key = (family, layers, seed, repr(sorted(overrides.items())))
        if key in built:
            return built[key]
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
        kw = dict(hidden_size=64, intermediate_size=TINY_NEURONS, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
        if family == "mistral":   # a window below max_position_embeddings: it bounds the context
            kw["sliding_window"] = 64
        kw.update(overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:              # ones by default: make the norm weights matter
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif name.endswith(".bias"):    # zeros by default (Qwen2 q/k/v)
                    p.copy_(0.5 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(f"tiny-{family}-{layers}l")
        model.save_pretrained(d, safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (default_model_dir / f).is_file():
                shutil.copy(default_model_dir / f, d / f)
        built[key] = d
        return d

    return make


# ---------------------------------------------------------------------------- HF oracle
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    return m


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    """HF full-sequence forward: logits (T, V) at every position of `ids`."""
    import torch
    with torch.no_grad():
        return hf(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


# ---------------------------------------------------------------------------- engine helpers
def run_greedy(engine, prompt: list[int], steps: int):
    """Run one greedy sequence through `engine`; returns (tokens, logits (steps, V)) as sampled."""
    from skynet.engine import Sequence
    seq = engine.submit(Sequence(list(prompt), steps))
    seen, inner = [], seq.sampler

    def record(logits):
        seen.append(np.array(logits, np.float32, copy=True))
        return inner(logits)

    seq.sampler = record
    while not seq.done:
        engine.step()
    engine.step()   # reaps it
    return seq.out, np.stack(seen)


# ---------------------------------------------------------------------------- in-process server + node processes
@dataclass
class NodeCluster:
    cluster: object
    mlp: object
    engine: object
    procs: list
    log_dir: Path
    names: list = field(default_factory=list)
    epoch0: int = 0    # the plan's epoch when the cluster was handed to the test

    def ranges(self) -> dict[str, tuple[int, int]]:
        c = self.cluster
        return {c.nodes[i].name: r for i, r in c.plan.ranges.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{log_tail(self.log_dir / f'{n}.log')}" for n in self.names)


def spawn_node(server_port: int, name: str, log_dir: Path, weight: float | None = None,
               extra: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "skynet.cli", "node", "--server", f"127.0.0.1:{server_port}",
            "--name", name, "--gflops", "1", *extra]
    if weight is not None:
        args += ["--weight", repr(float(weight))]
    log = open(log_dir / f"{name}.log", "ab")
    try:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(**(env or {})), cwd=REPO)
    finally:
        log.close()


@contextlib.contextmanager
def node_cluster(model, n: int, log_dir: Path, weights=None, local_weight: float = 0.0,
                 deadline_s: float = 10.0, timeout: float = 90.0, envs=None, extra=None, **engine_kw):
    """An in-process Cluster + ClusterMLP + Engine over `model`, with n real node processes.

    Yields once the plan gives every node a range and no epoch is pending. Node weights are fixed
    (`--weight`, 1 unless `weights` says otherwise), so latency never re-plans a test. `envs[k]` adds
    environment variables to node k (e.g. a test-only fault), `extra[k]` flags. The step deadline is
    generous, and so is the floor of the adaptive miss deadline (100 ms in a server), so that a
    loaded machine does not push a node's range back to the server: tests assert that the nodes
    did the work (no fallbacks)."""
    from skynet.cluster import Cluster
    from skynet.config import ServerConfig
    from skynet.dispatch import ClusterMLP
    from skynet.engine import Engine

    cfg = ServerConfig(node_port=0, local_weight=local_weight)
    cluster = Cluster(cfg, model.mlp_weights, "tiny")
    procs: list[subprocess.Popen] = []
    nc = None
    try:
        mlp = ClusterMLP(cluster, min_deadline_s=deadline_s, miss_floor_s=deadline_s)
        engine = Engine(model, mlp, **engine_kw)
        nc = NodeCluster(cluster, mlp, engine, procs, log_dir)
        for k in range(n):
            nc.names.append(f"n{k}")
            procs.append(spawn_node(cfg.node_port, f"n{k}", log_dir,
                                    1.0 if weights is None else weights[k],   # fixed: no re-weighting
                                    extra=() if extra is None else extra[k],
                                    env=None if envs is None else envs[k]))
        deadline = time.monotonic() + timeout
        while not (len(cluster.plan.ranges) == n and cluster.pending is None
                   and all(s.state == "active" for s in cluster.nodes.values())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} nodes did not become active: plan {cluster.plan}\n{nc.logs()}")
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"node process exited early: {dead}\n{nc.logs()}")
            cluster.poll(50)
        nc.epoch0 = cluster.epoch
        yield nc
    finally:
        try:
            cluster.close()   # while the nodes still listen: says bye to each
        finally:
            stop_procs(procs)


@pytest.fixture
def nodes(tmp_path):
    """`with nodes(model, n, ...) as nc:` — see node_cluster; logs go to the test's tmp dir."""
    def start(model, n, **kw):
        return node_cluster(model, n, tmp_path, **kw)
    return start
