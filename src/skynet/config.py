"""Typed, strict configuration for the server and the node (from flags and SKYNET_* env vars)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """An invalid setting; the message says which and why."""


def _port(name: str, v: int) -> None:
    if not 0 <= v <= 65535:
        raise ConfigError(f"{name} must be a port number 0..65535, got {v}")


def _positive(name: str, v: float, zero_ok: bool = False) -> None:
    if not (v >= 0 if zero_ok else v > 0):
        raise ConfigError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {v}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cpus(s: str) -> tuple[int, ...]:
    """"0", "0,2" or "0-3" -> CPU ids; "" -> () (no pinning)."""
    out: list[int] = []
    try:
        for part in filter(None, s.split(",")):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--cpus must look like 0 or 0,2 or 0-3, got {s!r}") from None
    if any(c < 0 for c in out):
        raise ConfigError(f"--cpus must list CPU ids >= 0, got {s!r}")
    return tuple(out)


def parse_hostport(s: str, default_port: int) -> tuple[str, int]:
    host, _, port = s.rpartition(":") if ":" in s else (s, "", str(default_port))
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"bad address {s!r}: port {port!r} is not a number") from None
    _port("port", p)
    return host or "127.0.0.1", p


@dataclass
class ServerConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    node_host: str = "127.0.0.1"
    node_port: int = 7000
    data_port: int = 0               # the nodes' direct data links (TCP); 0 = any free port
    direct: bool = True              # offer direct data links; False: Mlp over ZeroMQ only
    cluster_key: str | None = None
    api_key: str | None = None
    insecure: bool = False
    local_weight: float = 0.0        # the server's own share of neurons while nodes are present
    replicas: int = 1                # nodes holding each neuron range (replicas.py); 1 = no replicas
    hedge: str = "auto"              # auto: ask a replica once the primary is late; always: ask all
    heartbeat_s: float = 1.0
    step_deadline_ms: float = 300.0  # floor of the per-step deadline for node replies
    miss_floor_ms: float = 100.0     # a node's own reply-time distribution never misses it sooner
    reweight_s: float = 10.0         # how often node weights are re-estimated from latency
    settle_s: float = 1.0            # a join is planned once no other came for this long
    spin_us: float = 0.0             # spin (yielding) this long for node replies before blocking
    overlap: bool = False            # steps of 2+ sequences as two pipelined micro-batches
    max_batch: int = 16
    max_step_tokens: int = 512
    max_queue: int = 256
    threads: int = 1                 # BLAS threads for the server's own matmuls
    cpus: str = ""                   # pin the process to these CPUs ("0", "0-1"); "" = no pinning
    precision: str = "auto"          # exact | fast | auto (fast for quantized files, else exact)
    max_body_bytes: int = 0          # HTTP request body cap; 0 = from the model's context length

    def __post_init__(self):
        self.cluster_key = self.cluster_key or os.environ.get("SKYNET_CLUSTER_KEY") or None
        self.api_key = self.api_key or os.environ.get("SKYNET_API_KEY") or None
        _port("--port", self.port)
        _port("--node-port", self.node_port)
        _port("--data-port", self.data_port)
        parse_cpus(self.cpus)
        _positive("--local-weight", self.local_weight, zero_ok=True)
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        if self.hedge not in ("auto", "always"):
            raise ConfigError(f"--hedge must be auto or always, got {self.hedge!r}")
        _positive("--heartbeat", self.heartbeat_s)
        _positive("--step-deadline-ms", self.step_deadline_ms)
        _positive("--miss-floor-ms", self.miss_floor_ms)
        _positive("--reweight-s", self.reweight_s)
        _positive("--settle-s", self.settle_s, zero_ok=True)
        _positive("--max-body-bytes", self.max_body_bytes, zero_ok=True)
        for name in ("max_batch", "max_step_tokens", "max_queue", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.precision not in ("auto", "exact", "fast"):
            raise ConfigError(f"--precision must be exact, fast or auto, got {self.precision!r}")
        exposed = [h for h in (self.host, self.node_host) if not is_loopback(h)]
        if exposed and not self.insecure:
            if not is_loopback(self.node_host) and not self.cluster_key:
                raise ConfigError(f"refusing to bind the node port on {self.node_host} without a "
                                  f"cluster key: set --cluster-key (or pass --insecure)")
            if not is_loopback(self.host) and not self.api_key:
                raise ConfigError(f"refusing to bind the API on {self.host} without an API key: "
                                  f"set --api-key (or pass --insecure)")


DEFAULT_CACHE_DIR = "~/.cache/skynet/slices"
DEFAULT_CACHE_MAX_BYTES = 8 << 30


def resolve_cache_dir(given: str | None, disabled: bool) -> str | None:
    """The node's slice-cache directory, or None for no cache: --no-cache wins; then --cache-dir;
    then SKYNET_NO_CACHE=1 (the test suite sets it) and SKYNET_CACHE_DIR; then the default."""
    if disabled or given == "":
        return None
    if given:
        return os.path.expanduser(given)
    if os.environ.get("SKYNET_NO_CACHE", "") not in ("", "0"):
        return None
    return os.path.expanduser(os.environ.get("SKYNET_CACHE_DIR") or DEFAULT_CACHE_DIR)


@dataclass
class NodeConfig:
    server: str = "127.0.0.1:7000"
    name: str = ""
    weight: float = 0.0              # planning weight override; 0 = measured throughput
    max_memory: int = 0              # bytes offered for weights; 0 = free memory
    cluster_key: str | None = None
    threads: int = 1
    cpus: str = ""                   # pin the process to these CPUs ("1", "2-3"); "" = no pinning
    delay_ms: float = 0.0            # test-only: sleep before each MLP reply (a slow node)
    gflops: float = 0.0              # skip the micro-benchmark with this figure (tests)
    spin_us: float = 0.0             # spin (yielding) this long for the next request before blocking
    direct: bool = True              # use the server's direct data link when it offers one
    link_delay_ms: float = 0.0       # benchmarks: added one-way delay on each data-link reply
    register_timeout_s: float = 10.0
    leave_timeout_s: float = 30.0
    cache_dir: str | None = None     # the slice cache; None = env SKYNET_CACHE_DIR or DEFAULT_CACHE_DIR
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    no_cache: bool = False           # keep nothing on disk (env SKYNET_NO_CACHE=1 too, unless cache_dir is given)

    def __post_init__(self):
        self.cluster_key = self.cluster_key or os.environ.get("SKYNET_CLUSTER_KEY") or None
        self.cache_dir = resolve_cache_dir(self.cache_dir, self.no_cache)
        _positive("--cache-max-bytes", self.cache_max_bytes)
        host, port = parse_hostport(self.server, 7000)
        self.server = f"{host}:{port}"
        _positive("--weight", self.weight, zero_ok=True)
        _positive("--max-memory", self.max_memory, zero_ok=True)
        _positive("--delay-ms", self.delay_ms, zero_ok=True)
        _positive("--link-delay-ms", self.link_delay_ms, zero_ok=True)
        parse_cpus(self.cpus)
        if self.threads < 1:
            raise ConfigError("--threads must be >= 1")


def blas_threads(precision: str, threads: int) -> int:
    """BLAS threads of a process whose kernels run `threads` threads in `precision`.

    exact: the linear layers are BLAS GEMMs, so BLAS gets every thread. fast: the linear layers
    are our kernels (their own --threads workers) and BLAS only multiplies the small attention
    matrices, where a second OpenBLAS thread cost 4x the CPU of one on a 256-token prefill
    (it spins, and fights the kernel workers for the cores): 1."""
    if threads < 1:
        raise ConfigError("--threads must be >= 1")
    return threads if precision == "exact" else 1
