"""Faults inside one server: nodes that lie, steps that raise, callbacks that raise.

The invariant is the one the design promises: whatever one node or one request does wrong, the
other requests finish with exactly the tokens of an undisturbed run.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import load_model
from skynet import faults, wire
from skynet.engine import Engine
from skynet.mlp import LocalMLP

PROMPT = [1, 504, 3458, 282, 4649]


# ---------------------------------------------------------------------------- lying nodes
def test_lie_modes_change_what_a_node_sends():
    y = np.ones((3, 8), np.float32)
    honest = wire.MlpOut(5, 2, 1, y)
    got = {m: faults.lie(m, honest) for m in faults.MODES}
    assert got["rows"].y.shape == (6, 8) and got["width"].y.shape == (3, 9)
    assert np.isnan(got["nan"].y).any() and not np.isnan(y).any()
    assert got["dtype"].y.dtype == np.float16
    assert (got["stale"].step, got["stale"].epoch, got["stale"].layer) == (4, 2, 1)


@pytest.mark.parametrize("mode", faults.MODES)
def test_lying_node_is_computed_around_and_dropped(tiny_model, nodes, mode, caplog):
    """Node n1 (a real process) sends a malformed reply to every MLP call: its range is computed
    by the server for that call, it is counted as bad and planned out after the limit, the
    honest node is never blamed, and the tokens are those of a run with no nodes at all."""
    model = load_model(tiny_model("llama"))
    want = Engine(model, LocalMLP(model.mlp_weights)).generate(PROMPT, 12).out
    caplog.set_level(logging.WARNING, logger="skynet")
    with nodes(model, 2, envs=[{}, {faults.ENV: mode}], deadline_s=1.0) as nc:
        liar = next(n for n in nc.cluster.nodes.values() if n.name == "n1")
        got = nc.engine.generate(PROMPT, 12).out
        assert got == want, nc.logs()
        assert nc.mlp.stats["fallbacks"] > 0
        assert liar.state == "gone" and liar.id not in nc.cluster.nodes, nc.logs()
        lost = [r.getMessage() for r in caplog.records if "'n1' lost" in r.getMessage()]
        assert lost, nc.logs()
        assert not any("'n0' lost" in r.getMessage() or "from node 'n0'" in r.getMessage()
                       for r in caplog.records)
        honest = next(n for n in nc.cluster.nodes.values() if n.name == "n0")
        assert honest.bad == 0 and honest.state == "active"
        # and it goes on: the same answer again, whatever the liar does after re-registering
        assert nc.engine.generate(PROMPT, 12).out == want
