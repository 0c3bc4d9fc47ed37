"""Server metrics: Prometheus counters/histograms/gauges and a tokens/s history for the dashboard.

One `Metrics` per Runtime, with its own `CollectorRegistry` (never the global default one, so
several runtimes can live in one process). Hooks, and the thread each runs in:

    request(n_prompt)        HTTP thread, when a request is queued
    token(seq)               engine thread, for every generated token
    node_reply(node, secs)   engine thread, for every node MLP reply (round trip)
    sample()                 engine thread, every loop iteration (records at most once a second)
    render(), history()      HTTP thread

prometheus_client metrics are thread-safe; the history ring buffer has its own lock. The per-node
round-trip series are removed once their node is no longer registered (at each sample and scrape).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the classic text format: every Prometheus version parses it
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class Metrics:
    def __init__(self, history_s: int = 300, interval_s: float = 1.0):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("skynet_requests", "Requests accepted", registry=r)
        self.prompt_tokens = Counter("skynet_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("skynet_generated_tokens", "Tokens generated", registry=r)
        self.rebalances = Counter("skynet_rebalances", "Plan switches (new epochs adopted)", registry=r)
        self.ttft = Histogram("skynet_time_to_first_token_seconds", "Submit to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("skynet_time_per_output_token_seconds",
                              "Time between consecutive generated tokens of a request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.node_rtt = Histogram("skynet_node_mlp_round_trip_seconds",
                                  "Send of an MLP call to a node's reply", ["node"],
                                  buckets=RTT_BUCKETS, registry=r)
        self.fallbacks = Counter("skynet_mlp_fallbacks", "Node ranges the server computed itself, by reason",
                                 ["reason"], registry=r)
        self._fallbacks_seen: dict[str, int] = {}
        self.active_nodes = Gauge("skynet_active_nodes", "Nodes serving the current plan", registry=r)
        self.epoch = Gauge("skynet_epoch", "Current plan epoch", registry=r)
        self.queued = Gauge("skynet_queued_requests", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("skynet_running_requests", "Requests in the running batch", registry=r)
        self._lock = threading.Lock()
        self._last_token: dict[int, float] = {}   # seq id -> time of its previous token
        self._tokens = 0                           # generated tokens, for the tokens/s samples
        self._seen_epoch = 0                       # newest epoch counted in `rebalances`
        self._node_names: set[str] = set()         # nodes with a node_rtt series
        self.interval_s = interval_s
        self._samples: deque[dict] = deque(maxlen=max(1, int(history_s / interval_s)))
        self._t_sample = time.monotonic()
        self._n_sample = 0
        self._cluster = self._engine = None

    # ------------------------------------------------------------------ wiring
    def bind(self, cluster, engine) -> "Metrics":
        """Read gauges (and rebalances) from these at scrape time."""
        self._cluster, self._engine = cluster, engine
        self.active_nodes.set_function(
            lambda: sum(1 for nid in list(cluster.plan.ranges) if cluster.serving(nid) is not None))
        self.epoch.set_function(lambda: cluster.epoch)
        self.queued.set_function(lambda: len(engine.waiting))
        self.running.set_function(lambda: len(engine.running))
        return self

    def _count_fallbacks(self) -> None:
        mlp = getattr(self._engine, "mlp", None)
        reasons = dict(getattr(mlp, "stats", {}).get("fallback_reasons", {}))
        for reason, n in reasons.items():
            if n > self._fallbacks_seen.get(reason, 0):
                self.fallbacks.labels(reason).inc(n - self._fallbacks_seen.get(reason, 0))
                self._fallbacks_seen[reason] = n

    # ------------------------------------------------------------------ hooks
    def request(self, prompt_tokens: int) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(prompt_tokens)

    def token(self, seq) -> None:
        now = time.perf_counter()
        self.generated_tokens.inc()
        self._tokens += 1
        prev = self._last_token.get(seq.id)
        if prev is None:
            self.ttft.observe(max(0.0, (seq.t_first or now) - seq.t_submit))
        else:
            self.tpot.observe(now - prev)
        self._last_token[seq.id] = now

    def finish(self, seq) -> None:
        self._last_token.pop(seq.id, None)

    def node_reply(self, node, seconds: float) -> None:
        with self._lock:
            self._node_names.add(node.name)
        self.node_rtt.labels(node.name).observe(seconds)

    def _drop_gone_nodes(self) -> None:
        """Remove the node_rtt series of nodes that are no longer registered: default names carry
        the PID, so keeping them would grow the series with every churn."""
        if not self._node_names or self._cluster is None:
            return
        present = {n.name for n in list(self._cluster.nodes.values())}
        with self._lock:
            gone, self._node_names = self._node_names - present, self._node_names & present
        for name in gone:
            try:
                self.node_rtt.remove(name)
            except KeyError:
                pass

    # ------------------------------------------------------------------ history (dashboard chart)
    def sample(self, now: float | None = None) -> None:
        """Record one (tokens/s, running, queued) point per interval; cheap to call often."""
        now = time.monotonic() if now is None else now
        dt = now - self._t_sample
        if dt < self.interval_s:
            return
        tokens = self._tokens
        point = {"t": round(time.time(), 3), "tokens_per_s": round((tokens - self._n_sample) / dt, 2),
                 "active": len(self._engine.running) if self._engine else 0,
                 "queued": len(self._engine.waiting) if self._engine else 0}
        self._t_sample, self._n_sample = now, tokens
        with self._lock:
            self._samples.append(point)
        self._count_rebalances()
        self._drop_gone_nodes()

    def history(self, since: float = 0.0) -> list[dict]:
        with self._lock:
            return [p for p in self._samples if p["t"] > since]

    # ------------------------------------------------------------------ scrape
    def _count_rebalances(self) -> None:
        """cluster.history holds the last 50 switches: count those newer than the last seen."""
        if self._cluster is None:
            return
        with self._lock:
            new = [h["epoch"] for h in list(self._cluster.history) if h["epoch"] > self._seen_epoch]
            if new:
                self.rebalances.inc(len(new))
                self._seen_epoch = max(new)

    def render(self) -> bytes:
        self._count_rebalances()
        self._count_fallbacks()
        self._drop_gone_nodes()
        return generate_latest(self.registry)
