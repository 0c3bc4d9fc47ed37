"""Model families as small adapters: everything the forward pass needs, read from config.json.

Llama, Mistral and Qwen2 share one decoder; they differ in a few flags (q/k/v bias, sliding
window, rope scaling). The family comes from the checkpoint's `architectures`/`model_type`,
never from a directory name.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or one of its options is not something we can run exactly."""


@dataclass(frozen=True)
class Arch:
    family: str
    hidden: int            # H
    layers: int            # L
    heads: int             # query heads
    kv_heads: int          # key/value heads (GQA)
    head_dim: int          # D
    neurons: int           # MLP intermediate size I
    vocab: int             # V
    eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max: int
    max_context: int
    qkv_bias: bool
    tie_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def qkv_dim(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def arch_from_config(cfg: dict) -> Arch:
    """Read an HF config dict; raise UnsupportedModel with the reason if we can't run it exactly."""
    names = cfg.get("architectures") or []
    family = next((FAMILIES[a] for a in names if a in FAMILIES), None)
    if family is None:
        family = _MODEL_TYPES.get(cfg.get("model_type", ""))
    if family is None:
        raise UnsupportedModel(
            f"architecture {names or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(FAMILIES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"{family}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModel(f"{family}: mlp_bias=True is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    rope = _rope(cfg)
    max_ctx = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    if window and (family == "mistral" or cfg.get("use_sliding_window")):
        max_ctx = min(max_ctx, int(window))  # within the window, full attention is exact
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return Arch(
        family=family, hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        neurons=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)), max_context=max_ctx,
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, **rope)


def _rope(cfg: dict) -> dict:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(f"rope type {kind!r} is not supported; supported: {ROPE_TYPES}")
    return dict(
        rope_theta=float(theta), rope_type=kind, rope_factor=float(params.get("factor", 1.0)),
        rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        rope_original_max=int(params.get("original_max_position_embeddings", 8192)))
