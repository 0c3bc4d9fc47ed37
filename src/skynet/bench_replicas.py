"""Replica figures (issue 12): the stall when a node dies, and what replicas cost per token.

- `kill_gap`: 4 nodes, `--replicas 2`, a node SIGKILLed mid-stream: largest inter-token gap over
  the median gap, and whether the text equals the undisturbed run's (`bench.kill_figures`).
- `cost`: single-stream ms per token and CPU seconds per token (server + nodes, from
  /proc/<pid>/stat: robust to a shared, noisy machine, unlike wall time) at 2 and 4 nodes with no
  replicas, with replicas hedged after a late reply (`--hedge auto`), and with every holder asked
  at once (`--hedge always`).

Both start LocalClusters (server + node processes on 127.0.0.1). `skynet bench` adds `kill_gap`
to its elastic section; `skynet bench-replicas` prints both.
"""
from __future__ import annotations

import os
from pathlib import Path

from .bench import ENV, PROMPT, kill_figures, say, single

MODES = (("1", "auto"), ("2", "auto"), ("2", "always"))   # (--replicas, --hedge)


def _cluster(model, precision: str, nodes: int, replicas: str, hedge: str, out: Path):
    from .launch import LocalCluster
    logs = out / f"logs-{precision}-{nodes}-nodes-r{replicas}-{hedge}"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"starting a local cluster: server ({precision}, --replicas {replicas} --hedge {hedge}) + "
        f"{nodes} node(s) (logs in {logs}) ...")
    return LocalCluster(model, nodes, env=ENV, log_dir=str(logs),
                        server_args=["--precision", precision, "--replicas", replicas, "--hedge", hedge])


def kill_gap(model, precision: str, out: Path, nodes: int = 4, replicas: int = 2) -> dict:
    """SIGKILL node1 mid-stream under --replicas: gap ratio = max gap / median gap."""
    with _cluster(model, precision, nodes, str(replicas), "auto", out) as lc:
        lc.wait_active(nodes, 120)
        f = kill_figures(lc, PROMPT, "node1", nodes - 1)
        mlp = lc.cluster()["mlp"]
    f.update(nodes=nodes, replicas=replicas, gap_ratio=f["max_gap_s"] / f["median_gap_s"],
             hedges=mlp.get("hedges"), replica_replies=mlp.get("replica_replies"))
    return f


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (/proc/<pid>/stat)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15 of stat)
    return total / tick


def cost(model, precision: str, out: Path, tokens: int = 32, reps: int = 3) -> dict:
    """Per token, single stream, for each (nodes, replicas, hedge): wall ms and the CPU seconds
    of the server and every node (what replicas cost the machine)."""
    res = {}
    for nodes in (2, 4):
        for replicas, hedge in MODES:
            with _cluster(model, precision, nodes, replicas, hedge, out) as lc:
                lc.wait_active(nodes, 120)
                pids = [lc.server.pid, *(p.pid for p in lc.nodes.values())]
                c0 = cpu_s(pids)
                s = single(lc, PROMPT, tokens, reps, nodes)
                cpu = (cpu_s(pids) - c0) / (reps * tokens + reps + 4)   # single(): warm-up,
                mlp = lc.cluster()["mlp"]                                      # TTFTs, timed runs
            res[f"{nodes} nodes, replicas {replicas}, hedge {hedge}"] = {
                "ms_per_token": 1000 / s["decode_tok_s"], "tok_s": s["decode_tok_s"], "cpu_ms_per_token": 1000 * cpu,
                "fallbacks": s["fallbacks"], "hedges": mlp.get("hedges"), "duplicates": mlp.get("duplicates")}
            say(f"  {nodes} nodes, replicas {replicas}, hedge {hedge}: {1000 / s['decode_tok_s']:.1f} ms/token, "
                f"{1000 * cpu:.1f} CPU ms/token")
    return res


def table(kill: dict, costs: dict) -> str:
    lines = ["replicas: node SIGKILLed mid-stream",
             f"  {kill['nodes']} nodes, --replicas {kill['replicas']}: max gap {1000 * kill['max_gap_s']:.1f} ms, "
             f"median {1000 * kill['median_gap_s']:.1f} ms, ratio {kill['gap_ratio']:.2f}x (target <= 3x); "
             f"identical to undisturbed: {kill['identical_to_undisturbed']}",
             "", "replicas: single-stream cost",
             f"  {'setup':<36} {'ms/token':>9} {'CPU ms/token':>13} {'hedges':>7} {'fallbacks':>9}"]
    for k, v in costs.items():
        lines.append(f"  {k:<36} {v['ms_per_token']:>9.1f} {v['cpu_ms_per_token']:>13.1f} {v['hedges'] or 0:>7} "
                     f"{v['fallbacks']:>9}")
    return "\n".join(lines)


def main(a) -> int:
    import json
    from . import loader
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(ENV)
    precision = loader.open_model(a.model).precision(a.precision)
    kill = kill_gap(a.model, precision, out)
    costs = cost(a.model, precision, out, a.tokens, a.reps)
    (out / "replicas.json").write_text(json.dumps({"kill": kill, "cost": costs}, indent=2))
    print(table(kill, costs))
    return 0
