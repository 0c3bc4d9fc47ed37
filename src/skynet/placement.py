"""Placement policy: pure functions from plain cluster data to decisions. No sockets, no tensors.

- `planning_members`: each joining or serving node's planning weight and memory cap.
- `rows_to_ship`, `load_chunks`: which neuron rows a node lacks for a new range, in frames.

Whether observed latency is worth a re-plan is `plan.reweigh` (tests/test_plan.py).

cluster.py carries these decisions out; tests/test_placement.py hammers them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import Member

REWEIGHT_MIN_SAMPLES = 60     # MLP replies since the last switch before latency counts


@dataclass(frozen=True)
class Candidate:
    """What placement needs to know about one node."""

    id: int
    gflops: float                  # measured matmul throughput (its Hello)
    mem_bytes: int = 0             # memory offered for weights, 0 = unbounded
    weight_override: float = 0.0   # --weight, 0 = none
    observed: float = 0.0          # neurons per second from observed latency, 0 = none yet


def planning_members(nodes: list[Candidate], row_bytes: int) -> list[Member]:
    """Planning weights and caps, in the order given.

    Observed weights are neurons/s, measured ones GFLOP/s: unobserved nodes are put on the
    observed scale through the observed nodes' average ratio."""
    ratios = [n.observed / n.gflops for n in nodes if n.observed and n.gflops > 0]
    scale = sum(ratios) / len(ratios) if ratios else 1.0
    out = []
    for n in nodes:
        weight = n.weight_override or n.observed or max(n.gflops, 1e-3) * scale
        cap = max(1, n.mem_bytes // max(1, row_bytes)) if n.mem_bytes else None
        out.append(Member(n.id, weight, cap))
    return out


def rows_to_ship(rng: tuple[int, int], held: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Parts of range rng outside range held (0, 1 or 2 pieces): what a node still needs."""
    if held is None:
        return [rng]
    out = []
    if rng[0] < held[0]:
        out.append((rng[0], min(rng[1], held[0])))
    if rng[1] > held[1]:
        out.append((max(rng[0], held[1]), rng[1]))
    return [p for p in out if p[1] > p[0]]


def load_chunks(pieces: list[tuple[int, int]], bytes_per_row: int, frame_bytes: int,
                granule: int) -> list[tuple[int, int]]:
    """Cut pieces into chunks of at most ~frame_bytes, each on granule (block) bounds."""
    step = max(1, frame_bytes // max(1, bytes_per_row) // granule) * granule
    return [(a, min(e, a + step)) for s, e in pieces for a in range(s, e, step)]
