"""Cluster-key handshake: HMAC-SHA256 challenge-response, both ways, before any weight moves.

    node   -> server  Hello(nonce=Nn)
    server -> node    Challenge(nonce=Ns, proof=b"")
    node   -> server  Challenge(nonce=b"", proof=HMAC(K, "node" | Ns | Nn))
    server -> node    Challenge(nonce=b"", proof=HMAC(K, "server" | Nn | Ns)), Welcome(...)
                      (or Bye("wrong cluster key"))

Each side proves it holds K without sending it; fresh nonces on both sides stop replays. The node
proves first, so a stranger who connects to the node port gets no HMAC of K to attack offline.
Without a key the server welcomes directly, and a node that has a key refuses such a server.
"""
from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 16


class AuthError(RuntimeError):
    """The peer could not prove it holds the cluster key."""


class Keyring:
    def __init__(self, key: str | None):
        self.key = key.encode() if key else None

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @staticmethod
    def nonce() -> bytes:
        return os.urandom(NONCE_BYTES)

    def proof(self, role: bytes, first: bytes, second: bytes) -> bytes:
        if self.key is None:
            raise AuthError("no cluster key configured")
        return hmac.new(self.key, role + b"|" + first + b"|" + second, hashlib.sha256).digest()

    def check(self, role: bytes, first: bytes, second: bytes, proof: bytes) -> bool:
        if self.key is None or len(first) != NONCE_BYTES or len(second) != NONCE_BYTES:
            return False
        return hmac.compare_digest(self.proof(role, first, second), proof)
