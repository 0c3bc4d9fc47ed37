"""The server's side of the direct data links (datalink.py): accept and attach them, send on
them, wait on them (with the control socket when a waiting node has no link), read from them.

Each attached link lives on its node (`NodeState.link`). A link that breaks is closed and the
node is served over ZeroMQ from then on. Deciding what a message means stays in cluster.py.
"""
from __future__ import annotations

import logging
import os
import select
import time
from typing import Callable

import zmq

from .datalink import DataConn, DataListener, LinkError
from .membership import NodeState

log = logging.getLogger("skynet.links")


class DataLinks:
    def __init__(self, host: str, port: int, max_frame: int):
        self.listener = DataListener(host, port)
        self.port, self.max_frame = self.listener.port, max_frame

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self, owner: Callable[[list], tuple[NodeState | None, str]]) -> int:
        """Attach each new link whose first message `owner` accepts; returns how many were refused."""
        refused = self.listener.refused
        dropped = 0
        for sock, frames in self.listener.poll():
            n, why = owner(frames)
            if n is None:
                dropped += 1
                log.warning("refused a data link from %s: %s", _peer(sock), why)
                sock.close()
                continue
            if n.link is not None:
                n.link.close()
            n.link = DataConn(sock, self.max_frame)
            log.info("node %d %r: direct data link from %s", n.id, n.name, _peer(sock))
        return dropped + self.listener.refused - refused

    def send(self, n: NodeState, frames: list, timeout_s: float) -> bool:
        """Send on n's link; False (and the link closed) if it has none or it broke."""
        if n.link is None:
            return False
        try:
            n.link.send_multipart(frames, timeout=timeout_s)
            return True
        except LinkError as e:
            unlink(n, str(e))
            return False

    def wait(self, nodes: list[NodeState], ctrl, timeout_s: float, spin_s: float) -> tuple[list, bool]:
        """(nodes whose link has a message, whether to read the control socket too): it is
        watched only when some of `nodes` has no link, so their replies come that way."""
        linked = {n.link.fileno(): n for n in nodes if n.link is not None}
        buffered = [n for n in linked.values() if n.link.buffered]
        if buffered:
            return buffered, False
        use_zmq = len(linked) < len(nodes)
        ready = _wait(_poller(ctrl, list(linked), use_zmq), timeout_s, spin_s)
        return [linked[h] for h in ready if h in linked], use_zmq

    @staticmethod
    def read(n: NodeState, timeout_s: float) -> list:
        """One message's frames from n's link; LinkError (and the link closed) if it broke."""
        try:
            return n.link.recv_multipart(timeout=max(timeout_s, 0.05))
        except LinkError as e:
            unlink(n, str(e))
            raise

    def close(self) -> None:
        self.listener.close()


def unlink(n: NodeState, why: str) -> None:
    if n.link is not None:
        log.warning("node %r: data link closed (%s); its Mlp goes over ZeroMQ", n.name, why)
        n.link.close()
        n.link = None


def _poller(ctrl, fds: list[int], use_zmq: bool):
    """zmq.Poller over the control socket and the links, or a plain poll() over links only."""
    if use_zmq:
        p = zmq.Poller()
        p.register(ctrl, zmq.POLLIN)
    else:
        p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return p


def _wait(poller, timeout_s: float, spin_s: float) -> list:
    """What is readable: spin (yielding the core) for spin_s, then block for the rest."""
    if spin_s > 0:
        end = time.perf_counter() + spin_s
        while time.perf_counter() < end:
            got = poller.poll(0)
            if got:
                return [h for h, _ in got]
            os.sched_yield()
        timeout_s -= spin_s
    return [h for h, _ in poller.poll(max(0, int(timeout_s * 1000 + 0.999)))]


def _peer(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
