"""`skynet status` and `skynet run` as a user runs them (subprocesses, their text checked), and a
node's memory cap end to end: `--max-memory` reaches the plan and /v1/cluster.

One tiny-model cluster (exact precision, fixed weights) serves the module: node0 offers memory for
CAPPED neurons only, node1 offers what it has free.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY_NEURONS, child_env, load_model
from skynet.epochs import LOAD_FRAME_BYTES
from skynet.launch import LocalCluster
from skynet.placement import LOAD_FRAMES_IN_FLIGHT

CAPPED = 100
PROMPT = "Hello world"


def skynet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skynet.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def row_bytes(model_dir) -> int:
    return load_model(model_dir).mlp_weights.bytes_per_neuron()   # one neuron of every layer


def offered(row_bytes: int, layers: int = 3) -> int:
    """The --max-memory planned as CAPPED neurons (and half a neuron): the old and the new epoch
    and the Load frames in flight must fit it (placement.slice_cap_bytes, inverted)."""
    frame = min(LOAD_FRAME_BYTES, row_bytes // layers * TINY_NEURONS)
    return 2 * (CAPPED * row_bytes + row_bytes // 2) + LOAD_FRAMES_IN_FLIGHT * frame


@pytest.fixture(scope="module")
def lc(model_dir, row_bytes, tmp_path_factory):
    c = LocalCluster(str(model_dir), 0, node_args=["--weight", "1"], env=child_env(),
                     log_dir=str(tmp_path_factory.mktemp("cli")))
    try:
        c.start_server(timeout=120)
        c.add_node("node0", ["--max-memory", str(offered(row_bytes))])
        c.add_node("node1")
        c.wait_active(2, 120)
        yield c
    finally:
        c.stop()


def test_max_memory_caps_the_range_and_is_reported(lc, row_bytes):
    view = lc.cluster()
    nodes = {n["name"]: n for n in view["nodes"]}
    # equal weights would give 500 each: the cap holds node0 to what fits, node1 takes the rest
    (s0, e0), (s1, e1) = nodes["node0"]["neurons"][0], nodes["node1"]["neurons"][0]
    assert (e0 - s0, e1 - s1) == (CAPPED, TINY_NEURONS - CAPPED)
    assert sorted([s0, e0, s1, e1]) == [0, min(e0, e1), min(e0, e1), TINY_NEURONS]   # they tile
    assert view["local_neurons"] == []
    assert nodes["node0"]["mem_bytes"] == offered(row_bytes)
    # without the flag a node offers its free memory (MemAvailable when it registered)
    free = mem_available()
    assert 0.5 * free < nodes["node1"]["mem_bytes"] < 1.5 * free, (nodes["node1"]["mem_bytes"], free)


def test_status_prints_the_cluster(lc, row_bytes):
    r = skynet("status", "--url", lc.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"model {lc.cluster()['model']}: 3 layers, hidden 64, {TINY_NEURONS} MLP neurons"
    assert "; 2 node(s); 0 active / 0 queued requests" in lines[1]
    head = next(l for l in lines if l.startswith("id"))
    assert head.split() == ["id", "node", "state", "neurons", "[0,", f"{TINY_NEURONS})", "share", "weight",
                            "ms/layer", "held", "/", "offered", "heartbeat"]
    row = {l.split()[1]: l for l in lines if l.split()[:1] in (["1"], ["2"], ["-"]) and len(l.split()) > 3}
    ranges = {n["name"]: n["neurons"][0] for n in lc.cluster()["nodes"]}
    for name, share in (("node0", " 10.0% "), ("node1", " 90.0% ")):
        s, e = ranges[name]
        assert row[name].split()[2:4] == ["active", f"[{s},{e})"] and share in row[name], row[name]
    assert "230 KB / 2.8 MB" in row["node0"]   # held / offered: 100 neurons of 2304 bytes; offered(): the cap
    assert row["server"].split()[2:4] == ["local", "-"] and " 0.0% " in row["server"]
    # node1's join, alone ("node node1 joined") or folded with node0's ("nodes node1, node0 joined")
    assert "rebalances (latest last):" in lines
    assert any("node1" in l and l.endswith("joined") for l in lines[lines.index("rebalances (latest last):"):])

    j = skynet("status", "--url", lc.url, "--json")
    assert j.returncode == 0 and {n["name"] for n in json.loads(j.stdout)["nodes"]} == {"node0", "node1"}

    down = skynet("status", "--url", "http://127.0.0.1:9")   # nothing listens on the discard port
    assert down.returncode != 0


def test_run_streams_one_answer_then_stops_everything(lc, model_dir):
    want = lc.complete(PROMPT, 8)["choices"][0]["text"]
    r = skynet("run", PROMPT, "--model", str(model_dir), "--nodes", "1", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"\n> {PROMPT}\n{want}\n"
    assert r.stderr.startswith("starting a local cluster: server + 1 node(s) ...\n")
    assert f"3 layers, hidden 64, {TINY_NEURONS} MLP neurons" in r.stderr   # the status table
    assert "24 distributed MLP calls, 0 fallbacks; logs in" in r.stderr      # 8 tokens x 3 layers


def test_blas_threads_policy():
    """exact runs its linear layers in BLAS (every thread); fast only its attention (one thread)."""
    from skynet.config import ConfigError, blas_threads
    assert blas_threads("exact", 2) == 2 and blas_threads("exact", 1) == 1
    assert blas_threads("fast", 2) == 1 and blas_threads("fast", 1) == 1
    with pytest.raises(ConfigError):
        blas_threads("fast", 0)


def test_api_socket_sends_without_waiting_for_acks():
    """The API's listening socket sets TCP_NODELAY and the connections it accepts inherit it: a
    keep-alive response's body then leaves with its headers instead of after the client's delayed
    ACK (~40 ms a request, and per streamed chunk, before)."""
    import socket

    from skynet.cli import listen
    srv = listen("127.0.0.1", 0)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        assert srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for s in (conn, cli, srv):
            s.close()
