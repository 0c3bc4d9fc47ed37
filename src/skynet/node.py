"""A node: registers with the server, receives its MLP slices over the wire, serves partials.

It needs no model file. Per plan epoch it holds neurons [start, end) of every layer and answers
each `Mlp(step, epoch, layer, x)` with `MlpOut(step, epoch, layer, y)`, y = the slice's partial.
It keeps serving the old epoch while the next one loads, answers pings, leaves gracefully on
SIGTERM/Ctrl-C, and re-registers (with backoff) when the server goes quiet or restarts.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time

import numpy as np
import zmq

from . import clink, datalink, faults, fastframe, wire
from .assembly import LostBase, Slices
from .auth import Keyring
from .config import NodeConfig, parse_hostport
from .mlp import F32Format, QFormat
from .nodecache import NodeCache
from .placement import LOAD_FRAMES_IN_FLIGHT
from .polling import wait_readable

log = logging.getLogger("skynet.node")
STALL_HEARTBEATS = 10   # an assembly with no Assign/Load for this many heartbeats has stalled
LINK_WAIT_S = 0.01   # longest wait on the data link alone before the control socket is looked at


class _Rejoin(Exception):
    """Start a fresh session with the server."""


class Refused(RuntimeError):
    """The server refused this node (wrong cluster key, incompatible version...)."""


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.ctx = zmq.Context.instance()
        self.keyring = Keyring(cfg.cluster_key)
        self.slices: Slices | None = None   # what this session serves and assembles
        self.link: datalink.DataConn | None = None   # the direct data link, when the server offers one
        self.stopping = False
        self.served = 0
        self.lie = faults.lie_mode()   # test-only: malformed replies (see faults.py)
        self.cache = NodeCache(cfg.cache_dir, cfg.cache_max_bytes)   # a no-op without a directory
        self.last_transfer = time.monotonic()   # the last Assign or Load
        self.sock, self.last_alive = None, time.monotonic()   # this session's control socket
        self.loop = clink.NodeLoop()   # the compiled data-link loop's table of our slices

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Connect, serve, reconnect on silence; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff = 0.2
        while not self.stopping:
            try:
                served_before = self.served
                self._session()
                if self.stopping:
                    self.cache.flush()
                    return 0
                backoff = 0.2 if self.served > served_before else min(backoff * 2, 5.0)
            except Refused as e:
                log.error("refused by the server: %s", e)
                print(f"skynet node: refused by the server: {e}", flush=True)
                return 2
            log.info("reconnecting in %.1fs", backoff)
            time.sleep(backoff)
        return 0

    def _on_signal(self, *_):
        if self.stopping:  # second signal: leave now
            raise SystemExit(1)
        log.info("leave requested: asking the server to move my neurons elsewhere")
        self.stopping = True

    def _session(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, LOAD_FRAMES_IN_FLIGHT - 1)   # more Load frames wait on the server
        sock.connect(f"tcp://{self.cfg.server}")
        self.slices, self.sock = None, sock
        try:
            if not self._register(sock):
                return
            self._serve(sock)
        except _Rejoin:
            pass
        finally:
            self._unlink("session over")
            self.cache.release()
            self.sock = None
            sock.close(0)

    def _register(self, sock) -> bool:
        gflops = self.cfg.gflops or measure_gflops()
        mine, theirs, verified = self.keyring.nonce(), None, False
        hello = wire.Hello(self.cfg.name, os.cpu_count() or 1, self.cfg.max_memory or free_memory(),
                           gflops, self.cfg.weight, mine)
        sock.send_multipart(wire.encode(hello))
        deadline = time.monotonic() + self.cfg.register_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if not sock.poll(200):
                continue
            msg = self._decode(sock.recv_multipart(copy=False))
            if isinstance(msg, wire.Challenge) and msg.nonce:   # the server's challenge: prove first
                if not self.keyring.enabled:
                    raise Refused("the server requires a cluster key (--cluster-key or SKYNET_CLUSTER_KEY)")
                theirs = msg.nonce
                sock.send_multipart(wire.encode(wire.Challenge(b"", self.keyring.proof(b"node", theirs, mine))))
            elif isinstance(msg, wire.Challenge):                # the server's proof
                if theirs is None or not self.keyring.check(b"server", mine, theirs, msg.proof):
                    raise Refused("the server could not prove it holds our cluster key")
                verified = True
            elif isinstance(msg, wire.Bye):
                raise Refused(msg.reason)
            elif isinstance(msg, wire.Welcome):
                if self.keyring.enabled and not verified:
                    raise Refused("the server has no cluster key but this node was given one")
                self.welcomed(msg)
                log.info("registered as node %d with %s (%d layers, %d neurons)",
                         msg.node_id, msg.model, msg.layers, msg.neurons)
                self._link(msg, self.keyring.proof(b"data", mine, theirs) if verified else msg.data_token)
                sock.send_multipart(wire.encode(self.cache.holding(msg.model_hash)))
                return True
        log.warning("no answer from %s", self.cfg.server)
        return False

    def welcomed(self, w: wire.Welcome) -> None:
        """The model's shape and the weights' layout, as the server's Welcome states them."""
        self.welcome = w
        self.limits = wire.Limits(hidden=w.hidden, layers=w.layers, qtypes=w.qtypes)
        fmt = (QFormat.from_bytes(w.hidden, w.layers, w.qtypes, self.cfg.threads) if w.qtypes
               else F32Format(w.hidden))
        self.slices = Slices(w, fmt, self.cfg.name, self._keepalive)
        self.cache.open(w.model_hash, fmt, w.layers, w.neurons)

    def _link(self, w: wire.Welcome, token: bytes) -> None:
        """Open the direct data link the server offers; without it, Mlp comes over ZeroMQ."""
        if not w.data_port or not self.cfg.direct:
            return
        host = parse_hostport(self.cfg.server, 7000)[0]
        try:
            self.link = datalink.connect(host, w.data_port, wire.DataHello(w.node_id, token))
            self.link.delay_s = self.cfg.link_delay_ms / 1000   # not on the hello
            if self.link.delay_s:
                datalink.precise_timers()
            log.info("direct data link to %s:%d", host, w.data_port)
        except OSError as e:   # LinkError is one
            log.warning("no direct data link to %s:%d (%s); Mlp comes over ZeroMQ", host, w.data_port, e)

    def _unlink(self, why: str) -> None:
        if self.link is not None:
            log.warning("data link closed (%s); Mlp comes over ZeroMQ", why)
            self.link.close()
            self.link = None

    def _wait(self, sock, timeout_s: float) -> list:
        """Which of the control socket and the data link are readable (spin first if asked).

        With a link, only the link carries Mlp: once the control socket has nothing queued, wait
        on the link's socket alone (a plain poll, no zmq), LINK_WAIT_S at a time, then look at the
        control socket again. A control message waits at most that long while no Mlp comes."""
        if self.link is None:
            return [sock] if wait_readable(sock, timeout_s, self.cfg.spin_us / 1e6) else []
        ready = [self.link.fileno()] if self.link.readable(0.0) else []
        if sock.poll(0):   # both, when both have a message: a burst of loads does not hold up mlp
            return ready + [sock]
        if ready:
            return ready
        end = time.perf_counter() + self.cfg.spin_us / 1e6
        while time.perf_counter() < end:
            if self.link.readable(0.0):
                return [self.link.fileno()]
            os.sched_yield()
        if self.link.readable(min(timeout_s, LINK_WAIT_S)):
            return [self.link.fileno()]
        return [sock] if sock.poll(0) else []

    def _serve_link(self) -> None:
        """Messages from the data link: only Mlp belongs there; a broken link is closed. The
        compiled loop serves what it can (_link.c) and leaves anything else to the Python path."""
        try:
            if not self._serve_native():
                return
            msg = self._decode(self.link.recv_multipart(timeout=5.0), self.limits)
            if isinstance(msg, wire.Mlp):
                self._handle(self.link, msg)
            elif msg is not None:
                log.warning("dropped a %s on the data link", msg.TYPE)
        except datalink.LinkError as e:
            self._unlink(str(e))

    def _serve_native(self) -> bool:
        """Serve Mlp in the compiled loop for up to LINK_WAIT_S; True if a message waits for
        the Python path (always, where the loop does not apply: float32 slices, test faults)."""
        usable = clink.NATIVE and not self.lie and not self.cfg.delay_ms and self.slices is not None
        table = self.loop.table(self.slices) if usable else None
        if table is None:
            return True
        other, served, epoch = clink.serve_mlp(self.link, table, self.limits, self.cfg.threads, LINK_WAIT_S,
                                               self.cfg.spin_us / 1e6)
        if served:
            self.cache.release()   # as in _mlp: the server serves an epoch of ours
            self.served += served
            self.slices.switched(epoch)
        return other

    def _keepalive(self) -> None:
        """The server's pings queue behind weight loads on this one socket: while rows are being
        worked through, say we are alive on our own every half heartbeat, or it declares us dead.
        Called from the serve loop and between layers of bulk work (assembly.Slices)."""
        if self.sock is not None and time.monotonic() - self.last_alive >= self.welcome.heartbeat_s / 2:
            self.sock.send_multipart(wire.encode(wire.Pong(time.time())))
            self.last_alive = time.monotonic()

    def _serve(self, sock) -> None:
        quiet_limit = 3 * self.welcome.heartbeat_s + 1.0
        last_heard = self.last_alive = time.monotonic()
        asked_leave = False
        while True:
            self._keepalive()
            if self.stopping and not asked_leave:
                sock.send_multipart(wire.encode(wire.Bye("leaving")))
                asked_leave, leave_deadline = True, time.monotonic() + self.cfg.leave_timeout_s
            if asked_leave and time.monotonic() > leave_deadline:
                log.warning("server did not release me in time; leaving anyway")
                return
            if self._stalled():
                sock.send_multipart(wire.encode(wire.Bye("transfer stalled")))
                return
            ready = self._wait(sock, 0.1)
            if not ready:
                if time.monotonic() - last_heard > quiet_limit:
                    log.warning("server silent for %.1fs", time.monotonic() - last_heard)
                    return
                continue
            last_heard = time.monotonic()
            if self.link is not None and self.link.fileno() in ready:
                self._serve_link()
            if sock not in ready:
                continue
            msg = self._decode(sock.recv_multipart(copy=False), self.limits)
            if msg is None:
                continue
            if isinstance(msg, wire.Bye):
                log.info("server says bye: %s", msg.reason)
                if asked_leave:
                    self.stopping = True
                return
            self._handle(sock, msg)

    def _stalled(self) -> bool:
        """An epoch is being assembled but no rows came for STALL_HEARTBEATS heartbeats: the
        server dropped us (its bye may sit behind rows it queued) or lost track; start afresh."""
        quiet = time.monotonic() - self.last_transfer
        if self.slices is None or self.slices.pending is None or quiet < STALL_HEARTBEATS * self.welcome.heartbeat_s:
            return False
        log.warning("no rows for %.1fs while assembling epoch %d; registering again", quiet,
                    self.slices.pending.epoch)
        return True

    # ------------------------------------------------------------------ messages
    def _decode(self, frames, limits=wire.Limits()):
        try:
            return fastframe.decode(frames, limits)   # a fixed or a msgpack header
        except wire.WireError as e:
            log.warning("dropped a bad message: %s", e)
            return None

    def _handle(self, sock, msg) -> None:
        if isinstance(msg, wire.Mlp):
            self._mlp(sock, msg)
        elif isinstance(msg, wire.Ping):
            sock.send_multipart(wire.encode(wire.Pong(msg.ts)))
        elif isinstance(msg, (wire.Assign, wire.Load)):
            self.last_transfer = time.monotonic()
            try:
                done = self.slices.assign(msg) if isinstance(msg, wire.Assign) else self.slices.load(msg)
            except LostBase as e:
                log.error("%s; re-registering", e)
                sock.send_multipart(wire.encode(wire.Bye("lost base epoch")))
                raise _Rejoin() from e
            if isinstance(msg, wire.Assign) and msg.base:
                self.cache.release()   # the server has our Ready: it ships against served rows now
            elif isinstance(msg, wire.Assign) and done is None:
                done = self.cache.fill(self.slices, msg)
            if done is not None:
                sock.send_multipart(wire.encode(wire.Ready(done)))
                self.cache.save(self.slices, done, self.welcome.model_hash)

    def _mlp(self, sock, msg: wire.Mlp) -> None:
        self.cache.release()   # the server serves an epoch of ours: it has our Ready
        sl = self.slices.part(msg.epoch, msg.layer, msg.start, msg.end)
        if sl is None:
            log.warning("mlp for epoch %d [%d, %d), which I don't hold (have %s)", msg.epoch, msg.start,
                        msg.end, list(self.slices.served))
            return
        if self.cfg.delay_ms:
            time.sleep(self.cfg.delay_ms / 1000)
        x = msg.x.reshape(-1, msg.x.shape[-1])                      # (N, H)
        y = sl(x).reshape(msg.x.shape)                              # (..., H)
        out = wire.MlpOut(msg.step, msg.epoch, msg.layer, y, msg.start, msg.end)
        encode = fastframe.encode if sock is self.link else wire.encode   # the server's zmq side reads msgpack
        sock.send_multipart(encode(faults.lie(self.lie, out) if self.lie else out), copy=False)
        self.served += 1
        self.slices.switched(msg.epoch)   # the server has switched: older rows can go


def measure_gflops(seconds: float = 0.25, rounds: int = 5) -> float:
    """A short float32 matmul micro-benchmark shaped like decode work: the best of a few rounds,
    so a moment of contention (another process starting) does not brand the node slow."""
    a = np.random.default_rng(0).standard_normal((8, 1024), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((1024, 2048), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / rounds:
            a @ b
            n += 1
        best = max(best, 2 * 8 * 1024 * 2048 * n / (time.perf_counter() - t0) / 1e9)
    return best


def free_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return 8 << 30


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
