"""Six nodes started together settle: the bench's figure for issue 11 item 7.

A random float32 model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 4,864 neurons; the
default model's tokenizer and vocabulary) is written once; the server answers a greedy prompt
alone, then `nodes` node processes start at the same moment. Reported: seconds until all are
active with no plan pending, how many plans (epochs) and losses that took, the bytes shipped,
and whether the answer afterwards equals the server alone's.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
              rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
PROMPT, TOKENS = "The capital of France is", 12


def random_model(out: Path, shape: dict = QWEN05, seed: int = 0) -> Path:
    """A float32 safetensors checkpoint of Qwen2 architecture with `shape`, random weights
    (seeded), the default model's tokenizer; kept in `out` and reused when already there."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from . import loader
    src = loader.resolve(None)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=loader.read_config(src)["vocab_size"], **shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    tmp.rename(out)
    return out


def settle(model_dir: Path, nodes: int = 6, timeout: float = 300, node_args: list[str] = (),
           server_args: list[str] = (), env: dict | None = None) -> dict:
    """Start the server alone, take its answer, start `nodes` nodes at once; the figures."""
    from .launch import LocalCluster
    # No slice cache: the figure is a settle from scratch, and six nodes caching a 0.5B model
    # would leave ~1.8 GB of dirty pages whose write-back stalls whatever the bench runs next.
    lc = LocalCluster(str(model_dir), 0, server_args=["--precision", "exact", *server_args],
                      node_args=list(node_args),
                      env={"SKYNET_NO_PROGRESS": "1", "SKYNET_NO_CACHE": "1", **(env or {})})
    try:
        lc.start(timeout=600)
        alone = lc.complete(PROMPT, TOKENS)["choices"][0]["text"]
        epoch0 = lc.cluster()["epoch"]
        t0 = time.perf_counter()
        for _ in range(nodes):
            lc.add_node()
        settled = None
        while time.perf_counter() - t0 < timeout:
            if len(lc.active_nodes()) == nodes and lc.cluster().get("pending_epoch") is None:
                settled = time.perf_counter() - t0
                break
            lc.wait(lambda: True, 1, "the server")   # raises if the server died
            time.sleep(0.2)
        view = lc.cluster()
        text = lc.complete(PROMPT, TOKENS)["choices"][0]["text"] if settled is not None else None
        log = (lc.log_dir / "server.log").read_text(errors="replace")
        return {"nodes": nodes, "settled_s": settled, "active": len(lc.active_nodes()),
                "plans": len(re.findall(r"epoch \d+ planned", log)),
                "epochs": view.get("epoch", 0) - epoch0,
                "losses": len(re.findall(r"node \d+ '[^']*' lost: ", log)),
                "joins": len(re.findall(r"joined: ", log)),
                "bytes_shipped": sum(n.get("bytes_sent", 0) for n in view.get("nodes", [])),
                "same_text_as_alone": text == alone, "log_dir": str(lc.log_dir)}
    finally:
        lc.stop()
