"""Who is in the cluster: each node's state, identity, capacity and observed latency.

A node goes JOINING (handshake) -> LOADING (welcomed, rows arriving) -> ACTIVE (serves a plan)
-> DRAINING (asked to leave; serves until the next plan) -> GONE. Plain bookkeeping: no sockets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from .placement import Candidate
from .replicas import Latency, observe

EMA = 0.2   # weight of a new latency sample


class NodeStatus(StrEnum):
    JOINING = "joining"
    LOADING = "loading"
    ACTIVE = "active"
    DRAINING = "draining"
    GONE = "gone"


@dataclass
class NodeState:
    id: int
    ident: bytes                    # its ZeroMQ routing id (control channel)
    name: str
    cores: int
    mem_bytes: int
    gflops: float
    weight_override: float
    state: NodeStatus = NodeStatus.JOINING
    nonce: bytes = b""
    server_nonce: bytes = b""
    data_token: bytes = b""         # what its direct data link must present
    link: object = None             # its DataConn (datalink.py) once that link proved itself
    assigned: dict = field(default_factory=dict)   # epoch -> (start, end)
    ready_epoch: int = -1
    load_epoch: int = -1            # last epoch assigned to it; it assembles that before any Mlp
    last_seen: float = field(default_factory=time.monotonic)
    joined: float = field(default_factory=time.time)
    latency_ema: float | None = None  # seconds per MLP call, scaled to 1 row-block
    samples: int = 0                  # latency samples since the last plan switch
    lat: Latency | None = None        # reply-time distribution (mean, deviation), 1-row calls
    observed: float = 0.0             # weight re-estimated from latency (neurons / s), 0 = none yet
    bad: int = 0
    misses: int = 0                   # consecutive missed step deadlines
    bytes_sent: int = 0
    reported: bool = False                  # it sent its Holding: only then is it planned
    cached: tuple[int, int] | None = None   # rows its slice cache holds (Holding), before it serves any

    @property
    def weight(self) -> float:
        return self.weight_override or self.observed or max(self.gflops, 1e-3)

    @property
    def serving(self) -> bool:
        return self.state in (NodeStatus.ACTIVE, NodeStatus.DRAINING)

    def held(self) -> tuple[int, int] | None:
        return self.assigned.get(self.ready_epoch)

    @property
    def loading_rows(self) -> bool:
        """It is assembling a new epoch (rows queued ahead of any Mlp, then copying them into slices):
        an Mlp sent now would wait behind that work and miss its step deadline."""
        return self.ready_epoch < self.load_epoch

    def observe_latency(self, scaled_s: float) -> None:
        """One reply's round trip, scaled to a 1-row call."""
        self.latency_ema = scaled_s if self.latency_ema is None else (1 - EMA) * self.latency_ema + EMA * scaled_s
        self.lat = observe(self.lat, scaled_s, EMA)
        self.samples += 1
        self.misses = 0

    def candidate(self) -> Candidate:
        return Candidate(self.id, self.gflops, self.mem_bytes, self.weight_override, self.observed)


class Membership:
    """Registered nodes by id and by control-channel identity."""

    def __init__(self):
        self.nodes: dict[int, NodeState] = {}
        self.by_ident: dict[bytes, int] = {}
        self.next_id = 1

    def add(self, ident: bytes, name: str, cores: int, mem_bytes: int, gflops: float,
            weight: float, nonce: bytes) -> NodeState:
        n = NodeState(self.next_id, ident, name, cores, mem_bytes, gflops, weight, nonce=nonce)
        self.next_id += 1
        self.nodes[n.id], self.by_ident[ident] = n, n.id
        return n

    def by_identity(self, ident: bytes) -> NodeState | None:
        nid = self.by_ident.get(ident)
        return self.nodes.get(nid) if nid is not None else None

    def forget(self, n: NodeState) -> None:
        n.state = NodeStatus.GONE
        self.by_ident.pop(n.ident, None)
        self.nodes.pop(n.id, None)

    def serving(self, nid: int) -> NodeState | None:
        n = self.nodes.get(nid)
        return n if n is not None and n.serving else None

    def plannable(self) -> list[NodeState]:
        """Nodes a new plan may include, oldest first (the plan lays ranges out in this order)."""
        return [n for n in sorted(self.nodes.values(), key=lambda n: n.id)
                if n.state in (NodeStatus.LOADING, NodeStatus.ACTIVE)]
