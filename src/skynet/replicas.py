"""Replica policy: which nodes hold each neuron range besides its primary, and when a reply is late.

Pure functions of plain data (no sockets, no tensors); tests/test_replicas.py hammers them.

Layout. `plan.plan()` splits the neurons into primary ranges p_0 < p_1 < ... (one per node, in
plan order, weighted by speed and capped by memory). With R replicas the nodes are cut, in that
order, into groups of R consecutive nodes (the last group takes the remainder, so it has R..2R-1
members; with fewer than R nodes there is one group of all of them). Every member of a group
holds the union of the group's primary ranges, which is contiguous:

    nodes  A  B | C  D          primaries  [pA][pB][pC][pD]
    holds  pA+pB  | pC+pD       every range held by the 2 nodes of its group

So a node still holds ONE contiguous range per epoch (Assign/Load unchanged), each range has
min(R, nodes) holders, and each node's memory is ~R/n of the neurons. A step asks each range of
its primary (`Mlp.start/end` name the sub-range of the holding to compute); a replica computes
the very same range with the same kernels on the same blocks, so its partial is bit-identical.
A member whose memory cap cannot take its group's union holds only its own primary range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

from .plan import Plan

Range = tuple[int, int]


def replicate(p: Plan, r: int, caps: Mapping[int, int | None] | None = None) -> Plan:
    """The plan with `holds` filled in: node id -> the contiguous range it holds (a superset of
    its primary range `p.ranges[id]`). r = 1 (or one node) holds just the primaries."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {r!r}")
    order = sorted(p.ranges, key=lambda i: p.ranges[i][0])
    caps = caps or {}
    holds: dict[int, Range] = {}
    for group in _groups(order, r):
        union = (p.ranges[group[0]][0], p.ranges[group[-1]][1])
        if not _contiguous([p.ranges[i] for i in group]):   # never from plan(): stay safe
            union = None
        for nid in group:
            cap = caps.get(nid)
            fits = union is not None and (cap is None or union[1] - union[0] <= cap)
            holds[nid] = union if fits else p.ranges[nid]
    return replace(p, holds=holds if any(holds[i] != p.ranges[i] for i in holds) else {})


def _groups(order: list[int], r: int) -> list[list[int]]:
    """Consecutive groups of r; the remainder joins the last group; one group if len < r."""
    if len(order) <= r:
        return [order] if order else []
    groups = [order[i:i + r] for i in range(0, len(order) - len(order) % r, r)]
    groups[-1].extend(order[len(order) - len(order) % r:])
    return groups


def _contiguous(ranges: list[Range]) -> bool:
    return all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def holders(p: Plan) -> dict[Range, tuple[int, ...]]:
    """Each primary range -> the nodes that hold it: its primary first, then the others in plan
    order (the order in which replicas are asked)."""
    order = sorted(p.ranges, key=lambda i: p.ranges[i][0])
    out = {}
    for nid in order:
        rng = p.ranges[nid]
        others = [j for j in order if j != nid and _within(rng, p.held(j))]
        out[rng] = (nid, *others)
    return out


def _within(rng: Range, held: Range) -> bool:
    return held[0] <= rng[0] and rng[1] <= held[1]


def takeover(p: Plan, lost: int) -> Plan | None:
    """The plan without node `lost`, no rows moved: its primary range joins the adjacent primary
    of a survivor that already holds it (first in plan order); every holding stays as it is.
    None if no adjacent survivor holds it (then a full re-plan must ship rows). The result may
    hold some ranges fewer than R times: a later re-plan restores that."""
    rng = p.ranges.get(lost)
    if rng is None:
        return None
    for nid in sorted(p.ranges, key=lambda i: p.ranges[i][0]):
        s, e = p.ranges[nid]
        if nid == lost or not (e == rng[0] or s == rng[1]) or not _within(rng, p.held(nid)):
            continue
        ranges = {i: r for i, r in p.ranges.items() if i != lost}
        ranges[nid] = (min(s, rng[0]), max(e, rng[1]))
        holds = {i: p.held(i) for i in ranges}
        return replace(p, ranges=ranges, holds=holds if any(holds[i] != ranges[i] for i in ranges) else {})
    return None


def replica_caps(caps: Mapping[int, int | None], r: int, granule: int = 1) -> dict[int, int | None]:
    """Caps to plan primaries with when each node will hold ~r primaries' worth of rows: cap // r,
    rounded down to the granule and never below one granule (plan() rounds caps to granules)."""
    return {i: None if c is None else max(granule, (c // r) // granule * granule) for i, c in caps.items()}


# ---------------------------------------------------------------------------- latency policy
HEDGE_K = 4.0          # deviations above the mean before a reply counts as late
HEDGE_FLOOR_S = 0.010  # never hedge sooner than this (scheduler noise on a busy box)
LOSS_K = 8.0           # deviations above the mean before a missed reply counts as a miss
MIN_SAMPLES = 8        # replies before the distribution is trusted over the fixed floor


@dataclass(frozen=True)
class Latency:
    """A node's observed reply time, per 1-row call: exponential mean and mean deviation (as in
    TCP's RTO estimator, RFC 6298), and how many replies they summarise."""

    mean: float
    dev: float
    samples: int


def observe(lat: Latency | None, sample: float, gain: float = 0.2) -> Latency:
    """Fold one reply time in: dev <- (1-g) dev + g |sample - mean|; mean <- (1-g) mean + g sample."""
    if lat is None:
        return Latency(sample, sample / 2, 1)
    dev = (1 - gain) * lat.dev + gain * abs(sample - lat.mean)
    return Latency((1 - gain) * lat.mean + gain * sample, dev, lat.samples + 1)


def hedge_after(lat: Latency | None, scale: float, fallback_s: float) -> float:
    """Seconds after sending before a range is also asked of a replica:
    max(HEDGE_FLOOR_S, (mean + HEDGE_K dev) * scale); `fallback_s` until MIN_SAMPLES replies."""
    if lat is None or lat.samples < MIN_SAMPLES or not math.isfinite(lat.mean):
        return fallback_s
    return max(HEDGE_FLOOR_S, (lat.mean + HEDGE_K * lat.dev) * scale)


def miss_after(lat: Latency | None, scale: float, floor_s: float, ceiling_s: float) -> float:
    """Seconds after sending before a node's silence counts as a missed deadline (MAX_MISSES in a
    row lose it): (mean + LOSS_K dev) * scale, within [floor_s, ceiling_s]; the ceiling (the
    classic max(--step-deadline-ms, 10 x mean)) until MIN_SAMPLES replies."""
    if lat is None or lat.samples < MIN_SAMPLES:
        return ceiling_s
    return min(ceiling_s, max(floor_s, (lat.mean + LOSS_K * lat.dev) * scale))
