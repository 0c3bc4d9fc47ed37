"""A real node process against a scripted server (a ZeroMQ ROUTER in this test): the node's side
of the key handshake, its exit codes, and its leave on SIGTERM. No model is loaded."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import zmq

from conftest import REPO, child_env
from skynet import wire
from skynet.auth import Keyring

KEY = "node-side-key"


class ScriptedServer:
    """The node port, played by the test: receive a message, answer what the script says."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")

    def recv(self, timeout_s: float = 60.0) -> tuple[bytes, wire.Message]:
        assert self.sock.poll(int(timeout_s * 1000)), "the node sent nothing"
        ident, *frames = self.sock.recv_multipart()
        return ident, wire.decode(frames)

    def recv_type(self, cls, timeout_s: float = 60.0):
        """The next message of type cls (pongs and the like before it are skipped)."""
        while True:
            ident, msg = self.recv(timeout_s)
            if isinstance(msg, cls):
                return ident, msg

    def send(self, ident: bytes, msg: wire.Message) -> None:
        self.sock.send_multipart([ident, *wire.encode(msg)])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def node(server, tmp_path):
    """node(*flags) -> a started node process connected to the scripted server (killed after)."""
    procs = []

    def start(*flags: str) -> subprocess.Popen:
        log = open(tmp_path / f"node{len(procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "skynet.cli", "node", "--server", f"127.0.0.1:{server.port}",
                              "--name", "scripted", "--gflops", "1", *flags], cwd=REPO, env=child_env(),
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        p.log = tmp_path / f"node{len(procs)}.log"
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_node_refuses_a_server_that_cannot_prove_the_key(server, node):
    """The server challenges and accepts the node's proof, but its own proof is wrong: the node
    accepts nothing else, says why, and exits with exactly 2."""
    p = node("--cluster-key", KEY)
    ident, hello = server.recv_type(wire.Hello)
    server.send(ident, wire.Challenge(Keyring.nonce(), b""))
    _, answer = server.recv_type(wire.Challenge)
    assert len(answer.proof) == 32 and not answer.nonce
    server.send(ident, wire.Challenge(b"", Keyring("another key").proof(b"server", hello.nonce, b"x" * 16)))
    server.send(ident, wire.Welcome(1, "m", 8, 1, 16, 1.0))   # never accepted
    assert p.wait(timeout=60) == 2
    out = p.log.read_text()
    assert "the server could not prove it holds our cluster key" in out, out
    assert "registered as node" not in out


def test_node_with_a_key_refuses_a_server_without_one(server, node):
    p = node("--cluster-key", KEY)
    ident, _ = server.recv_type(wire.Hello)
    server.send(ident, wire.Welcome(1, "m", 8, 1, 16, 1.0))   # no challenge: a server with no key
    assert p.wait(timeout=60) == 2
    assert "the server has no cluster key but this node was given one" in p.log.read_text()


def test_node_refused_by_the_server_exits_2(server, node):
    p = node()
    ident, _ = server.recv_type(wire.Hello)
    server.send(ident, wire.Bye("wrong cluster key"))
    assert p.wait(timeout=60) == 2
    assert "refused by the server: wrong cluster key" in p.log.read_text()


def test_second_sigterm_leaves_at_once(server, node):
    """The first SIGTERM asks the server to move the node's neurons (Bye) and waits to be
    released; this server never releases it, so only the second SIGTERM ends it, at once: long
    before the 30 s leave timeout or the silence limit (heartbeat 100 s) could."""
    p = node()
    ident, _ = server.recv_type(wire.Hello)
    server.send(ident, wire.Welcome(1, "m", 8, 1, 16, 100.0))
    server.recv_type(wire.Holding)   # the node took the Welcome: it is a member with rows to move
    p.send_signal(signal.SIGTERM)
    _, bye = server.recv_type(wire.Bye)
    assert bye.reason == "leaving" and p.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1.0)   # still waiting for the server's release
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 1
    out = p.log.read_text()
    assert "leave requested" in out and "leaving anyway" not in out, out
