"""The server's side of a node's handshake: Hello -> (Challenge, proof) -> Welcome, and the
check of a new data link's first message.

With a cluster key both sides prove they hold it before anything else moves: the node proves
first, HMAC(key, "node" | server nonce | node nonce), so that a stranger gets no HMAC of ours to
attack; then the server proves HMAC(key, "server" | node nonce | server nonce). The data link's
token is HMAC(key, "data" | node nonce | server nonce), derived on both sides and never sent;
without a key it is 32 random bytes sent in the Welcome. No sockets here: `send` carries.
"""
from __future__ import annotations

import hmac
import logging
import secrets
from typing import Callable

from . import wire
from .auth import Keyring
from .membership import Membership, NodeState, NodeStatus

log = logging.getLogger("skynet.cluster")


class Handshake:
    """Registers nodes. `welcome_msg(n, token)` builds the Welcome for n (the cluster knows the
    model); `joined(n)` runs once n is welcomed; `lose(n, why)` and `forget(n)` drop a node."""

    def __init__(self, keyring: Keyring, members: Membership,
                 send: Callable[[NodeState, wire.Message], bool],
                 welcome_msg: Callable[[NodeState, bytes], wire.Welcome],
                 joined: Callable[[NodeState], None], lose: Callable[[NodeState, str], None],
                 forget: Callable[[NodeState], None]):
        self.keyring, self.members, self.send = keyring, members, send
        self.welcome_msg, self.joined, self.lose, self.forget = welcome_msg, joined, lose, forget

    def hello(self, ident: bytes, h: wire.Hello) -> None:
        old = self.members.by_identity(ident)
        if old is not None:
            self.lose(old, "registered again")
        n = self.members.add(ident, h.name, h.cores, h.mem_bytes, h.gflops, h.weight, h.nonce)
        if self.keyring.enabled:   # the node proves first: no HMAC of ours for a stranger to attack
            n.server_nonce = self.keyring.nonce()
            self.send(n, wire.Challenge(n.server_nonce, b""))
        else:
            self.welcome(n)

    def proof(self, n: NodeState, c: wire.Challenge) -> None:
        if n.state != NodeStatus.JOINING or not self.keyring.check(b"node", n.server_nonce, n.nonce, c.proof):
            log.warning("node %r (%s) refused: wrong cluster key", n.name, n.ident.hex()[:10])
            self.send(n, wire.Bye("wrong cluster key"))
            self.forget(n)
            return
        # now the server proves it holds the key too, before anything else moves
        self.send(n, wire.Challenge(b"", self.keyring.proof(b"server", n.nonce, n.server_nonce)))
        self.welcome(n)

    def welcome(self, n: NodeState) -> None:
        n.state = NodeStatus.LOADING
        # the data link's token: derived from the handshake with a key (never sent), else random
        sent = b"" if self.keyring.enabled else secrets.token_bytes(32)
        n.data_token = self.keyring.proof(b"data", n.nonce, n.server_nonce) if self.keyring.enabled else sent
        self.send(n, self.welcome_msg(n, sent))
        log.info("node %d %r joined: %d cores, %.1f GB free, %.1f GFLOP/s%s", n.id, n.name, n.cores,
                 n.mem_bytes / 1e9, n.gflops, f", weight {n.weight_override}" if n.weight_override else "")
        self.joined(n)

    def link_owner(self, frames: list) -> tuple[NodeState | None, str]:
        """The welcomed node a new data link's first message proves it is, or why not."""
        try:
            hello = wire.decode(frames, wire.Limits())
        except wire.WireError as e:
            return None, str(e)
        if not isinstance(hello, wire.DataHello):
            return None, f"{hello.TYPE} instead of data_hello"
        n = self.members.nodes.get(hello.node_id)
        if n is None or n.state == NodeStatus.JOINING or not n.data_token:
            return None, f"no welcomed node {hello.node_id}"
        if not hmac.compare_digest(hello.token, n.data_token):
            return None, f"wrong token for node {hello.node_id}"
        return n, ""
