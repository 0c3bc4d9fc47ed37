"""Safe defaults, fuzzing of both message handlers, and a live garbage test against real ports."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from skynet import wire
from skynet.auth import Keyring
from skynet.cluster import MAX_BAD_MESSAGES, Cluster
from skynet.config import ConfigError, NodeConfig, ServerConfig
from skynet.launch import LocalCluster
from skynet.mlp import MLPWeights
from skynet.node import Node

H, LAYERS, NEURONS = 8, 2, 12


# ---------------------------------------------------------------- safe defaults
def test_exposed_node_port_needs_a_cluster_key():
    with pytest.raises(ConfigError, match="cluster key"):
        ServerConfig(node_host="0.0.0.0", cluster_key=None)
    ServerConfig(node_host="0.0.0.0", cluster_key="k")             # keyed: fine
    ServerConfig(node_host="0.0.0.0", insecure=True)               # explicit opt-out


def test_exposed_api_needs_an_api_key():
    with pytest.raises(ConfigError, match="API key"):
        ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", api_key="k")


def test_cli_refuses_to_start_exposed_without_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYNET_")}
    r = subprocess.run([sys.executable, "-m", "skynet.cli", "server", "--node-host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "refusing to bind the node port" in r.stderr


def test_insecure_warns_loudly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYNET_")}
    # --model points nowhere, so the server stops right after the warning: no port is opened.
    r = subprocess.run([sys.executable, "-m", "skynet.cli", "server", "--node-host", "0.0.0.0",
                        "--insecure", "--model", "/nonexistent/model.gguf"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert "--insecure" in r.stderr and "WARNING" in r.stderr
    assert "GGUF file not found" in r.stderr and r.returncode == 2


# ---------------------------------------------------------------- fuzzing the handlers
@pytest.fixture(scope="module")
def cluster():
    rng = np.random.default_rng(0)
    mats = [[rng.standard_normal((NEURONS, H), dtype=np.float32) for _ in range(LAYERS)] for _ in range(3)]
    c = Cluster(ServerConfig(node_port=0), MLPWeights(*mats), "fuzz")
    yield c
    c.close()


def _valid_frames() -> list[list[bytes]]:
    x = np.ones((2, H), np.float32)
    msgs = [wire.Hello("n", 2, 1 << 30, 1.0, 0.0, b"\0" * 16), wire.Ready(1), wire.MlpOut(1, 1, 0, x),
            wire.Ping(1.0), wire.Pong(1.0), wire.Bye("x"), wire.Challenge(b"a" * 16, b"b" * 32),
            wire.Load(1, 0, 0, 2, x, x, x), wire.Assign(1, 0, 4, 0), wire.Mlp(1, 1, 1, x)]
    return [[bytes(f) for f in wire.encode(m)] for m in msgs]


def _mutate(frames: list[bytes], data) -> list[bytes]:
    frames = list(frames)
    i = data.draw(st.integers(0, len(frames) - 1))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "add"]))
    f = bytearray(frames[i])
    if kind == "flip" and f:
        f[data.draw(st.integers(0, len(f) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        f = f[:data.draw(st.integers(0, len(f)))]
    elif kind == "extend":
        f += data.draw(st.binary(min_size=1, max_size=64))
    frames[i] = bytes(f)
    if kind == "drop" and len(frames) > 1:
        frames.pop(i)
    elif kind == "add":
        frames.append(data.draw(st.binary(max_size=64)))
    return frames


fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _decoded(frames, limits):
    try:
        return wire.decode(frames, limits)
    except wire.WireError:
        return None


@fuzz
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=5), st.binary(min_size=1, max_size=8))
def test_server_handler_drops_and_counts_each_random_message(cluster, frames, ident):
    assume(ident not in cluster.by_ident)
    msg, before, nodes = _decoded(frames, cluster.limits), cluster.dropped, dict(cluster.nodes)
    cluster.handle([ident, *frames])        # must not raise
    if not isinstance(msg, wire.Hello):     # anything else from a stranger is one dropped message
        assert cluster.dropped == before + 1 and cluster.nodes == nodes


# ---------------------------------------------------------------- a peer that did the handshake
class _Recorder:
    """Stands in for the cluster's ROUTER socket: what the server sends, per peer."""

    def __init__(self):
        self.sent: dict[bytes, list] = {}

    def send_multipart(self, frames, copy=True):
        self.sent.setdefault(bytes(frames[0]), []).append(wire.decode([bytes(f) for f in frames[1:]]))

    def poll(self, *_):
        return 0

    def close(self, *_):
        pass


CLUSTER_KEY = "fuzz-key"
PEER = b"P"


@contextlib.contextmanager
def keyed_cluster():
    rng = np.random.default_rng(1)
    mats = [[rng.standard_normal((NEURONS, H), dtype=np.float32) for _ in range(LAYERS)] for _ in range(3)]
    c = Cluster(ServerConfig(node_port=0, cluster_key=CLUSTER_KEY, settle_s=0), MLPWeights(*mats), "fuzz")
    c.ctrl.sock.close(0)
    c.ctrl.sock = _Recorder()
    try:
        yield c
    finally:
        c.close()


def handshake(c: Cluster, ident: bytes = PEER):
    """A peer that holds the key proves it and checks the server's proof: it is welcomed and
    assigned rows. Returns its NodeState (loading: not serving yet)."""
    keys, mine = Keyring(CLUSTER_KEY), Keyring.nonce()
    c.handle([ident, *wire.encode(wire.Hello("peer", 2, 1 << 30, 1.0, 0.0, mine))])
    challenge = c.ctrl.sock.sent[ident][-1]
    c.handle([ident, *wire.encode(wire.Challenge(b"", keys.proof(b"node", challenge.nonce, mine)))])
    c.handle([ident, *wire.encode(wire.Holding(c.ctrl.sock.sent[ident][2].model_hash))])   # nothing cached
    proof, welcome, assign = c.ctrl.sock.sent[ident][1:4]
    assert keys.check(b"server", mine, challenge.nonce, proof.proof)
    assert isinstance(welcome, wire.Welcome) and isinstance(assign, wire.Assign)
    node = c.nodes[c.by_ident[ident]]
    assert node.state == "loading" and assign.epoch in node.assigned
    return node


NODE_MESSAGES = (wire.Hello, wire.Ready, wire.MlpOut, wire.Ping, wire.Pong, wire.Bye, wire.Challenge)


def _verdict(msg, node) -> tuple[int, int]:
    """(dropped, bad) that one message from the peer must add, by the rules in docs/security.md."""
    if isinstance(msg, wire.Hello):
        return 0, 0                                    # registers afresh
    if node is None:
        return 1, 0                                    # from an unregistered peer
    if msg is None or not isinstance(msg, NODE_MESSAGES):
        return 1, 1                                    # rejected by the wire layer, or a server's message
    if node.state == "joining" and not isinstance(msg, wire.Challenge):
        return 1, 1                                    # before the handshake finished
    return (1, 0) if isinstance(msg, wire.MlpOut) else (0, 0)   # no call waits for that reply


def test_a_handshaken_peer_serves_after_a_valid_ready():
    with keyed_cluster() as c:
        node = handshake(c)
        c.handle([PEER, *wire.encode(wire.Ready(max(node.assigned)))])
        c.tick()   # plans switch at step boundaries
        assert node.state == "active" and c.plan.ranges == {node.id: (0, NEURONS)}


@fuzz
@given(st.data())
def test_garbage_never_makes_a_handshaken_peer_serve(data):
    """A peer that proved the key but has not said Ready sends mutated and random messages: it
    serves only if one of them is a well-formed Ready of its epoch, and each message is dropped
    and counted (as a bad message of this node) exactly when the rules say so."""
    with keyed_cluster() as c:
        node = handshake(c)
        epoch, ready_seen = max(node.assigned), False
        valid = _valid_frames() + [[bytes(f) for f in wire.encode(wire.Ready(epoch))]]
        for _ in range(data.draw(st.integers(1, 6))):
            if data.draw(st.booleans()):
                frames = _mutate(data.draw(st.sampled_from(valid)), data)
            else:
                frames = data.draw(st.lists(st.binary(max_size=80), max_size=4))
            msg = _decoded(frames, c.limits)
            now = c.nodes.get(c.by_ident.get(PEER, -1))
            want_dropped, want_bad = _verdict(msg, now)
            dropped, bad = c.dropped, now.bad if now else 0
            c.handle([PEER, *frames])
            assert c.dropped == dropped + want_dropped, (msg, frames)
            if now is not None:
                assert now.bad == bad + want_bad, (msg, frames)
            ready_seen |= now is node and isinstance(msg, wire.Ready) and msg.epoch in node.assigned
        c.tick()   # plans switch at step boundaries
        serving = [n for n in c.nodes.values() if n.state == "active"]
        assert serving == ([node] if node.state == "active" else [])
        assert node.state != "active" or ready_seen, "garbage made a peer serve"


def test_a_registered_node_is_lost_at_its_21st_bad_message():
    with keyed_cluster() as c:
        node = handshake(c)
        c.handle([PEER, *wire.encode(wire.Ready(max(node.assigned)))])
        c.tick()   # plans switch at step boundaries
        assert node.state == "active"
        for i in range(MAX_BAD_MESSAGES):   # 20 bad messages are tolerated ...
            c.handle([PEER, b"garbage %d" % i])
        assert (node.bad, node.state, c.dropped) == (20, "active", 20)
        assert c.plan.ranges == {node.id: (0, NEURONS)}
        c.handle([PEER, b"one too many"])   # ... the 21st is not
        assert (node.bad, node.state, c.dropped) == (21, "gone", 21)
        c.tick()
        assert PEER not in c.by_ident and c.pending is None and c.plan.ranges == {}
        assert c.plan.local == ((0, NEURONS),)
        assert c.ctrl.sock.sent[PEER][-1] == wire.Bye("too many bad messages")


def test_an_unknown_peer_is_logged_20_times_then_ignored(caplog):
    with keyed_cluster() as c:
        caplog.set_level(logging.WARNING, logger="skynet")
        for i in range(30):
            c.handle([b"stranger", b"garbage %d" % i])
        logged = [r for r in caplog.records if "unknown peer" in r.getMessage()]
        assert len(logged) == MAX_BAD_MESSAGES and "ignoring this peer" in logged[-1].getMessage()
        assert c.dropped == 30 and c.nodes == {}
        c.handle([b"stranger", *wire.encode(wire.Hello("x", 1, 1, 1.0, 0.0, Keyring.nonce()))])
        assert c.nodes == {} and c.dropped == 31   # not even a hello is heard from it now


@pytest.fixture(scope="module")
def node():
    n = Node(NodeConfig(gflops=1.0))
    n.welcomed(wire.Welcome(1, "fuzz", H, LAYERS, NEURONS, 1.0))
    return n


class _Sink:
    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True):
        self.sent.append(frames)


@fuzz
@given(st.data())
def test_node_handler_survives_mutated_and_random_messages(node, data):
    if data.draw(st.booleans()):
        frames = _mutate(data.draw(st.sampled_from(_valid_frames())), data)
    else:
        frames = data.draw(st.lists(st.binary(max_size=200), max_size=5))
    msg = node._decode(frames, node.limits)
    if msg is not None and not isinstance(msg, wire.Bye):
        try:
            node._handle(_Sink(), msg)
        except Exception as e:  # the only exception allowed is the node's own re-join signal
            assert type(e).__name__ == "_Rejoin", repr(e)


def test_node_rejects_assign_outside_the_model(node):
    sink = _Sink()
    node._handle(sink, wire.Assign(9, 0, 2**40, 0))   # would allocate terabytes if trusted
    assert node.slices.pending is None or node.slices.pending.epoch != 9


# ---------------------------------------------------------------- live garbage while generating
def _garbage_node_port(port: int, stop: threading.Event, seed: int, out: dict) -> None:
    """Sends garbage to the node port; out["zmq"] = how many ZeroMQ messages it sent."""
    rnd, sent, out["zmq"] = random.Random(seed), 0, 0
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    valid = _valid_frames()
    try:
        while not stop.is_set() and sent < 400:
            r = rnd.random()
            if r < 0.3:
                frames = [rnd.randbytes(rnd.randint(0, 100)) for _ in range(rnd.randint(1, 4))]
            elif r < 0.6:
                frames = list(rnd.choice(valid[1:]))   # well-formed but from an unregistered peer
            elif r < 0.8:
                frames = [msgpack.packb({"v": 1, "t": "mlp_out", "step": 1, "epoch": 1, "layer": 0,
                                         "tensors": [["float32", [1, 10**6]]]}), b"\0" * 8]
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:   # not even ZMTP
                    s.sendall(rnd.randbytes(rnd.randint(1, 300)))
                sent += 1
                continue
            dealer.send_multipart(frames)
            sent += 1
            out["zmq"] += 1
            time.sleep(0.002)
    finally:
        dealer.close(0)
        ctx.term()


def _garbage_http(port: int, stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed)
    junk = [b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n{{{{{",
            b"GET /" + b"A" * 5000 + b" HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(rnd.choice(junk) + rnd.randbytes(rnd.randint(0, 64)))
                s.recv(256)
        except OSError:
            pass
        time.sleep(0.01)


def test_garbage_on_both_ports_during_generation():
    with LocalCluster(None, 2, node_args=["--weight", "1"], env={"SKYNET_NO_PROGRESS": "1"}) as lc:
        names = sorted(n["name"] for n in lc.active_nodes())
        prompt = "Write one sentence about the sea."
        reference = lc.complete(prompt, 24)["choices"][0]["text"]
        stop, result, garbage = threading.Event(), {}, {}
        dropped = lc.cluster()["dropped_messages"]
        gen = threading.Thread(target=lambda: result.update(lc.complete(prompt, 24)))
        noise = [threading.Thread(target=_garbage_node_port, args=(lc.node_port, stop, 1, garbage)),
                 threading.Thread(target=_garbage_http, args=(lc.port, stop, 2))]
        for t in noise:
            t.start()
        time.sleep(0.2)
        gen.start()
        gen.join(timeout=120)
        end = time.monotonic() + 10   # a fast generation may outrun 100 messages: more come after it
        while garbage.get("zmq", 0) <= 100 and time.monotonic() < end:
            time.sleep(0.01)
        stop.set()
        for t in noise:
            t.join(timeout=30)
        assert result["choices"][0]["text"] == reference
        view = lc.cluster()
        assert sorted(n["name"] for n in lc.active_nodes()) == names   # good nodes stayed active
        # every ZeroMQ message of the garbage peer is dropped and counted (the server may still be
        # reading the last ones; late node replies, if any, only add to the count)
        assert garbage["zmq"] > 100
        lc.wait(lambda: lc.cluster()["dropped_messages"] - dropped >= garbage["zmq"], 30,
                f"{garbage['zmq']} dropped messages")
        assert lc.get("/health")["status"] == "ok"
        assert lc.complete(prompt, 24)["choices"][0]["text"] == reference


# ---------------------------------------------------------------- schemathesis: no 5xx
def test_openapi_schema_fuzz_gives_no_server_errors(tiny_model, tmp_path):
    """schemathesis drives every endpoint of the server's own OpenAPI schema; nothing may 5xx.

    A tiny random model keeps each generated request fast (its context is small, so most
    large max_tokens values are rejected with a 400 before any work)."""
    model = tiny_model("llama", layers=2)
    with LocalCluster(str(model), 1, env={"SKYNET_NO_PROGRESS": "1"}) as lc:
        r = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "st"), "run", f"{lc.url}/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "25", "--request-timeout", "60",
             "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m and int(m[1]) > 100 and m[1] == m[2], out[-2000:]
        assert lc.get("/health")["status"] == "ok"
