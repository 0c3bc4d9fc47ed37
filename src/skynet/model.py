"""Our lean decoder forward pass (numpy) over a packed batch of sequences, in either precision.

One step carries the new tokens of several sequences packed into N rows. Each layer:

    h   = rmsnorm(x) @ Wqkv          # (N, (nh + 2 kvh) D), RoPE on q and k
    att = per-sequence attention over its own KV cache (causal within the new rows)
    x  += att @ Wo                   # (N, H)
    x  += mlp(layer, rmsnorm(x))     # (N, H): the MLP object decides where neurons run

The MLP is an object passed in (local, remote, or a mix): the model does not know which.
Linear layers are `Dense` (exact: float32) or `QLinear` (fast: GGML blocks, 8-bit activations),
chosen by the tensors given (layers.py); norms, RoPE, attention and softmax are float32 in both:
numpy in exact, C in fast (_attn.c: one call per layer for every row, each row by its position).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _qkernels, quant
from .arch import Arch
from .layers import linear
from .mlp import MLPWeights
from .quant import QMatrix

HEAD_ROWWISE = 4   # see Model.head
ATTN_BLOCK = 64    # query rows per block of a prefill's causal attention (Model._attend)
KEY_RUN = 16       # a transposed key cache's capacity is a multiple of this (_attn.c scores)
MLPFn = Callable[[int, np.ndarray], np.ndarray]  # (layer, x (N, H)) -> (N, H)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.einsum("nh,nh->n", x, x)[:, None] * (1.0 / x.shape[-1])  # (N, 1)
    return (x * (1.0 / np.sqrt(var + eps))) * w


def rope_inv_freq(a: Arch) -> np.ndarray:
    inv = 1.0 / (a.rope_theta ** (np.arange(0, a.head_dim, 2, dtype=np.int64).astype(np.float32) / a.head_dim))
    if a.rope_type == "linear":
        inv = inv / a.rope_factor
    elif a.rope_type == "llama3":
        low_wl = a.rope_original_max / a.rope_low_freq_factor
        high_wl = a.rope_original_max / a.rope_high_freq_factor
        wl = 2 * np.pi / inv
        smooth = (a.rope_original_max / wl - a.rope_low_freq_factor) / (a.rope_high_freq_factor - a.rope_low_freq_factor)
        scaled = np.where(wl > low_wl, inv / a.rope_factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        inv = np.where(mid, (1 - smooth) * scaled / a.rope_factor + smooth * scaled, scaled)
    return inv.astype(np.float32)  # (D/2,)


class KVCache:
    """One sequence's keys and values, preallocated for its whole length: values (L, kvh, cap, D);
    keys the same, or transposed (L, kvh, D, cap) with `keys_t` (fast: a row's scores in C then
    run along contiguous keys; exact keeps the layout its reference figures were taken with)."""

    def __init__(self, a: Arch, capacity: int, keys_t: bool = False):
        if keys_t:   # whole 16-key runs: C scores the last, partial one without a scalar tail
            capacity = -(-capacity // KEY_RUN) * KEY_RUN
        shape = (a.layers, a.kv_heads, a.head_dim, capacity) if keys_t else (a.layers, a.kv_heads, capacity, a.head_dim)
        self.k = np.empty(shape, np.float32)
        self.v = np.empty((a.layers, a.kv_heads, capacity, a.head_dim), np.float32)
        self.capacity, self.keys_t = capacity, keys_t

    @property
    def addr(self) -> tuple[int, int]:
        """The addresses of k and v as they are now (the C attention writes through them)."""
        return self.k.__array_interface__["data"][0], self.v.__array_interface__["data"][0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes * 2

    def put(self, li: int, p: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v (n, kvh, D) of positions [p, p + n) in layer li."""
        n = k.shape[0]
        if self.keys_t:
            self.k[li, :, :, p:p + n] = k.transpose(1, 2, 0)
        else:
            self.k[li, :, p:p + n] = k.transpose(1, 0, 2)
        self.v[li, :, p:p + n] = v.transpose(1, 0, 2)

    def keys_t_view(self, li: int, t: int) -> np.ndarray:
        """Layer li's keys of positions [0, t), transposed: (kvh, D, t)."""
        return self.k[li, :, :, :t] if self.keys_t else self.k[li, :, :t].transpose(0, 2, 1)


@dataclass
class Segment:
    """Rows [row, row + n) of the packed batch belong to a sequence whose cache holds `pos` tokens."""

    cache: KVCache
    row: int
    n: int
    pos: int


@dataclass
class StepRows:
    """How one step's rows are attended: `compiled` (R, 5) int64 lists the rows that C attends
    ([row, position, k cache address, v cache address, capacity]; fast; None when there are none),
    `wide` the segments numpy attends, with RoPE tables cos, sin (N, 1, D/2) at each packed row's
    position (None when no segment is attended in numpy)."""

    cos: np.ndarray | None
    sin: np.ndarray | None
    compiled: np.ndarray | None
    wide: list[Segment]
    caches: list[KVCache]   # the caches `compiled` points into, referenced while it is in use


@dataclass
class Layer:
    ln1: np.ndarray      # (H,)
    ln2: np.ndarray      # (H,)
    qkv: object          # (N, H) -> (N, (nh + 2 kvh) D)
    bqkv: np.ndarray | None
    o: object            # (N, nh D) -> (N, H)


class Model:
    """Weights for everything but the MLP neurons' placement, and the forward pass."""

    def __init__(self, arch: Arch, tensors: dict[str, np.ndarray], threads: int = 1):
        """`threads`: threads of the fast kernels (rows split; results do not depend on it)."""
        a, self.arch, self.threads = arch, arch, threads
        p = "model."
        self.embed = tensors[p + "embed_tokens.weight"]                          # (V, H)
        head = tensors.get("lm_head.weight", self.embed if a.tie_embeddings else None)
        if head is None:
            raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
        self.quantized = isinstance(tensors[f"{p}layers.0.mlp.gate_proj.weight"], QMatrix)
        self.lm_head = head                                                        # (V, H)
        self.lm_head_t = None if isinstance(head, QMatrix) else np.ascontiguousarray(head.T)  # (H, V)
        self.norm = self._norm_weight(tensors[p + "norm.weight"])
        self.layers: list[Layer] = []
        gate, up, down_t = [], [], []
        for i in range(a.layers):
            q = f"{p}layers.{i}."
            att = q + "self_attn."
            b = (np.concatenate([tensors[att + n + "_proj.bias"] for n in "qkv"])
                 if a.qkv_bias else None)
            self.layers.append(Layer(
                self._norm_weight(tensors[q + "input_layernorm.weight"]),
                self._norm_weight(tensors[q + "post_attention_layernorm.weight"]),
                linear(*[tensors[att + n + "_proj.weight"] for n in "qkv"], threads=threads), b,
                linear(tensors[att + "o_proj.weight"], threads=threads)))
            gate.append(tensors[q + "mlp.gate_proj.weight"])                           # (I, H)
            up.append(tensors[q + "mlp.up_proj.weight"])                               # (I, H)
            down = tensors[q + "mlp.down_proj.weight"]                                 # (H, I)
            down_t.append(down if self.quantized else np.ascontiguousarray(down.T))   # blocks | (I, H)
        self.mlp_weights = MLPWeights(gate, up, down_t, threads)
        inv = rope_inv_freq(a)
        freqs = np.arange(a.max_context, dtype=np.float32)[:, None] * inv[None, :]     # (C, D/2)
        self.cos, self.sin = np.cos(freqs), np.sin(freqs)
        self.scale = 1.0 / float(np.sqrt(a.head_dim))
        self.last_head_s = 0.0
        self.compiled_attention = self.quantized   # fast: rows attended in C (rope_tables)

    @staticmethod
    def _norm_weight(w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w, dtype=np.float32)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm of each row times w: numpy in exact (the reference's order of operations), one
        C call in fast (_attn.c; a row's bits depend on that row alone either way)."""
        if not self.quantized:
            return rmsnorm(x, w, self.arch.eps)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        _qkernels.rmsnorm(x, w, out, x.shape[0], x.shape[1], self.arch.eps)
        return out

    def head(self, x: np.ndarray) -> np.ndarray:
        """x (S, H) -> logits (S, V). The head streams ~V*H*4 bytes from memory; measured on the
        2-core EPYC (1 BLAS thread): one row 4.5 ms as x @ W^T (contiguous), but 2 rows 26 ms
        in one call. So up to HEAD_ROWWISE rows go one by one, more rows as W @ x^T (24 ms at 8)."""
        if self.lm_head_t is None:
            return self.lm_head(x, threads=self.threads)
        if x.shape[0] <= HEAD_ROWWISE:
            return np.concatenate([x[i:i + 1] @ self.lm_head_t for i in range(x.shape[0])])
        return (self.lm_head @ x.T).T

    def embed_rows(self, tokens: np.ndarray) -> np.ndarray:
        if isinstance(self.embed, QMatrix):
            return quant.dequantize(self.embed.qtype, self.embed.data[tokens])    # (N, H)
        return self.embed[tokens]

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.arch, capacity, keys_t=self.quantized)

    def forward(self, tokens: np.ndarray, segments: list[Segment], mlp: MLPFn,
                last_only: bool = True, rows: list[int] | None = None) -> np.ndarray:
        """tokens (N,) packed over segments -> logits (S, V) of each segment's last row
        (or (N, V) for every row with last_only=False, or (len(rows), V) for the packed rows
        asked). Appends to each segment's cache."""
        rope = self.rope_tables(segments)
        x = self.embed_rows(tokens)                                                # (N, H)
        for li in range(len(self.layers)):
            x = self.attention(li, x, segments, rope)                              # (N, H)
            x = x + mlp(li, self.rmsnorm(x, self.layers[li].ln2))                  # (N, H)
        return self.logits(x, segments, last_only, rows)

    def rope_tables(self, segments: list[Segment]) -> StepRows:
        """How this step's rows are attended (StepRows). In fast every row is attended in C, by its
        position alone, so a row's result depends neither on the other rows in the step nor on
        where its prompt was cut into chunks; in exact every row in numpy."""
        top = max((s.pos + s.n for s in segments), default=0)
        if top > len(self.cos):
            raise ValueError(f"position {top - 1} is beyond the model's context ({len(self.cos)})")
        comp = [s for s in segments if s.cache.keys_t] if self.compiled_attention else []
        wide = [s for s in segments if not s.cache.keys_t] if comp else segments
        rows = None
        if comp:
            rows = np.empty((sum(s.n for s in comp), 5), np.int64)
            i = 0
            for s in comp:
                rows[i:i + s.n, 0] = np.arange(s.row, s.row + s.n)
                rows[i:i + s.n, 1] = np.arange(s.pos, s.pos + s.n)
                rows[i:i + s.n, 2:] = (*s.cache.addr, s.cache.capacity)
                i += s.n
        cos = sin = None
        if wide:
            pos = np.concatenate([np.arange(s.pos, s.pos + s.n) for s in segments])   # (N,)
            cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        return StepRows(cos, sin, rows, wide, [s.cache for s in comp])

    def attention(self, li: int, x: np.ndarray, segments: list[Segment], rope: StepRows) -> np.ndarray:
        """x (N, H) -> x + attention block of layer li (N, H); appends k, v to each cache.
        `rope`: rope_tables(segments)."""
        a, layer = self.arch, self.layers[li]
        nq, nkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        h = layer.qkv(self.rmsnorm(x, layer.ln1))                                 # (N, qkv)
        if layer.bqkv is not None:
            h += layer.bqkv
        att = np.empty((x.shape[0], nq), np.float32)                              # (N, nh D)
        if rope.compiled is not None:
            _qkernels.attn_rows(h, att, rope.compiled, self.cos, self.sin, li, a.layers, a.heads,
                                a.kv_heads, a.head_dim, self.scale, self.threads)
        if rope.wide:
            qk = _rope(h[:, :nq + nkv].reshape(-1, a.heads + a.kv_heads, a.head_dim), rope.cos, rope.sin)
            q, k = qk[:, :a.heads], qk[:, a.heads:]                               # (N, nh|kvh, D)
            v = h[:, nq + nkv:].reshape(-1, a.kv_heads, a.head_dim)               # (N, kvh, D)
            for s in rope.wide:
                att[s.row:s.row + s.n] = self._attend(li, s, q[s.row:s.row + s.n],
                                                      k[s.row:s.row + s.n], v[s.row:s.row + s.n])
        return x + layer.o(att)                                                    # (N, H)

    def logits(self, x: np.ndarray, segments: list[Segment], last_only: bool = True,
               rows: list[int] | None = None) -> np.ndarray:
        """Final norm and LM head: (S, V) at each segment's last row, (N, V) for every row, or
        (len(rows), V) for the packed rows asked."""
        t0 = time.perf_counter()
        if rows is not None:
            x = x[rows]                                                            # (R, H)
        elif last_only:
            x = x[[s.row + s.n - 1 for s in segments]]                             # (S, H)
        out = self.head(self.rmsnorm(x, self.norm))                               # (S, V)
        self.last_head_s = time.perf_counter() - t0
        return out

    def _attend(self, li: int, s: Segment, q, k, v) -> np.ndarray:
        """q (n, nh, D), k/v (n, kvh, D) -> (n, nh D); writes k/v into the cache first.

        Causal: new row i (position p + i) sees cache positions <= p + i. The rows go in blocks
        of ATTN_BLOCK: block [a, b) scores only keys [0, p + b) and masks only its own triangle,
        so a 256-token prompt computes ~5/8 of the full square (the rest is masked anyway)."""
        a, c, n, p = self.arch, s.cache, s.n, s.pos
        if n == 1:
            return self._attend_one(li, c, p, q, k, v)
        c.put(li, p, k, v)
        g, D = a.heads // a.kv_heads, a.head_dim
        qg = q.reshape(n, a.kv_heads, g, D).transpose(1, 0, 2, 3)                  # (kvh, n, g, D)
        out = np.empty((n, a.kv_heads, g, D), np.float32)
        for r0 in range(0, n, ATTN_BLOCK):
            r1 = min(n, r0 + ATTN_BLOCK)
            m, T = r1 - r0, p + r1
            Kt, V = c.keys_t_view(li, T), c.v[li, :, :T]                           # (kvh, D|T, T|D)
            sc = qg[:, r0:r1].reshape(a.kv_heads, m * g, D) @ Kt                   # (kvh, m g, T)
            sc *= self.scale
            tri = sc.reshape(a.kv_heads, m, g, T)[..., p + r0:]                     # keys of rows r0..r1
            tri[np.broadcast_to(_upper(m)[None, :, None, :], tri.shape)] = -np.inf
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc *= 1.0 / sc.sum(axis=-1, keepdims=True)
            out[r0:r1] = (sc @ V).reshape(a.kv_heads, m, g, D).transpose(1, 0, 2, 3)
        return out.reshape(n, -1)

    def _attend_one(self, li: int, c: KVCache, p: int, q, k, v) -> np.ndarray:
        """_attend for one new row (a decode step), with fewer numpy calls: (1, nh D)."""
        a = self.arch
        c.put(li, p, k, v)
        Kt, V = c.keys_t_view(li, p + 1), c.v[li, :, :p + 1]                       # (kvh, D|T, T|D)
        sc = q.reshape(a.kv_heads, -1, a.head_dim) @ Kt                            # (kvh, g, T)
        sc *= self.scale
        sc -= sc.max(axis=-1, keepdims=True)
        np.exp(sc, out=sc)
        sc *= 1.0 / sc.sum(axis=-1, keepdims=True)
        return (sc @ V).reshape(1, -1)                                              # (1, nh D)


@functools.lru_cache(maxsize=ATTN_BLOCK + 1)
def _upper(m: int) -> np.ndarray:
    """(m, m) bool, True above the diagonal: the keys a block's row may not see (read-only)."""
    u = np.triu(np.ones((m, m), bool), 1)
    u.flags.writeable = False
    return u


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate halves (HF convention): x (N, heads, D), cos/sin (N, 1, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x2 * cos + x1 * sin
    return out
