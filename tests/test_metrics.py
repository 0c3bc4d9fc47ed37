"""/metrics (Prometheus text) and the tokens/s history, against a live server with one node."""
from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skynet.launch import LocalCluster
from skynet.metrics import Metrics


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(model=None, nodes=1, env={"SKYNET_NO_PROGRESS": "1"}) as c:
        yield c


def scrape(url: str) -> dict:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_completion_moves_the_counters(lc):
    lc.wait_active(1)   # a busy machine can make the node miss heartbeats; wait until it serves
    before = scrape(lc.url)
    n = 7
    r = httpx.post(lc.url + "/v1/completions", timeout=120,
                   json={"prompt": "The capital of France is", "max_tokens": n, "temperature": 0})
    r.raise_for_status()
    usage = r.json()["usage"]
    assert 1 <= usage["completion_tokens"] <= n
    after = scrape(lc.url)

    def delta(name, **labels):
        return val(after, name, **labels) - val(before, name, **labels)

    assert delta("skynet_generated_tokens_total") == usage["completion_tokens"]
    assert delta("skynet_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("skynet_requests_total") == 1
    assert delta("skynet_time_to_first_token_seconds_count") == 1
    assert delta("skynet_time_per_output_token_seconds_count") == usage["completion_tokens"] - 1
    # every layer of every step went to the node: its round trips were timed
    assert delta("skynet_node_mlp_round_trip_seconds_count", node="node0") > 0


def test_gauges_match_the_cluster_view(lc):
    for _ in range(20):   # a snapshot with no plan change between the view and the scrape
        view = lc.cluster()
        m = scrape(lc.url)
        if lc.cluster()["epoch"] == view["epoch"] and view["pending_epoch"] is None:
            break
        time.sleep(0.5)
    serving = [n for n in view["nodes"] if n["state"] == "active" and n["neurons"]]
    assert val(m, "skynet_active_nodes") == len(serving)
    assert val(m, "skynet_epoch") == view["epoch"] >= 1
    assert val(m, "skynet_queued_requests") == view["queued_requests"] == 0
    assert val(m, "skynet_running_requests") == view["active_requests"] == 0
    switches = len(view["rebalances"])   # the view keeps the last 50
    assert switches >= 1
    assert val(m, "skynet_rebalances_total") == switches if switches < 50 else val(m, "skynet_rebalances_total") >= 50


def test_tokens_per_second_history(lc):
    lc.complete("Once upon a time", max_tokens=6)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # the engine thread records one sample a second
        samples = httpx.get(lc.url + "/v1/stats/history", timeout=10).json()["samples"]
        if any(p["tokens_per_s"] > 0 for p in samples):
            break
        time.sleep(0.5)
    assert any(p["tokens_per_s"] > 0 for p in samples), samples
    ts = [p["t"] for p in samples]
    assert ts == sorted(ts) and all({"active", "queued"} <= p.keys() for p in samples)
    newest = httpx.get(lc.url + "/v1/stats/history", params={"since": ts[-1]}, timeout=10).json()
    assert all(p["t"] > ts[-1] for p in newest["samples"])


def test_open_paths_without_api_key():
    """With an API key set, the dashboard, its static files and /metrics stay open; the API does not."""
    from fastapi.testclient import TestClient

    from skynet.api import create_app

    rt = SimpleNamespace(cfg=SimpleNamespace(api_key="sekrit", max_body_bytes=0),
                         arch=SimpleNamespace(max_context=512), metrics=Metrics())
    client = TestClient(create_app(rt))
    for path in ("/", "/static/app.js", "/static/style.css", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert "SkyNet" in client.get("/").text
    assert client.get("/v1/stats/history").status_code == 401
    assert client.get("/static/other.js").status_code == 401   # only the listed files are open
    key = {"Authorization": "Bearer sekrit"}
    assert client.get("/static/other.js", headers=key).status_code == 404
    ok = client.get("/v1/stats/history", headers=key)
    assert ok.status_code == 200 and ok.json()["samples"] == []


def test_rebalance_counter_and_history_unit():
    """Rebalances are counted from cluster.history once each, even after it is trimmed."""
    cluster = SimpleNamespace(history=[{"epoch": 1}], epoch=1, plan=SimpleNamespace(ranges={}),
                              serving=lambda nid: None)
    engine = SimpleNamespace(running=[], waiting=[])
    m = Metrics().bind(cluster, engine)

    def rebalances():
        fams = text_string_to_metric_families(m.render().decode())
        return next(s.value for f in fams for s in f.samples if s.name == "skynet_rebalances_total")

    assert rebalances() == 1
    cluster.history = [{"epoch": 1}, {"epoch": 3}, {"epoch": 4}]
    assert rebalances() == 3
    cluster.history = [{"epoch": 4}]   # trimmed: nothing new
    assert rebalances() == 3
    seq = SimpleNamespace(id=1, t_submit=0.0, t_first=None)
    m.sample(now=time.monotonic() + 10)   # first point: no tokens yet
    for _ in range(5):
        m.token(seq)
    m.finish(seq)
    m.sample(now=time.monotonic() + 20)
    points = m.history()
    assert len(points) == 2 and points[0]["tokens_per_s"] == 0 and points[1]["tokens_per_s"] > 0


def test_node_series_removed_when_the_node_is_gone():
    """node_rtt keeps one label set per node name: a node that is lost (or released) loses its
    series, so names with PIDs in them do not pile up with churn; a registered node keeps its."""
    import numpy as np

    from skynet import wire
    from skynet.cluster import Cluster
    from skynet.config import ServerConfig
    from skynet.mlp import MLPWeights

    rng = np.random.default_rng(0)
    mats = [[rng.standard_normal((12, 8), dtype=np.float32) for _ in range(2)] for _ in range(3)]
    cluster = Cluster(ServerConfig(node_port=0), MLPWeights(*mats), "m")
    try:
        m = Metrics().bind(cluster, SimpleNamespace(running=[], waiting=[]))
        for i, name in enumerate(("host-101", "host-102")):
            cluster.handle([b"peer%d" % i, *wire.encode(wire.Hello(name, 2, 1 << 30, 1.0, 0.0, b"\0" * 16))])
        a, b = sorted(cluster.nodes.values(), key=lambda n: n.name)
        for n in (a, b):
            m.node_reply(n, 0.002)

        def series():
            fams = text_string_to_metric_families(m.render().decode())
            return {s.labels["node"] for f in fams for s in f.samples
                    if s.name.startswith("skynet_node_mlp_round_trip_seconds")}

        assert series() == {"host-101", "host-102"}
        cluster.lose(a, "test")
        assert series() == {"host-102"}
        m.node_reply(b, 0.003)
        m.sample(now=time.monotonic() + 10)   # the engine thread's periodic call prunes too
        cluster.lose(b, "test")
        m.sample(now=time.monotonic() + 20)
        assert m.node_rtt.collect()[0].samples == [] and series() == set()
    finally:
        cluster.close()
