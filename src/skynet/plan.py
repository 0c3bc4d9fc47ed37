"""The sharding plan: a pure function from (neurons, nodes) to contiguous neuron ranges.

Every layer uses the same ranges. A node with range [s, e) holds gate[s:e], up[s:e] (rows) and
down[:, s:e] (columns) of every layer and returns down[:, s:e] @ (silu(gate[s:e] x) * up[s:e] x);
the server sums the partials over all ranges. No sockets, no tensors: tests can hammer it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

LOCAL = -1  # the participant id of the server itself


class PlanError(ValueError):
    """The cluster cannot be planned (too many nodes, bad weights, no capacity)."""


@dataclass(frozen=True)
class Member:
    """A participant: a node id (or LOCAL), its relative throughput, and how many neurons fit."""

    id: int
    weight: float
    cap: int | None = None  # max neurons it can hold, None = unbounded


@dataclass(frozen=True)
class Plan:
    neurons: int
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # node id -> [start, end)
    local: tuple[tuple[int, int], ...] = ()                          # ranges the server computes
    holds: dict[int, tuple[int, int]] = field(default_factory=dict)  # node id -> held superset
                                                                     # (replicas.py); {} = ranges

    def held(self, nid: int) -> tuple[int, int]:
        """The contiguous range node nid holds: its primary range plus any replicas."""
        return self.holds.get(nid, self.ranges[nid])

    def covers(self) -> bool:
        spans = sorted([*self.ranges.values(), *self.local])
        pos = 0
        for s, e in spans:
            if s != pos or e <= s:
                return False
            pos = e
        return pos == self.neurons


def plan(neurons: int, nodes: Sequence[Member], local_weight: float = 0.0, granule: int = 1) -> Plan:
    """Split `neurons` into contiguous ranges in proportion to weight, capped by memory.

    Nodes are laid out in the order given; the server (LOCAL) takes `local_weight`'s share and
    whatever the nodes' caps leave over. With no nodes the server computes everything.
    Every boundary falls on a multiple of `granule` (the weight blocks' size along the neuron
    axis in the fast precision; 1 in the exact one), and caps are rounded down to it."""
    if not isinstance(neurons, int) or neurons < 1:
        raise PlanError(f"neurons must be a positive integer, got {neurons!r}")
    if not isinstance(granule, int) or granule < 1 or neurons % granule:
        raise PlanError(f"neurons ({neurons}) must be a multiple of the granule ({granule!r})")
    if granule > 1:
        units = [Member(m.id, m.weight, None if m.cap is None else m.cap // granule) for m in nodes]
        p = plan(neurons // granule, units, local_weight)
        return Plan(neurons, {i: (s * granule, e * granule) for i, (s, e) in p.ranges.items()},
                    tuple((s * granule, e * granule) for s, e in p.local))
    ids = [m.id for m in nodes]
    if len(set(ids)) != len(ids) or LOCAL in ids:
        raise PlanError(f"node ids must be unique and not {LOCAL}: {ids}")
    for m in nodes:
        if not (math.isfinite(m.weight) and m.weight > 0):
            raise PlanError(f"node {m.id}: weight must be a positive number, got {m.weight!r}")
        if m.cap is not None and m.cap < 1:
            raise PlanError(f"node {m.id}: can hold {m.cap} neurons; it needs room for at least 1")
    if not (math.isfinite(local_weight) and local_weight >= 0):
        raise PlanError(f"local weight must be >= 0, got {local_weight!r}")
    if not nodes:
        return Plan(neurons, {}, ((0, neurons),))
    members = list(nodes) + ([Member(LOCAL, local_weight)] if local_weight > 0 else [])
    if len(members) > neurons:
        raise PlanError(f"{len(members)} participants but only {neurons} neurons: "
                        f"each needs at least one")
    counts = _apportion(neurons, [m.weight for m in members], [m.cap for m in members])
    ranges, local, pos = {}, [], 0
    for m, n in zip(members, counts):
        if n == 0:
            continue
        if m.id == LOCAL:
            local.append((pos, pos + n))
        else:
            ranges[m.id] = (pos, pos + n)
        pos += n
    if pos < neurons:  # caps left neurons over: the server computes them
        local.append((pos, neurons))
    return Plan(neurons, ranges, tuple(local))


def _apportion(total: int, weights: list[float], caps: list[int | None]) -> list[int]:
    """Integer shares of `total`: proportional to weights, each within [1, cap].

    Water-filling: members whose proportional share exceeds their cap are pinned at the cap,
    the rest is re-split among the others; then largest-remainder rounding. Sum <= total (less
    only when the caps together hold less than `total`)."""
    n = len(weights)
    pinned: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in pinned]
        left = total - sum(pinned.values())
        wsum = sum(weights[i] for i in free)
        ideal = {i: left * weights[i] / wsum for i in free} if free else {}
        over = [i for i in free if caps[i] is not None and ideal[i] > caps[i]]
        if not over:
            break
        for i in over:
            pinned[i] = caps[i]  # type: ignore[assignment]
    counts = [0] * n
    for i, c in pinned.items():
        counts[i] = c
    floors = {i: max(1, math.floor(ideal[i])) for i in free}
    for i in free:
        counts[i] = floors[i]
    spare = total - sum(counts)
    # Hand out the remainder by largest fractional part (ties: lower index), within caps.
    order = sorted(free, key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    while spare > 0 and order:
        progressed = False
        for i in order:
            if spare == 0:
                break
            if caps[i] is None or counts[i] < caps[i]:
                counts[i] += 1
                spare -= 1
                progressed = True
        if not progressed:
            break
    # max(1, floor) may overshoot: take back from the largest shares, never below 1.
    while spare < 0:
        i = max(range(n), key=lambda j: (counts[j], -j))
        if counts[i] <= 1:
            raise PlanError("cannot give every participant a neuron")
        counts[i] -= 1
        spare += 1
    return counts


# ---------------------------------------------------------------------------- re-weighting policy
REWEIGHT_MIN_MOVE = 0.10   # fraction of the neurons a re-weighting must move to be worth it
REWEIGHT_STREAK = 2        # checks in a row that must agree before the plan changes


def moved(old: Plan, new: Plan) -> int:
    """Neurons that change hands between two plans of the same nodes (half the size changes)."""
    return sum(abs((new.ranges[i][1] - new.ranges[i][0]) - (e - s))
               for i, (s, e) in old.ranges.items() if i in new.ranges) // 2


@dataclass(frozen=True)
class Reweigh:
    """One re-weighting check's verdict: the plan to adopt (None = keep the current one), the
    streak to carry into the next check, and each serving node's measured weight (neurons/s)."""

    adopt: Plan | None
    streak: int
    measured: dict[int, float]


def reweigh(current: Plan, latency: dict[int, float], members: Sequence[Member], streak: int,
            local_weight: float = 0.0, granule: int = 1) -> Reweigh:
    """Re-plan from observed latency (seconds per call of each serving node) only if the new plan
    would move more than REWEIGHT_MIN_MOVE of the neurons, REWEIGHT_STREAK checks in a row: noise
    below the threshold, or one spike above it, never changes the plan."""
    measured = {i: (e - s) / latency[i] for i, (s, e) in current.ranges.items()}
    proposal = plan(current.neurons, [Member(m.id, measured.get(m.id, m.weight), m.cap) for m in members],
                    local_weight, granule)
    if moved(current, proposal) <= REWEIGHT_MIN_MOVE * current.neurons:
        return Reweigh(None, 0, measured)
    if streak + 1 < REWEIGHT_STREAK:
        return Reweigh(None, streak + 1, measured)
    return Reweigh(proposal, 0, measured)
