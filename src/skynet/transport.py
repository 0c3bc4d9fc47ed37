"""The server's control channel (one ZeroMQ ROUTER socket) and bad-peer accounting.

Control messages (handshake, assign, load, ready, heartbeats, bye) travel here, and `mlp` too for
a node without a direct data link (datalink.py). Only the engine thread touches the socket.
"""
from __future__ import annotations

import zmq

MAX_BAD_MESSAGES = 20
MAX_TRACKED_PEERS = 10_000


class PeerGuard:
    """Counts dropped messages, and strikes per unknown peer: one that sent MAX_BAD_MESSAGES bad
    messages is ignored from then on (so garbage can flood neither the handler nor the log)."""

    def __init__(self):
        self.dropped = 0
        self.strikes: dict[bytes, int] = {}

    def ignored(self, peer: bytes) -> bool:
        return self.strikes.get(peer, 0) >= MAX_BAD_MESSAGES

    def strike(self, peer: bytes) -> int:
        """Count one bad message from an unknown peer; returns its count."""
        self.dropped += 1
        if len(self.strikes) > MAX_TRACKED_PEERS:
            self.strikes.clear()
        count = self.strikes[peer] = self.strikes.get(peer, 0) + 1
        return count


class ControlSocket:
    """A ROUTER bound on host:port (0 = an ephemeral port, then `port` says which)."""

    def __init__(self, host: str, port: int, ctx: zmq.Context | None = None):
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self.sock.bind_to_random_port(f"tcp://{host}")

    def send(self, ident: bytes, frames: list) -> str | None:
        """Send frames to one peer; None, or why it is unreachable (its connection is gone)."""
        try:
            self.sock.send_multipart([ident, *frames], copy=False)
            return None
        except zmq.ZMQError as e:   # EHOSTUNREACH
            return f"unreachable ({e.strerror})"

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def recv(self) -> tuple[bytes, list]:
        """(peer identity, message frames); call after poll() said there is one."""
        frames = self.sock.recv_multipart(copy=False)
        return bytes(frames[0]), frames[1:]

    def close(self) -> None:
        self.sock.close(0)
