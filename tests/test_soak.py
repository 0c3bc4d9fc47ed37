"""Soak: 500 sequential requests; resident memory of the server and the nodes grows < 10 %."""
from __future__ import annotations

import httpx

from skynet.launch import LocalCluster

REQUESTS, WARMUP = 500, 30


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def test_soak_500_requests_memory_is_flat():
    # Fixed weights and a generous deadline keep the plan still on a loaded CI box, so that
    # memory is compared between two moments with the same neuron ranges.
    with LocalCluster(None, 2, server_args=["--step-deadline-ms", "5000", "--miss-floor-ms", "5000"], node_args=["--weight", "1"],
                      env={"SKYNET_NO_PROGRESS": "1"}) as lc:
        procs = {"server": lc.server, **lc.nodes}
        prompts = [f"Request {i}: name a colour." for i in range(7)]
        with httpx.Client(base_url=lc.url, timeout=60) as http:
            def one(i: int) -> None:
                body = {"prompt": prompts[i % len(prompts)], "max_tokens": 3, "temperature": 0.7,
                        "seed": i, "stream": i % 5 == 0}
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
            for i in range(WARMUP):
                one(i)
            before = {k: rss_bytes(p.pid) for k, p in procs.items()}
            epoch = lc.cluster()["epoch"]
            for i in range(REQUESTS):
                one(i)
            after = {k: rss_bytes(p.pid) for k, p in procs.items()}
        view = lc.cluster()
        assert view["epoch"] == epoch, "the plan changed during the soak: memory is not comparable"
        report = {k: f"{before[k] / 2**20:.1f} -> {after[k] / 2**20:.1f} MiB "
                     f"({100 * (after[k] - before[k]) / before[k]:+.2f}%)" for k in procs}
        print("soak RSS after", REQUESTS, "requests:", report)
        assert view["requests"] >= REQUESTS + WARMUP
        assert len(lc.active_nodes()) == 2
        for k in procs:
            assert after[k] < 1.10 * before[k], report
