"""A GGUF checkpoint as SkyNet needs it: HF config, HF tensor names, blocks in place, tokenizer.

Tensors keep their GGML blocks (`QMatrix` views of the mapped file) or become float32 arrays,
as the precision asks:

    fast:  kernel types (Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K) stay as they are; other 2-D types are
           dequantised and re-quantized to Q8_0 (one log line); 1-D tensors become float32
    exact: every tensor becomes float32, dequantised bit-identically to gguf-py

llama.cpp's converter permutes the rows of attn_q / attn_k of `llama` files (its RoPE pairs
adjacent values, HF's pairs halves); we undo that permutation on the rows, as transformers does.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import quant
from .arch import UnsupportedModel
from .gguf_file import FLOAT_TYPES, GGUFFile
from .quant import QMatrix

log = logging.getLogger("skynet.loader")

_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")   # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Index i such that hf_rows = gguf_rows[i], for llama.cpp's q/k row permutation."""
    d = rows // heads                                            # head_dim
    idx = np.arange(rows).reshape(heads, d // 2, 2)              # gguf row of (head, j, t)
    return idx.transpose(0, 2, 1).reshape(rows)                  # hf row (head, t, j)


class GGUFModel:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.config = self._config()

    def _config(self) -> dict:
        """The HF config of a llama / mistral / qwen2 file, from llama.cpp's metadata keys."""
        m, arch = self.file.meta, self.file.arch()
        if arch not in _ARCHS:
            raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHS)}")
        get = lambda key, default=None: m.get(f"{arch}.{key}", default)   # noqa: E731
        heads = int(get("attention.head_count"))
        emb = self.file.tensors["token_embd.weight"].shape
        cfg = {"model_type": _ARCHS[arch], "hidden_size": int(get("embedding_length")),
               "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
               "num_key_value_heads": int(get("attention.head_count_kv", heads)),
               "intermediate_size": int(get("feed_forward_length")),
               "max_position_embeddings": int(get("context_length", 2048)),
               "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
               "rope_theta": float(get("rope.freq_base", 10000.0)),
               "vocab_size": int(get("vocab_size", emb[0])), "hidden_act": "silu",
               "tie_word_embeddings": "output.weight" not in self.file.tensors,
               "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
               "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
               "_skynet_source": self.path.name}
        if get("rope.dimension_count") is not None:
            cfg["head_dim"] = int(get("rope.dimension_count"))
        if get("attention.key_length") is not None:
            cfg["head_dim"] = int(get("attention.key_length"))
        if get("rope.scaling.type") in ("linear",):
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
        if arch == "qwen2" or "blk.0.attn_q.bias" in self.file.tensors:
            cfg["attention_bias"] = True
        if get("attention.sliding_window"):
            cfg["sliding_window"] = int(get("attention.sliding_window"))
        return cfg

    def quantized(self) -> bool:
        return any(t.qtype in quant.BLOCKS for t in self.file.tensors.values())

    def tensors(self, precision: str) -> dict[str, np.ndarray | QMatrix]:
        arch, cfg = self.file.arch(), self.config
        out: dict[str, np.ndarray | QMatrix] = {}
        requantized = []
        for name, info in self.file.tensors.items():
            hf = hf_name(name)
            if hf is None:
                continue
            data = self.file.tensor(name)
            perm = None
            if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg["num_attention_heads"] if "q_proj" in hf else cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
                perm = unpermute_rows(info.shape[0], heads)
            if precision == "fast" and len(info.shape) == 2 and info.qtype in quant.BLOCKS:
                out[hf] = QMatrix(info.qtype, data if perm is None else data[perm], info.shape[1])
                continue
            w = _to_float32(info.qtype, data, info.shape)
            if perm is not None:
                w = w[perm]
            if precision == "fast" and w.ndim == 2:
                requantized.append(name)
                w = QMatrix(quant.QType.Q8_0, quant.quantize_q8_0(np.ascontiguousarray(w)), w.shape[1])
            out[hf] = w
        if requantized:
            log.info("%d matrices in types without a fast kernel were re-quantized to Q8_0 (%s, ...)",
                     len(requantized), requantized[0])
        return out

    def tokenizer(self):
        """An HF fast tokenizer built from the file's vocabulary (no tokenizer.json needed)."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        meta = self.file.meta
        groups = {g: {new: meta[f"tokenizer.{k}"] for k, new in m.items() if f"tokenizer.{k}" in meta}
                  for g, m in GGUF_TOKENIZER_MAPPING.items()}
        tdict, tcfg = groups["tokenizer"], groups["tokenizer_config"]
        if tdict.get("tokenizer_type") == "llama":
            tcfg.setdefault("add_bos_token", True)
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            tid = meta.get(f"tokenizer.ggml.{key}")
            tcfg[name] = tdict["tokens"][tid] if tid is not None else None
        backend, extra = convert_gguf_tokenizer(self.file.arch(), tdict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tcfg, **extra)


def _to_float32(qtype: int, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if qtype == quant.QType.F32:
        return np.array(data, np.float32)                     # a private, writable copy
    if qtype in FLOAT_TYPES:
        return data.astype(np.float32)
    if qtype in quant.BLOCKS:
        return quant.dequantize(qtype, data).reshape(shape)
    from gguf.quants import dequantize                         # every other ggml type
    log.info("no kernel for ggml type %d: dequantising it at load", qtype)
    return np.asarray(dequantize(data, qtype), np.float32).reshape(shape)
