"""Slice-cache policy: pure functions of plain data. No files, no sockets, no tensors.

- `evict`: which models leave a node's cache when it is over its cap (least recently used first).
- `pick`: which cached range files to try, best first.
- `reported_range`: the server's check of what a node says it holds (`Holding`).
- `rows_source`: what a node's range is shipped against: the rows it serves, else its cache.
- `sticky_order`: the order plan() lays nodes out in, so a returning node gets back its rows.

slicecache.py (the node's files) and epochs.py (the server) carry them out;
tests/test_slicecache.py hammers them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """One model's directory in a node's cache: its key, its bytes on disk, when last used."""

    key: str
    nbytes: int
    last_used: float


@dataclass(frozen=True)
class RangeEntry:
    """One cached range file of a model: neurons [start, end), when last used."""

    start: int
    end: int
    last_used: float


def evict(models: list[ModelEntry], cap: int, keep: str = "") -> list[str]:
    """Keys to delete so that the total is at most `cap`: the least recently used models first,
    never `keep` (the model in use). If `keep` alone exceeds the cap, every other model goes."""
    total = sum(m.nbytes for m in models)
    out = []
    for m in sorted(models, key=lambda m: (m.last_used, m.key)):
        if total <= cap:
            break
        if m.key == keep:
            continue
        out.append(m.key)
        total -= m.nbytes
    return out


def pick(ranges: list[RangeEntry]) -> list[RangeEntry]:
    """The order to try a model's cached ranges in: the most recently used first, then the
    widest (a node that served several ranges most likely gets its last one back)."""
    return sorted(ranges, key=lambda r: (-r.last_used, -(r.end - r.start), r.start))


def superseded(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
    """Cached ranges that a newly written range `new` makes redundant (contained in it)."""
    return [r for r in ranges if r != new and new[0] <= r[0] and r[1] <= new[1]]


def reported_range(ours: bytes, theirs: bytes, start: int, end: int, neurons: int,
                   granule: int) -> tuple[int, int] | None:
    """What the server may count on from a node's `Holding`: its range when the node's model
    hash is ours and the range lies inside the model on block bounds, else None (ship all)."""
    if not ours or theirs != ours or start == end == 0:
        return None
    if not (0 <= start < end <= neurons) or start % granule or end % granule:
        return None
    return start, end


def rows_source(held: tuple[int, int] | None, cached: tuple[int, int] | None) -> tuple[int, int] | None:
    """The rows a node keeps for its next range. Once it serves an epoch, that epoch's rows
    (Assign.base); before that, the cached rows it reported (which it then fills from disk)."""
    return held if held is not None else cached


def sticky_order(nodes: list[tuple[int, tuple[int, int] | None]]) -> list[int]:
    """Node ids in the order plan() should lay them out, given (id, the rows it serves or, before
    it serves any, has cached) in join order.

    plan() gives contiguous ranges in list order, so a node placed where its rows lie keeps
    them: nodes with rows are sorted by the midpoint of their rows (ties: join order), and nodes
    without rows follow in join order. For a cluster that only ever grew, that is the join order
    itself; a returning node with a cache lands where its cached rows are, and stays there.
    Weights still decide how wide each range is."""
    with_rows = [(rows[0] + rows[1], i, nid) for i, (nid, rows) in enumerate(nodes) if rows is not None]
    without = [nid for nid, rows in nodes if rows is None]
    return [nid for _, _, nid in sorted(with_rows)] + without
