"""One distributed MLP call's books (dispatch.py keeps them), and the checks on a node's partial.

A `Call` is one layer's MLP for one batch of rows: each node range is asked of one holder (its
primary) or more (replicas, replicas.py), and summed once, whichever holder answered first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


MICRO = 2   # calls that may be in flight at once: one per micro-batch (overlap.py); step tags


@dataclass
class Call:
    """One layer's MLP for one batch of rows: sent, then gathered."""

    key: tuple[int, int, int]                      # (step tag, epoch, layer) its replies carry
    x: np.ndarray                                  # (N, H)
    t_sent: float
    local: list = field(default_factory=list)      # ranges the server computes
    waiting: dict = field(default_factory=dict)    # range still expected -> [node ids asked]
    parts: list = field(default_factory=list)      # (range start, partial (N, H))
    sent: dict = field(default_factory=dict)       # (range, node id) -> when it was asked
    hedge_at: dict = field(default_factory=dict)   # range -> when to ask a replica too
    miss_at: float = 0.0                           # when the server stops waiting for a range
    dropped: set = field(default_factory=set)      # nodes not to ask again in this call
    out: dict = field(default_factory=dict)        # (start, end) sub-range -> its encoded Mlp
    fast: list = field(default_factory=list)       # (range, node, sub-range) sent by the compiled path (fastpath.py)


def malformed(y: np.ndarray, shape: tuple, dtype: np.dtype) -> str:
    """Why a node's partial cannot be summed ('' if it can): the wire layer has checked the width;
    the row count, the dtype of this precision and finiteness depend on the call (a NaN would
    poison every token)."""
    if y.shape != shape:
        return f"shape {y.shape}, expected {shape}"
    if y.dtype != dtype:
        return f"dtype {y.dtype}, expected {dtype}"
    if not np.isfinite(y).all():
        return "holds NaN or inf"
    return ""


def row_scale(rows: int) -> float:
    """How much longer a call with `rows` rows takes than a 1-row call, roughly (latency EMAs
    are kept per 1-row call so that prefill and decode steps share one estimate)."""
    return 1 + rows / 64


def sum_parts(parts: list) -> np.ndarray:
    """(range start, partial (N, H)) pairs -> their sum in range order, rounded to float32 once:
    the same bits whichever order the partials came in."""
    parts = sorted(parts, key=lambda p: p[0])
    if len(parts) == 1:
        return parts[0][1].astype(np.float32)   # a copy, rounded once
    out = parts[0][1] + parts[1][1]
    for _, p in parts[2:]:
        out += p
    return out.astype(np.float32, copy=False)
