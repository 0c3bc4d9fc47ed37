"""The latency model of one decode token (issue 10), as pure functions of plain data.

    t_token ≈ t_server + max_k t_node_k + layers · RTT

- t_server: the server's own work per token: attention projections of every layer and the LM
  head, read from memory once per token (decode is bandwidth-bound):
  bytes_per_weight · (layers · attn_params + vocab · hidden) / server bandwidth.
- t_node_k: node k's share of every layer's MLP (3 · hidden · intermediate weights per layer),
  split evenly over the nodes: bytes_per_weight · layers · mlp_params / nodes / node bandwidth.
- RTT: one layer's round trip: the network's small-message round trip, our software's cost per
  round trip (framing, checks, wake-ups: measured by `skynet bench-rtt` as direct − raw TCP),
  and the row's bytes through the server's NIC, which every node's message shares:
  nodes · hidden · (request + reply bytes per value) / link bandwidth.

"Machines" are the server plus its nodes; the server holds no MLP rows. Attention over the
KV cache (small at short contexts), the norms and sampling are left out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's shape (the names of the HF config)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def attn_params(self) -> int:
        """q and o (H, H), k and v (kv_heads · head_dim, H), per layer."""
        kv = self.hidden // self.heads * self.kv_heads
        return self.hidden * (2 * self.hidden + 2 * kv)

    @property
    def mlp_params(self) -> int:
        """gate, up (I, H) and down (H, I), per layer."""
        return 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class Setup:
    """What the prediction assumes about the machines and the network."""

    mem_gbs: float = 50.0          # memory bandwidth each machine streams weights at, GB/s
    bytes_per_weight: float = 0.5625   # Q4_K: 4.5 bits per weight
    link_gbits: float = 1.0        # Ethernet, Gbit/s
    net_rtt_us: float = 100.0      # small-message round trip of the network (switch, NICs, kernels)
    sw_rtt_us: float = 0.0         # our software's cost per round trip, beyond the raw TCP one
    request_bytes: int = 4         # per value: float32 rows to the nodes
    reply_bytes: int = 8           # per value: float64 partials back (fast precision)


QWEN25_7B = Shape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064)
LLAMA3_70B = Shape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256)
SMOLLM2_135M = Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152)


def t_server_ms(s: Shape, u: Setup) -> float:
    return u.bytes_per_weight * (s.layers * s.attn_params + s.vocab * s.hidden) / (u.mem_gbs * 1e6)


def t_node_ms(s: Shape, u: Setup, nodes: int) -> float:
    return u.bytes_per_weight * s.layers * s.mlp_params / nodes / (u.mem_gbs * 1e6)


def rtt_us(s: Shape, u: Setup, nodes: int) -> float:
    wire_bytes = nodes * s.hidden * (u.request_bytes + u.reply_bytes)
    return u.net_rtt_us + u.sw_rtt_us + wire_bytes * 8 / (u.link_gbits * 1e3)


def t_token_ms(s: Shape, u: Setup, machines: int) -> dict:
    """The model's terms (ms) and tok/s for the server and machines − 1 nodes; machines = 1 is
    one machine alone (no round trips)."""
    if machines < 1:
        raise ValueError(f"machines must be >= 1, got {machines}")
    if machines == 1:
        total = t_server_ms(s, u) + t_node_ms(s, u, 1)
        return {"server": total, "node": 0.0, "rtt_total": 0.0, "total": total, "tok_s": 1000 / total}
    nodes = machines - 1
    server, node = t_server_ms(s, u), t_node_ms(s, u, nodes)
    wire = s.layers * rtt_us(s, u, nodes) / 1000
    total = server + node + wire
    return {"server": server, "node": node, "rtt_total": wire, "total": total, "tok_s": 1000 / total}
