"""Placement policy: pure functions from plain cluster data to decisions. No sockets, no tensors.

- `planning_members`: each joining or serving node's planning weight and memory cap.
- `rows_to_ship`, `load_chunks`: which neuron rows a node lacks for a new range, in frames.
- `joins_due`: when joins that arrive together are folded into one plan.
- `slice_cap_bytes`: how much of a node's offered memory its range may fill, so that the old
  epoch, the new one and the frames in flight fit together during a rebalance.

Whether observed latency is worth a re-plan is `plan.reweigh` (tests/test_plan.py).

cluster.py carries these decisions out; tests/test_placement.py hammers them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import Member

REWEIGHT_MIN_SAMPLES = 60     # MLP replies since the last switch before latency counts
LOAD_FRAMES_IN_FLIGHT = 3     # Load frames a node may hold beside its slices: queued + being copied


@dataclass(frozen=True)
class Candidate:
    """What placement needs to know about one node."""

    id: int
    gflops: float                  # measured matmul throughput (its Hello)
    mem_bytes: int = 0             # memory offered for weights, 0 = unbounded
    weight_override: float = 0.0   # --weight, 0 = none
    observed: float = 0.0          # neurons per second from observed latency, 0 = none yet


def slice_cap_bytes(offered: int, frame_bytes: int) -> int:
    """Bytes of slices a node offering `offered` bytes may be planned to hold.

    During a rebalance a node holds the epoch it serves (old, <= cap), the epoch it assembles
    (new, <= cap) and up to LOAD_FRAMES_IN_FLIGHT frames (its socket queues all but one), so
        peak <= 2 * cap + LOAD_FRAMES_IN_FLIGHT * frame_bytes <= offered
    with cap = (offered - LOAD_FRAMES_IN_FLIGHT * frame_bytes) // 2 (0 when nothing fits)."""
    return max(0, offered - LOAD_FRAMES_IN_FLIGHT * frame_bytes) // 2


def joins_due(now: float, first: float, last: float, settle_s: float, max_wait_s: float) -> bool:
    """Whether to plan the joins not yet planned (the first at `first`, the latest at `last`):
    once none arrived for settle_s, or max_wait_s after the first, whichever is sooner. Nodes
    started together so get one plan and one shipment, not one epoch per join."""
    return now - last >= settle_s or now - first >= max_wait_s


def planning_members(nodes: list[Candidate], row_bytes: int, frame_bytes: int = 0) -> list[Member]:
    """Planning weights and caps, in the order given. A node offering memory is capped at
    `slice_cap_bytes` of it (at least one neuron; the planner refuses what cannot hold one).

    Observed weights are neurons/s, measured ones GFLOP/s: unobserved nodes are put on the
    observed scale through the observed nodes' average ratio."""
    ratios = [n.observed / n.gflops for n in nodes if n.observed and n.gflops > 0]
    scale = sum(ratios) / len(ratios) if ratios else 1.0
    out = []
    for n in nodes:
        weight = n.weight_override or n.observed or max(n.gflops, 1e-3) * scale
        cap = max(1, slice_cap_bytes(n.mem_bytes, frame_bytes) // max(1, row_bytes)) if n.mem_bytes else None
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
