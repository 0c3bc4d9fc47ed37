"""Two micro-batches in flight, so the server's attention for one overlaps the nodes' MLP for
the other.

A step's sequences are split, whole, into micro-batches a (the first ones) and b (the rest),
about half the rows each; a step of one long prompt chunk is cut into its two halves. Per layer l:

    x_a += gather(mlp_a, l-1);  x_a = attention(l, x_a);  scatter(mlp_a, l)   # nodes: mlp_b(l-1)
    x_b += gather(mlp_b, l-1);  x_b = attention(l, x_b);  scatter(mlp_b, l)   # nodes: mlp_a(l)

so while the server works on one micro-batch the nodes work on the other. Each row goes through
exactly the operations of the one-batch forward (attention is per sequence, norms and the MLP per
row), the micro-batches join again before the LM head, and a sequence's tokens do not change.
"""
from __future__ import annotations

import numpy as np

from .model import ATTN_BLOCK, Model, Segment


def split(segments: list[Segment]) -> tuple[list[Segment], list[Segment]] | None:
    """Whole sequences into two row-balanced micro-batches, rows renumbered from 0 in each. A step
    of one prompt chunk of at least 2 * ATTN_BLOCK rows is cut in two instead, at a multiple of
    ATTN_BLOCK: the second half's attention in each layer reads the keys the first half has just
    written, and every row keeps its bits (fast attends each row by its position; exact's blocks
    of ATTN_BLOCK rows stay the same blocks). None when there is nothing to split."""
    if len(segments) == 1 and segments[0].n >= 2 * ATTN_BLOCK:
        s = segments[0]
        cut = s.n // 2 // ATTN_BLOCK * ATTN_BLOCK
        return [Segment(s.cache, s.row, cut, s.pos)], [Segment(s.cache, 0, s.n - cut, s.pos + cut)]
    if len(segments) < 2:
        return None
    total, rows, cut = sum(s.n for s in segments), 0, 1
    for i, s in enumerate(segments[:-1]):
        rows += s.n
        cut = i + 1
        if 2 * rows >= total:
            break
    first, rest = segments[:cut], segments[cut:]
    off = rest[0].row
    return first, [Segment(s.cache, s.row - off, s.n, s.pos) for s in rest]


def forward(model: Model, tokens: np.ndarray, segments: list[Segment], mlp,
            rows: list[int] | None = None) -> np.ndarray:
    """Model.forward (logits of the last rows (S, V), or of the packed `rows`) with two
    micro-batches pipelined through `mlp` (a ClusterMLP: `scatter(layer, x, micro)`, `gather`)."""
    groups = split(segments)
    if groups is None:
        return model.forward(tokens, segments, mlp, rows=rows)
    n0 = sum(s.n for s in groups[0])
    xs = [model.embed_rows(tokens[:n0]), model.embed_rows(tokens[n0:])]             # (N_m, H)
    ropes = [model.rope_tables(g) for g in groups]
    calls = [None, None]
    for li in range(len(model.layers)):
        for m, g in enumerate(groups):
            if calls[m] is not None:
                xs[m] = xs[m] + mlp.gather(calls[m])                                  # (N_m, H)
            xs[m] = model.attention(li, xs[m], g, ropes[m])                          # (N_m, H)
            calls[m] = mlp.scatter(li, model.rmsnorm(xs[m], model.layers[li].ln2), m)
    for m in range(2):
        xs[m] = xs[m] + mlp.gather(calls[m])
    return model.logits(np.concatenate(xs), segments, rows=rows)                     # (S | R, V)
