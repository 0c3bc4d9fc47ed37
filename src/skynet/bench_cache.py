"""`skynet bench`, elastic section: a node restarted with its slice cache (issue 12's targets).

A server and two nodes with equal fixed weights (`--gflops 4`, so the restarted node is planned
the same range again); node "cached" keeps its slice cache in a temp dir. It leaves gracefully
(SIGTERM, which waits for its cache write), is started again, and we read from /v1/cluster the
bytes the server shipped it (÷ its slice, which the first start shipped whole) and the seconds
from its Popen to active with no epoch pending (polled every 0.1 s over HTTP), and check that a
greedy completion is the same text as before the restart.
"""
from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

NODE_ARGS = ["--gflops", "4"]
TOKENS = 16


def _view(lc, name: str) -> dict | None:
    view = lc.cluster()
    if view.get("pending_epoch") is not None:
        return None
    return next((n for n in view.get("nodes", []) if n["name"] == name and n["state"] == "active"
                 and n["neurons"]), None)


def _start(lc, name: str, cache: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    lc.add_node(name, ["--cache-dir", str(cache)])
    lc.wait(lambda: _view(lc, name) is not None, 180, f"{name} active")
    return _view(lc, name), time.perf_counter() - t0


def restart_figures(model: str | None, precision: str, env: dict, log_dir: str, prompt: str) -> dict:
    """Restart a node with its cache in a 2-node cluster; the bytes shipped to it ÷ its slice,
    start -> active seconds (first start and restart) and whether the text stayed the same."""
    from .launch import LocalCluster
    with tempfile.TemporaryDirectory(prefix="skynet-slices-") as cache, \
            LocalCluster(model, 1, server_args=["--precision", precision], node_args=NODE_ARGS, env=env,
                         log_dir=log_dir) as lc:
        first, cold_s = _start(lc, "cached", Path(cache))
        ref = lc.complete(prompt, TOKENS)["choices"][0]["text"]
        (s, e), = first["neurons"]
        lc.wait(lambda: any(Path(cache).glob(f"*/{s}-{e}.slice")), 120, "the cache file")
        lc.signal_node("cached", signal.SIGTERM)
        lc.nodes["cached"].wait(timeout=60)
        lc.wait(lambda: len(lc.active_nodes()) == 1 and lc.cluster().get("pending_epoch") is None, 60,
                "the node released")
        again, warm_s = _start(lc, "cached", Path(cache))
        text = lc.complete(prompt, TOKENS)["choices"][0]["text"]
    return {"slice_bytes": first["bytes_sent"], "restart_bytes_shipped": again["bytes_sent"],
            "restart_bytes_ratio": again["bytes_sent"] / max(1, first["bytes_sent"]),
            "restart_same_range": again["neurons"] == first["neurons"],
            "first_start_to_active_s": cold_s, "restart_to_active_s": warm_s,
            "restart_identical": text == ref}
