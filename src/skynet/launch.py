"""Start a real local cluster (server + nodes as processes on 127.0.0.1) and tear it down.

Used by `skynet run`, `make demo`, the benchmark and the cluster tests. Every process it starts
is tracked by PID and ended on exit, even when the caller fails.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class LocalCluster:
    def __init__(self, model: str | None = None, nodes: int = 2, server_args: list[str] = (),
                 node_args: list[str] = (), env: dict | None = None, log_dir: str | None = None):
        self.model, self.n_nodes = model, nodes
        self.server_args, self.node_args = list(server_args), list(node_args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="skynet-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port: int | None = None        # both bound by the server itself (port 0), then kept
        self.node_port: int | None = None   # for a restart
        self.server: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "skynet.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_server(self, timeout: float = 180) -> None:
        """The first start binds port 0 for both ports and reads what the server got from its
        port file; a restart asks for the same ports again (the nodes know the node port)."""
        ports = self.log_dir / "ports.json"
        ports.unlink(missing_ok=True)
        args = ["server", "--port", str(self.port or 0), "--node-port", str(self.node_port or 0),
                "--port-file", str(ports), *self.server_args]
        if self.model:
            args += ["--model", self.model]
        self.server = self._spawn("server", args)
        self.wait(ports.exists, timeout, "the server to bind its ports")
        bound = json.loads(ports.read_text())
        self.port, self.node_port = bound["port"], bound["node_port"]
        self.wait(lambda: self.get("/health") is not None, timeout, "server to answer /health")

    def add_node(self, name: str | None = None, args: list[str] = ()) -> subprocess.Popen:
        name = name or f"node{len(self.nodes)}"
        self.nodes[name] = self._spawn(name, ["node", "--server", f"127.0.0.1:{self.node_port}",
                                              "--name", name, *self.node_args, *args])
        return self.nodes[name]

    def signal_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.nodes[name]
        if p.poll() is None:
            p.send_signal(sig)

    def start(self, timeout: float = 180) -> "LocalCluster":
        self.start_server(timeout)
        for _ in range(self.n_nodes):
            self.add_node()
        if self.n_nodes:
            self.wait_active(self.n_nodes, timeout)
        return self

    def stop(self) -> None:
        """Nodes first (a graceful leave is quick while the server still runs), then the server;
        whatever has not exited after a few seconds is killed."""
        for group in ([p for p in self.nodes.values()], [self.server] if self.server else []):
            for p in group:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 5
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def get(self, path: str):
        try:
            r = httpx.get(self.url + path, timeout=5)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def cluster(self) -> dict:
        return self.get("/v1/cluster") or {}

    def active_nodes(self) -> list[dict]:
        view = self.cluster()
        return [n for n in view.get("nodes", []) if n["state"] == "active" and n["neurons"]]

    def wait_active(self, n: int, timeout: float = 60) -> None:
        self.wait(lambda: len(self.active_nodes()) == n and self.cluster().get("pending_epoch") is None,
                  timeout, f"{n} active nodes")

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(f"server exited ({self.server.returncode}) while waiting for {what}:\n"
                                   + self.log_tail("server"))
            if cond():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n" + self.log_tail("server"))

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def complete(self, prompt, max_tokens: int = 16, **kw) -> dict:
        r = httpx.post(self.url + "/v1/completions", timeout=300,
                       json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **kw})
        r.raise_for_status()
        return r.json()


def run_local(prompt: str, nodes: int, max_tokens: int, model: str | None, chat: bool,
              temperature: float, precision: str = "auto") -> int:
    """`skynet run`: a whole cluster for one prompt, with the answer streamed to stdout."""
    from .client import print_status, stream_completion

    print(f"starting a local cluster: server + {nodes} node(s) ...", file=sys.stderr, flush=True)
    with LocalCluster(model, nodes, server_args=["--precision", precision],
                      env={"SKYNET_NO_PROGRESS": "1"}) as lc:
        print(print_status(lc.cluster()), file=sys.stderr, flush=True)
        print(f"\n> {prompt}", flush=True)
        t0 = time.perf_counter()
        rc = stream_completion(lc.url, prompt, max_tokens, temperature, None, chat)
        mlp = lc.cluster().get("mlp", {})
        print(f"[{time.perf_counter() - t0:.1f}s; {mlp.get('calls', 0)} distributed MLP calls, "
              f"{mlp.get('fallbacks', 0)} fallbacks; logs in {lc.log_dir}]", file=sys.stderr)
        return rc
