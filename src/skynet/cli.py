"""`skynet` command line: server, node, client, run, status, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys

from .config import DEFAULT_CACHE_MAX_BYTES, ConfigError, NodeConfig, ServerConfig, blas_threads

DEFAULT_URL = "http://127.0.0.1:8000"


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _pin(cpus: str) -> None:
    """Pin this process (benchmarks that emulate one machine per core)."""
    from .config import parse_cpus
    ids = parse_cpus(cpus)
    if ids:
        os.sched_setaffinity(0, ids)
        logging.getLogger("skynet").info("pinned to CPUs %s", list(ids))


def _threads(n: int) -> None:
    """Cap BLAS threads: several processes share few cores."""
    import numpy  # noqa: F401  (load OpenBLAS first, so the limit applies to it)
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)


def cmd_server(a) -> int:
    cfg = ServerConfig(model=a.model, host=a.host, port=a.port, node_host=a.node_host,
                       node_port=a.node_port, data_port=a.data_port, direct=not a.no_direct,
                       cluster_key=a.cluster_key, api_key=a.api_key,
                       insecure=a.insecure, local_weight=a.local_weight, heartbeat_s=a.heartbeat,
                       replicas=a.replicas, hedge=a.hedge, step_deadline_ms=a.step_deadline_ms,
                       miss_floor_ms=a.miss_floor_ms,
                       reweight_s=a.reweight_s, settle_s=a.settle_s, spin_us=a.spin_us,
                       overlap=a.overlap, cpus=a.cpus, max_batch=a.max_batch,
                       max_step_tokens=a.max_step_tokens, max_queue=a.max_queue, threads=a.threads,
                       precision=a.precision, max_body_bytes=a.max_body_bytes)
    if a.insecure:
        logging.getLogger("skynet").warning(
            "--insecure: ports may be exposed without a key. Anyone who can reach them can use them.")
    _pin(cfg.cpus)
    _threads(cfg.threads)
    import uvicorn

    from .api import create_app
    from .runtime import Runtime

    rt = Runtime(cfg)
    _threads(blas_threads(rt.precision, cfg.threads))   # the precision is known once the model is open
    rt.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; under the default handler that kills
    # the process before `finally` runs, and the nodes never hear "server shutting down".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        sock = listen(cfg.host, cfg.port)   # --port 0: the kernel picks a free port, no race
        port = sock.getsockname()[1]
        logging.getLogger("skynet.server").info("API on http://%s:%d", cfg.host, port)
        if a.port_file:
            write_ports(a.port_file, port, cfg.node_port)
        uvicorn.Server(uvicorn.Config(create_app(rt), log_level="warning")).run(sockets=[sock])
    finally:
        rt.close()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = any free port), for uvicorn to serve on.

    TCP_NODELAY (accepted connections inherit it): without it a response's body waited for the
    client's delayed ACK of its headers, ~40 ms per keep-alive request and per streamed chunk."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def write_ports(path: str, port: int, node_port: int) -> None:
    """The bound ports as JSON, written whole (rename) so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "node_port": node_port}, f)
    os.replace(tmp, path)


def cmd_node(a) -> int:
    name = a.name
    if not name:
        from .node import default_name
        name = default_name()
    cfg = NodeConfig(server=a.server, name=name, weight=a.weight, max_memory=a.max_memory,
                     cluster_key=a.cluster_key, threads=a.threads, delay_ms=a.delay_ms, gflops=a.gflops,
                     spin_us=a.spin_us, direct=not a.no_direct, link_delay_ms=a.link_delay_ms,
                     cpus=a.cpus, cache_dir=a.cache_dir, cache_max_bytes=a.cache_max_bytes,
                     no_cache=a.no_cache)
    _pin(cfg.cpus)
    _threads(cfg.threads)
    from .node import Node
    return Node(cfg).run()


def cmd_client(a) -> int:
    from .client import stream_completion
    return stream_completion(a.url, a.prompt, a.max_tokens, a.temperature, a.seed, a.chat, a.api_key)


def cmd_bench_rtt(a) -> int:
    from .bench_rtt import measure, table
    r = measure(hidden=a.hidden, layers=a.layers, steps=a.steps, rounds=a.rounds, nodes=a.nodes, spin_us=a.spin_us)
    if a.delays:
        from .bench_rtt import measure_delays
        r["delays"] = measure_delays([float(d) for d in a.delays.split(",")], a.hidden, a.layers, nodes=a.nodes)
    print(json.dumps(r, indent=2) if a.json else table(r))
    return 0


def cmd_bench_emul(a) -> int:
    from .bench_emul import DELAYS_MS, delayed, pinned, table
    from .loader import open_model
    precision = open_model(a.model).precision(a.precision)
    r = {"precision": precision}
    if not a.no_pinned:
        r["pinned"] = pinned(a, precision, a.tokens, a.reps, a.spin_us)
    delays = [float(d) for d in a.delays.split(",")] if a.delays else list(DELAYS_MS)
    if delays != [-1.0]:
        r["delayed"] = delayed(a, precision, a.tokens, a.reps, delays, a.spin_us)
    print(json.dumps(r, indent=2) if a.json else table(r))
    return 0


def cmd_bench_replicas(a) -> int:
    from .bench_replicas import main as replicas_main
    return replicas_main(a)


def cmd_status(a) -> int:
    from .client import get_json, print_status
    view = get_json(a.url + "/v1/cluster", a.api_key)
    print(json.dumps(view, indent=2) if a.json else print_status(view))
    return 0


def cmd_run(a) -> int:
    from .launch import run_local
    return run_local(a.prompt, a.nodes, a.max_tokens, a.model, a.chat, a.temperature, a.precision)


def cmd_bench(a) -> int:
    from .bench import main as bench_main
    return bench_main(a)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skynet", description="Run an LLM across several machines.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("server", help="load the model and serve the API; nodes connect to it")
    s.add_argument("--model", help="local HF dir, .gguf file or cached hub id (default: SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="API address")
    s.add_argument("--port", type=int, default=8000, help="API port (0 = any free)")
    s.add_argument("--port-file", default=None,
                   help="once both ports are bound, write them here as JSON {\"port\", \"node_port\"}")
    s.add_argument("--node-host", default="127.0.0.1", help="address nodes connect to")
    s.add_argument("--node-port", type=int, default=7000, help="port nodes connect to (0 = any free)")
    s.add_argument("--data-port", type=int, default=0, help="port of the nodes' direct data links (0 = any free)")
    s.add_argument("--no-direct", action="store_true", help="no direct data links: per-layer traffic over ZeroMQ")
    s.add_argument("--cluster-key", default=None, help="shared secret nodes must prove (env SKYNET_CLUSTER_KEY)")
    s.add_argument("--api-key", default=None, help="bearer key for the HTTP API (env SKYNET_API_KEY)")
    s.add_argument("--insecure", action="store_true", help="allow non-loopback binds without keys")
    s.add_argument("--local-weight", type=float, default=0.0, help="server's own share while nodes serve")
    s.add_argument("--replicas", type=int, default=1,
                   help="nodes holding each neuron range; a late or lost primary's range goes to a replica")
    s.add_argument("--hedge", choices=("auto", "always"), default="auto",
                   help="replicas: ask one once the primary is late (auto), or every holder at once (always)")
    s.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    s.add_argument("--step-deadline-ms", type=float, default=300.0, help="floor of a step's node deadline")
    s.add_argument("--miss-floor-ms", type=float, default=100.0,
                   help="a node's silence never counts as a miss sooner than this, or than --step-deadline-ms "
                        "if lower (noisy hosts: raise both)")
    s.add_argument("--reweight-s", type=float, default=10.0, help="seconds between latency re-weighting")
    s.add_argument("--settle-s", type=float, default=1.0,
                   help="plan a join once no other came for this long (nodes started together: one plan)")
    s.add_argument("--spin-us", type=float, default=0.0, help="spin this long for node replies before blocking")
    s.add_argument("--cpus", default="", help="pin the server to these CPUs, e.g. 0 or 0-1")
    s.add_argument("--overlap", action="store_true",
                   help="steps of 2+ sequences as two micro-batches overlapping server and nodes")
    s.add_argument("--max-batch", type=int, default=16, help="sequences per step")
    s.add_argument("--max-step-tokens", type=int, default=512, help="rows per step (prefill chunking)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--threads", type=int, default=1, help="BLAS and kernel threads of the server")
    s.add_argument("--precision", choices=("auto", "exact", "fast"), default="auto",
                   help="fast: quantized blocks + 8-bit activations; exact: float32 (default: fast for "
                        "quantized files, exact for float checkpoints)")
    s.add_argument("--max-body-bytes", type=int, default=0,
                   help="HTTP request body cap, 413 beyond it (default: from the context length)")
    s.set_defaults(fn=cmd_server)

    n = sub.add_parser("node", help="join a server and compute a slice of every MLP")
    n.add_argument("--server", default="127.0.0.1:7000", help="server's node address host:port")
    n.add_argument("--name", default="", help="node name (default: host-pid)")
    n.add_argument("--weight", type=float, default=0.0, help="planning weight (default: measured GFLOP/s)")
    n.add_argument("--max-memory", type=int, default=0, help="bytes offered for weights (default: free memory)")
    n.add_argument("--cluster-key", default=None, help="shared secret (env SKYNET_CLUSTER_KEY)")
    n.add_argument("--threads", type=int, default=1, help="BLAS and kernel threads of the node")
    n.add_argument("--spin-us", type=float, default=0.0, help="spin this long for the next request before blocking")
    n.add_argument("--cpus", default="", help="pin the node to these CPUs, e.g. 1 or 2-3")
    n.add_argument("--no-direct", action="store_true", help="ignore the server's direct data link")
    n.add_argument("--cache-dir", default=None,
                   help="slice cache (default: env SKYNET_CACHE_DIR or ~/.cache/skynet/slices)")
    n.add_argument("--cache-max-bytes", type=int, default=DEFAULT_CACHE_MAX_BYTES,
                   help="cap on the slice cache; least recently used models are evicted first")
    n.add_argument("--no-cache", action="store_true", help="keep no slices on disk")
    n.add_argument("--link-delay-ms", type=float, default=0.0,
                   help="benchmarks: added one-way delay each way on the data link")
    n.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow node
    n.add_argument("--gflops", type=float, default=0.0, help=argparse.SUPPRESS)
    n.set_defaults(fn=cmd_node)

    c = sub.add_parser("client", help="stream a completion to stdout")
    c.add_argument("prompt")
    c.add_argument("max_tokens", nargs="?", type=int, default=64)
    c.add_argument("--url", default=DEFAULT_URL)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--chat", action="store_true", help="use the chat template")
    c.add_argument("--api-key", default=os.environ.get("SKYNET_API_KEY"))
    c.set_defaults(fn=cmd_client)

    st = sub.add_parser("status", help="show the cluster: nodes, ranges, latency, rebalances")
    st.add_argument("--url", default=DEFAULT_URL)
    st.add_argument("--json", action="store_true")
    st.add_argument("--api-key", default=os.environ.get("SKYNET_API_KEY"))
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("run", help="start a local cluster, answer one prompt, stop it")
    r.add_argument("prompt")
    r.add_argument("--nodes", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--model", default=None)
    r.add_argument("--chat", action="store_true", help="use the chat template")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--precision", choices=("auto", "exact", "fast"), default="auto",
                   help="as for `skynet server`")
    r.set_defaults(fn=cmd_run)

    b = sub.add_parser("bench", help="benchmark against HF transformers on this machine")
    b.add_argument("--model", default=None)
    b.add_argument("--nodes", type=int, default=2)
    b.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    b.add_argument("--prompt-tokens", type=int, default=256)
    b.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    b.add_argument("--precision", choices=("auto", "exact", "fast"), default="auto",
                   help="SkyNet's precision for the main figures (an exact run is always added)")
    b.add_argument("--out", default="bench-out", help="folder for results.json and the plot")
    b.set_defaults(fn=cmd_bench)
    br = sub.add_parser("bench-rtt", help="round trip per layer (no node compute) against raw TCP")
    br.add_argument("--nodes", type=int, default=2)
    br.add_argument("--hidden", type=int, default=576, help="row width (SmolLM2-135M: 576)")
    br.add_argument("--layers", type=int, default=30)
    br.add_argument("--steps", type=int, default=40, help="steps per round and transport")
    br.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    br.add_argument("--spin-us", type=float, default=0.0, help="server and nodes spin this long before blocking")
    br.add_argument("--delays", default="", help="also the direct link with these added one-way delays (ms), e.g. 0,0.1,0.25,0.5")
    br.add_argument("--json", action="store_true")
    br.set_defaults(fn=cmd_bench_rtt)
    be = sub.add_parser("bench-emul", help="two machines emulated: pinned cores and added link delays")
    be.add_argument("--model", default=None, help="as the server's --model")
    be.add_argument("--precision", choices=("auto", "exact", "fast"), default="auto")
    be.add_argument("--tokens", type=int, default=64, help="tokens per request")
    be.add_argument("--reps", type=int, default=2, help="timed requests per figure")
    be.add_argument("--spin-us", type=float, default=1000.0,
                    help="server and node spin this long before blocking (each has a core of its own)")
    be.add_argument("--delays", default="", help="one-way link delays in ms (default 0,0.1,0.25,0.5; -1 = none)")
    be.add_argument("--no-pinned", action="store_true", help="skip the pinned comparison")
    be.add_argument("--no-overlap", dest="overlap", action="store_false",
                    help="pinned server without --overlap (two micro-batches for 2+ streams)")
    be.add_argument("--out", default="bench-out", help="folder for the clusters' logs")
    be.add_argument("--json", action="store_true")
    be.set_defaults(fn=cmd_bench_emul)
    bp = sub.add_parser("bench-replicas", help="replicas: the gap when a node is killed, and the cost per token")
    bp.add_argument("--model", default=None)
    bp.add_argument("--precision", choices=("auto", "exact", "fast"), default="auto")
    bp.add_argument("--tokens", type=int, default=32, help="decode tokens per cost measurement")
    bp.add_argument("--reps", type=int, default=3, help="timed requests per setup")
    bp.add_argument("--out", default="bench-out", help="folder for replicas.json and the logs")
    bp.set_defaults(fn=cmd_bench_replicas)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    _logging(a.verbose)
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"skynet {a.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from .arch import UnsupportedModel
        from .loader import ModelNotFound
        if isinstance(e, (UnsupportedModel, ModelNotFound)):
            print(f"skynet {a.cmd}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
