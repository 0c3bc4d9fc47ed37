"""The direct data link (datalink.py): framing round trips, authentication of new links, fuzzing
of both ends' readers, and the fall back to ZeroMQ when a link is refused, broken or unwanted."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_model
from skynet import datalink, fastframe, wire
from skynet.cluster import Cluster
from skynet.config import NodeConfig, ServerConfig
from skynet.datalink import DataConn, LinkError
from skynet.engine import Engine
from skynet.links import unlink
from skynet.membership import NodeStatus
from skynet.mlp import LocalMLP, MLPWeights
from skynet.node import Node

H, LAYERS, NEURONS = 8, 2, 12
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _pair() -> tuple[DataConn, DataConn]:
    """Two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return DataConn(a), DataConn(b)


def _weights() -> MLPWeights:
    rng = np.random.default_rng(0)
    return MLPWeights(*[[rng.standard_normal((NEURONS, H), dtype=np.float32) for _ in range(LAYERS)]
                        for _ in range(3)])


# ---------------------------------------------------------------- framing
@pytest.mark.parametrize("encode", [wire.encode, fastframe.encode])
@pytest.mark.parametrize("msg", [wire.Mlp(3, 1, 0, np.ones((2, H), np.float32)),
                                 wire.MlpOut(3, 1, 1, np.zeros((0, H), np.float64)),
                                 wire.DataHello(7, b"t" * 32)])
def test_round_trip(msg, encode):
    a, b = _pair()
    a.send_multipart(encode(msg))
    got = fastframe.decode(b.recv_multipart(), wire.Limits(hidden=H, layers=LAYERS))
    assert got == msg
    for name in msg.TENSORS:
        np.testing.assert_array_equal(getattr(got, name), getattr(msg, name))


def test_back_to_back_messages_are_both_read_and_the_second_is_seen_as_buffered():
    a, b = _pair()
    one, two = (wire.MlpOut(s, 1, 0, np.full((1, H), s, np.float32)) for s in (1, 2))
    blob = b"".join(bytes(f) for m in (one, two) for f in datalink.pack(wire.encode(m)))
    a.sock.sendall(blob)
    time.sleep(0.05)
    first = wire.decode(b.recv_multipart(), wire.Limits(hidden=H))
    assert first.step == 1 and b.buffered      # the second one is already in our buffer
    second = wire.decode(b.recv_multipart(), wire.Limits(hidden=H))
    assert second.step == 2 and not b.buffered
    np.testing.assert_array_equal(first.y, 1)   # not overwritten by the second read


def test_a_message_larger_than_the_socket_buffers_arrives_whole():
    a, b = _pair()
    x = np.arange(600_000 * H, dtype=np.float32).reshape(-1, H)   # 19 MB
    t = threading.Thread(target=a.send_multipart, args=(wire.encode(wire.Mlp(1, 1, 0, x)),))
    t.start()
    got = wire.decode(b.recv_multipart(), wire.Limits(hidden=H))
    t.join()
    np.testing.assert_array_equal(got.x, x)


@pytest.mark.parametrize("prefix,match", [((3, 10, 0), "count"), ((0, 10, 0), "count"), ((1, 0, 0), "header"),
                                          ((1, 70_000, 0), "header"), ((1, 10, 5), "tensor"),
                                          ((2, 10, 2**31), "tensor")])
def test_bad_prefixes_are_refused_before_anything_is_allocated(prefix, match):
    with pytest.raises(datalink.FramingError, match=match):
        datalink.parse_prefix(datalink.PREFIX.pack(*prefix), max_frame=1 << 30)


def test_eof_and_a_stall_mid_message_are_link_errors():
    a, b = _pair()
    a.sock.sendall(datalink.PREFIX.pack(2, 10, 100) + b"x" * 20)
    with pytest.raises(LinkError, match="timed out"):
        b.recv_multipart(timeout=0.1)
    a.close()
    with pytest.raises(LinkError, match="closed"):
        b.recv_multipart(timeout=0.1)


@fuzz
@given(st.binary(max_size=300))
def test_reader_fuzz(data):
    """Any bytes: whole messages that wire.decode judges, or a LinkError; never anything else."""
    a, b = _pair()
    a.sock.sendall(data)
    a.close()
    while True:
        try:
            frames = b.recv_multipart(timeout=1.0)
        except LinkError:
            break
        try:
            fastframe.decode(frames, wire.Limits(hidden=H, layers=LAYERS))
        except wire.WireError:
            pass
    b.close()


def _valid_link_bytes() -> list[bytes]:
    msgs = [wire.MlpOut(1, 1, 0, np.ones((2, H), np.float32)), wire.Mlp(1, 1, 1, np.ones((1, H), np.float32)),
            wire.DataHello(1, b"k" * 32), wire.Ping(1.0)]
    return [b"".join(bytes(f) for f in datalink.pack(enc(m))) for m in msgs for enc in (wire.encode, fastframe.encode)]


def _mutate(data, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if kind == "flip" and b:
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            b = b[:data.draw(st.integers(0, len(b)))]
        else:
            b += data.draw(st.binary(min_size=1, max_size=40))
    return bytes(b)


# ---------------------------------------------------------------- the server's end
@pytest.fixture(scope="module")
def cluster():
    c = Cluster(ServerConfig(node_port=0), _weights(), "fuzz")
    yield c
    c.close()


def _welcomed(cluster: Cluster, name: str):
    ident = name.encode()
    cluster.handle([ident, *wire.encode(wire.Hello(name, 1, 1 << 30, 1.0, 1.0, b"\0" * 16))])
    return next(n for n in cluster.nodes.values() if n.ident == ident)


@fuzz
@given(st.data())
def test_server_link_reader_fuzz(cluster, data):
    n = _welcomed(cluster, "fuzzed")
    n.state = NodeStatus.ACTIVE
    ours, theirs = _pair()
    n.link = ours
    blob = _mutate(data, data.draw(st.sampled_from(_valid_link_bytes()))) if data.draw(st.booleans()) \
        else data.draw(st.binary(max_size=300))
    theirs.sock.sendall(blob)
    theirs.close()
    for _ in range(50):
        if n.link is None or n.id not in cluster.nodes:
            break
        for r in cluster.receive([n.id], 0.5):       # must not raise
            assert r.node is n and (r.msg is None or isinstance(r.msg, wire.MlpOut))
    assert n.link is None or n.id not in cluster.nodes   # EOF ends the link in the end
    cluster.lose(n, "test over")


def _connect(port: int, blob: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(blob)
    return s


def _accept(cluster: Cluster, timeout: float = 2.5) -> None:
    end = time.monotonic() + timeout
    while cluster.links.listener.pending and time.monotonic() < end:
        cluster.poll(10)
    cluster.poll(10)


@pytest.mark.parametrize("key", [None, "sesame"])
def test_only_the_welcomed_node_with_its_token_gets_a_link(key):
    c = Cluster(ServerConfig(node_port=0, cluster_key=key), _weights(), "m")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{c.cfg.node_port}")
    try:
        nonce = b"\1" * 16
        dealer.send_multipart(wire.encode(wire.Hello("n1", 1, 1 << 30, 1.0, 1.0, nonce)))
        while not c.nodes:
            c.poll(10)
        n = c.nodes[1]
        if key:   # the handshake: the node proves, the server welcomes
            dealer.send_multipart(wire.encode(wire.Challenge(b"", c.keyring.proof(b"node", n.server_nonce, nonce))))
            while n.state == NodeStatus.JOINING:
                c.poll(10)
            token = c.keyring.proof(b"data", nonce, n.server_nonce)
        else:
            token = n.data_token
        assert n.state == NodeStatus.LOADING and len(n.data_token) == 32
        port = c.cfg.data_port
        hello = lambda nid, tok: b"".join(bytes(f) for f in datalink.pack(wire.encode(wire.DataHello(nid, tok))))
        bad = [hello(1, b"\0" * 32), hello(2, token), hello(1, token[:-1]), b"GET / HTTP/1.1\r\n\r\n",
               datalink.PREFIX.pack(1, 60_000, 0) + b"x" * 100,
               b"".join(bytes(f) for f in datalink.pack(wire.encode(wire.Ping(1.0))))]
        socks = [_connect(port, b) for b in bad]
        before = c.dropped
        _accept(c)
        assert n.link is None and c.dropped - before == len(bad)
        for s in socks:   # each was closed by the server
            s.settimeout(2)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        good = _connect(port, hello(1, token))
        _accept(c)
        assert n.link is not None
        good.close()
    finally:
        c.close()
        dealer.close(0)


def test_a_silent_connection_is_closed_after_the_hello_timeout(monkeypatch):
    monkeypatch.setattr(datalink, "HELLO_TIMEOUT_S", 0.2)
    c = Cluster(ServerConfig(node_port=0), _weights(), "m")
    try:
        s = _connect(c.cfg.data_port, b"\0\0")
        before, end = c.dropped, time.monotonic() + 3
        while c.dropped == before and time.monotonic() < end:
            c.poll(10)
        assert c.dropped == before + 1 and not c.links.listener.pending
        s.close()
    finally:
        c.close()


# ---------------------------------------------------------------- the node's end
@pytest.fixture(scope="module")
def node():
    n = Node(NodeConfig(gflops=1.0))
    n.welcomed(wire.Welcome(1, "fuzz", H, LAYERS, NEURONS, 1.0))
    return n


@fuzz
@given(st.data())
def test_node_link_reader_fuzz(node, data):
    ours, theirs = _pair()
    node.link = ours
    blob = _mutate(data, data.draw(st.sampled_from(_valid_link_bytes()))) if data.draw(st.booleans()) \
        else data.draw(st.binary(max_size=300))
    theirs.sock.sendall(blob)
    theirs.sock.shutdown(socket.SHUT_WR)
    for _ in range(50):
        if node.link is None:
            break
        node._serve_link()                            # must not raise
    assert node.link is None
    theirs.close()


def test_a_node_that_cannot_connect_serves_over_zmq():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                      # nothing listens there now
    n = Node(NodeConfig(server="127.0.0.1:1", gflops=1.0))
    n._link(wire.Welcome(1, "m", H, LAYERS, NEURONS, 1.0, data_port=port, data_token=b"t" * 32), b"t" * 32)
    assert n.link is None


# ---------------------------------------------------------------- real nodes
PROMPT = [1, 504, 3458, 282, 4649]


def test_replies_come_over_the_link_and_fall_back_to_zmq(tiny_model, nodes):
    """Node n1 runs --no-direct (ZeroMQ only), n0 uses its link until the server closes it:
    the tokens never change and no range is ever computed by the server."""
    model = load_model(tiny_model("llama"))
    want = Engine(model, LocalMLP(model.mlp_weights)).generate(PROMPT, 6).out
    with nodes(model, 2, extra=[[], ["--no-direct"]]) as nc:
        n0, n1 = (next(n for n in nc.cluster.nodes.values() if n.name == k) for k in ("n0", "n1"))
        assert n0.link is not None and n1.link is None
        assert nc.engine.generate(PROMPT, 6).out == want
        st = nc.mlp.stats
        assert st["fallbacks"] == 0 and st["direct_replies"] == st["replies"]["n0"] > 0, st
        unlink(n0, "test")                  # the link breaks: ZeroMQ from now on
        direct = st["direct_replies"]
        assert nc.engine.generate(PROMPT, 6).out == want
        assert st["fallbacks"] == 0 and st["direct_replies"] == direct, (st, nc.logs())


def test_a_keyed_node_proves_its_link_with_the_derived_token(tiny_model, tmp_path):
    """With a cluster key the token never travels: the node derives it from the handshake."""
    from conftest import spawn_node, stop_procs
    from skynet.dispatch import ClusterMLP
    model = load_model(tiny_model("llama"))
    c = Cluster(ServerConfig(node_port=0, cluster_key="sesame"), model.mlp_weights, "tiny")
    proc = spawn_node(c.cfg.node_port, "keyed", tmp_path, extra=["--cluster-key", "sesame"])
    try:
        end = time.monotonic() + 60
        while not (c.plan.ranges and c.pending is None and all(n.link for n in c.nodes.values())):
            assert time.monotonic() < end and proc.poll() is None, (tmp_path / "keyed.log").read_text()
            c.poll(20)
        mlp = ClusterMLP(c, min_deadline_s=10.0)
        mlp.begin_step()
        x = np.ones((2, model.arch.hidden), np.float32)
        np.testing.assert_allclose(mlp(0, x), LocalMLP(model.mlp_weights)(0, x), rtol=1e-5, atol=1e-6)
        assert mlp.stats["direct_replies"] == 1 and mlp.stats["fallbacks"] == 0
    finally:
        c.close()
        stop_procs([proc])


def test_cpus_are_parsed_strictly():
    from skynet.config import ConfigError, parse_cpus
    assert parse_cpus("") == () and parse_cpus("1") == (1,) and parse_cpus("0,2-3") == (0, 2, 3)
    for bad in ("a", "1-x", "-1"):
        with pytest.raises(ConfigError):
            parse_cpus(bad)


def test_a_node_waits_on_its_link_and_still_sees_the_control_socket(node):
    ctx = zmq.Context.instance()
    server_side, ctrl = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    server_side.bind("inproc://node-wait")
    ctrl.connect("inproc://node-wait")
    ours, theirs = _pair()
    node.link = ours
    try:
        t0 = time.perf_counter()
        assert node._wait(ctrl, 5.0) == []                      # nothing: back within LINK_WAIT_S
        assert time.perf_counter() - t0 < 1.0
        theirs.send_multipart(fastframe.encode(wire.Mlp(1, 1, 0, np.ones((1, H), np.float32))))
        server_side.send(b"ping")
        time.sleep(0.05)
        assert node._wait(ctrl, 5.0) == [ours.fileno(), ctrl]   # both, so loads cannot starve mlp
        ctrl.recv()
        assert node._wait(ctrl, 5.0) == [ours.fileno()]
        ours.recv_multipart()
        server_side.send(b"load")
        assert node._wait(ctrl, 5.0) == [ctrl]
    finally:
        node.link = None
        ours.close()
        theirs.close()
        server_side.close(0)
        ctrl.close(0)
