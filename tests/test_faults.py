"""Faults inside one server: nodes that lie, steps that raise, callbacks that raise.

The invariant is the one the design promises: whatever one node or one request does wrong, the
other requests finish with exactly the tokens of an undisturbed run.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import load_model
from skynet import faults, wire
from skynet.config import ServerConfig
from skynet.engine import Engine
from skynet.cli import listen
from skynet.mlp import LocalMLP
from skynet.sampling import SamplingParams

PROMPT = [1, 504, 3458, 282, 4649]
OTHER = [1, 1183, 314, 253, 1607, 30]
GREEDY = SamplingParams()


# ---------------------------------------------------------------------------- lying nodes
def test_lie_modes_change_what_a_node_sends():
    y = np.ones((3, 8), np.float32)
    honest = wire.MlpOut(5, 2, 1, y)
    got = {m: faults.lie(m, honest) for m in faults.MODES}
    assert got["rows"].y.shape == (6, 8) and got["width"].y.shape == (3, 9)
    assert np.isnan(got["nan"].y).any() and not np.isnan(y).any()
    assert got["dtype"].y.dtype == np.float16
    assert (got["stale"].step, got["stale"].epoch, got["stale"].layer) == (4, 2, 1)


@pytest.mark.parametrize("mode", faults.MODES)
def test_lying_node_is_computed_around_and_dropped(tiny_model, nodes, mode, caplog):
    """Node n1 (a real process) sends a malformed reply to every MLP call: its range is computed
    by the server for that call, it is counted as bad and planned out after the limit, the
    honest node is never blamed, and the tokens are those of a run with no nodes at all."""
    model = load_model(tiny_model("llama"))
    want = Engine(model, LocalMLP(model.mlp_weights)).generate(PROMPT, 12).out
    caplog.set_level(logging.WARNING, logger="skynet")
    with nodes(model, 2, envs=[{}, {faults.ENV: mode}], deadline_s=1.0) as nc:
        liar = next(n for n in nc.cluster.nodes.values() if n.name == "n1")
        got = nc.engine.generate(PROMPT, 12).out
        assert got == want, nc.logs()
        assert nc.mlp.stats["fallbacks"] > 0
        assert liar.state == "gone" and liar.id not in nc.cluster.nodes, nc.logs()
        lost = [r.getMessage() for r in caplog.records if "'n1' lost" in r.getMessage()]
        assert lost, nc.logs()
        assert not any("'n0' lost" in r.getMessage() or "from node 'n0'" in r.getMessage()
                       for r in caplog.records)
        honest = next(n for n in nc.cluster.nodes.values() if n.name == "n0")
        assert honest.bad == 0 and honest.state == "active"
        # and it goes on: the same answer again, whatever the liar does after re-registering
        assert nc.engine.generate(PROMPT, 12).out == want


# ---------------------------------------------------------------------------- the engine thread
@pytest.fixture
def runtime(tiny_model):
    """Factory of in-process Runtimes on the tiny model (engine thread not started), closed after;
    with the undisturbed greedy answers of PROMPT and OTHER (8 tokens, EOS ignored) as `want`."""
    from skynet.runtime import Runtime

    model_dir = tiny_model("llama")
    model = load_model(model_dir)
    ref = Engine(model, LocalMLP(model.mlp_weights))
    want = {tuple(p): ref.generate(p, 8).out for p in (PROMPT, OTHER)}
    made = []

    def make(**cfg):
        rt = Runtime(ServerConfig(model=str(model_dir), node_port=0, **cfg))
        rt.want = want
        made.append(rt)
        return rt

    yield make
    for rt in made:
        if rt.thread.ident is None:
            rt.cluster.close()
        else:
            rt.close()


def submit(rt, prompt):
    return rt.submit(list(prompt), 8, GREEDY, ignore_eos=True)


def finished(*streams, timeout: float = 60):
    for s in streams:
        assert s.done.wait(timeout), f"request {s.seq.id} never finished"


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(runtime):
    """max_batch 1: the step that raises holds only the first request; the second, waiting,
    then runs to the undisturbed answer, and the engine thread is still alive."""
    rt = runtime(max_batch=1)
    real, calls = rt.model.forward, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected step failure")
        return real(*args, **kw)

    rt.model.forward = flaky
    a, b = submit(rt, PROMPT), submit(rt, OTHER)
    rt.start()
    finished(a, b)
    assert a.finish_reason == "error"
    assert (b.finish_reason, b.seq.out) == ("length", rt.want[tuple(OTHER)])
    assert rt.thread.is_alive() and rt.health() is None
    c = submit(rt, PROMPT)
    finished(c)
    assert (c.finish_reason, c.seq.out) == ("length", rt.want[tuple(PROMPT)])


def test_a_whole_response_wakes_the_event_loop_once(runtime):
    """A streamed request's queue gets its text as it comes; a whole (non-streaming) one gets its
    finish only (`live=False`), with the same text and tokens: the event loop is not woken for
    every token of a response nobody reads before it ends."""
    import asyncio

    rt = runtime(max_batch=2)

    async def events(stream):
        out = []
        while not out or out[-1][2] is None:
            out.append(await asyncio.wait_for(stream.queue.get(), 60))
        return out

    async def run():
        loop = asyncio.get_running_loop()
        live = rt.submit_batch([list(PROMPT)], 8, GREEDY, loop=loop, ignore_eos=True)[0]
        whole = rt.submit_batch([list(PROMPT)], 8, GREEDY, loop=loop, ignore_eos=True, live=False)[0]
        rt.start()
        return live, whole, await events(live), await events(whole)

    live, whole, live_events, whole_events = asyncio.run(run())
    assert live.seq.out == whole.seq.out == rt.want[tuple(PROMPT)]
    assert [e[2] for e in whole_events] == ["length"]
    assert len(live_events) > 2 and [e[2] for e in live_events[:-1]] == [None] * (len(live_events) - 1)
    assert live_events[-1][2] == "length"
    assert "".join(e[1] for e in live_events) == live.text == whole.text and live.text


def test_over_http_only_a_streamed_request_is_live(runtime, http):
    """The API asks for per-token events (live) only when the client streams, and a whole
    response still carries the text a stream of the same request delivers piece by piece."""
    import json

    rt = runtime()
    url = http(rt)
    rt.start()
    real, live = rt.submit_batch, []

    def spy(*args, **kw):
        live.append(kw.get("live"))
        return real(*args, **kw)

    rt.submit_batch = spy
    body = {"prompt": list(PROMPT), "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    pieces = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert live == [False, True]
    assert len(pieces) > 2 and "".join(pieces) == whole.json()["choices"][0]["text"] != ""


def test_a_failing_token_callback_fails_that_request_only(runtime):
    rt = runtime(max_batch=2)
    a, b = submit(rt, PROMPT), submit(rt, OTHER)
    inner = a.seq.on_token

    def broken(seq, tok):
        if len(seq.out) == 3:
            raise RuntimeError("injected callback failure")
        inner(seq, tok)

    a.seq.on_token = broken
    rt.start()
    finished(a, b)
    assert a.finish_reason == "error" and a.seq.out == rt.want[tuple(PROMPT)][:3]
    assert (b.finish_reason, b.seq.out) == ("length", rt.want[tuple(OTHER)])
    assert rt.thread.is_alive() and rt.health() is None


@pytest.fixture
def http(runtime):
    """Serve a Runtime over real HTTP on 127.0.0.1 (uvicorn in a thread), stopped after."""
    import uvicorn

    from skynet.api import create_app

    servers = []

    def serve(rt) -> str:
        sock = listen("127.0.0.1", 0)   # bound here: no other process can take the port meanwhile
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(rt), log_level="warning"))
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        servers.append((server, t))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, t in servers:
        server.should_exit = True
        t.join(timeout=10)


def test_an_engine_that_cannot_go_on_says_so(runtime, http):
    """A step fails and so does failing its requests: the engine stops for good. The request
    waiting on it gets an error (not a hang), /health answers 503, new requests 503."""
    rt = runtime()
    url = http(rt)

    def boom(*_):
        raise RuntimeError("injected failure")

    rt.engine.step = rt.engine.fail_running = boom
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(1) as ex:
        pending = ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
        deadline = time.monotonic() + 30
        while not rt.engine.waiting:
            assert time.monotonic() < deadline and not pending.done(), "request never queued"
            time.sleep(0.02)
        rt.start()
        r = pending.result()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    h = httpx.get(url + "/health", timeout=5)
    assert h.status_code == 503 and "injected failure" in h.json()["error"], h.text
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text


# ---------------------------------------------------------------------------- the event loop
def test_tokenization_runs_off_the_event_loop(runtime, http):
    """Chat templates and the tokenizer take a while on long text: a request's are never run in
    the thread of the event loop that serves every other client."""
    import asyncio

    rt = runtime()
    url = http(rt)
    rt.start()
    real, calls = rt.tokenizer, []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    class Spy:
        def __call__(self, *args, **kw):
            calls.append(("tokenize", on_loop()))
            return real(*args, **kw)

        def apply_chat_template(self, *args, **kw):
            calls.append(("template", on_loop()))
            return real.apply_chat_template(*args, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    rt.tokenizer = Spy()
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert sorted(calls) == [("template", False), ("tokenize", False), ("tokenize", False)]


def test_text_that_cannot_fit_is_refused_before_tokenizing(runtime):
    """No token is longer than the vocabulary's longest string: text longer than that many
    characters per context position is refused without calling the tokenizer."""
    from skynet.engine import RequestError

    rt = runtime()
    limit = rt.arch.max_context * rt.max_token_chars
    real, calls = rt.tokenizer, []
    rt.tokenizer = type("Spy", (), {"__call__": lambda self, *a, **k: calls.append(1) or real(*a, **k),
                                    "__getattr__": lambda self, n: getattr(real, n)})()
    with pytest.raises(RequestError, match="context"):
        rt.encode_prompt("a" * (limit + 1))
    with pytest.raises(RequestError, match="context"):
        rt.encode_chat([{"role": "user", "content": "a" * (limit + 1)}])
    assert calls == []
    assert len(rt.encode_prompt("a" * 1000)) > 0 and calls == [1]


def test_lying_node_fails_no_request_over_http(tiny_model, tmp_path):
    """The issue's reproduction: a node whose replies carry twice the rows made every request in
    flight answer HTTP 500. Now 4 concurrent requests answer exactly what the server alone
    answers, and the liar is planned out."""
    from skynet.launch import LocalCluster

    env = {"SKYNET_NO_PROGRESS": "1", "SKYNET_CLUSTER_KEY": "", "SKYNET_API_KEY": ""}
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello"]
    with LocalCluster(str(tiny_model("llama")), 0, node_args=["--gflops", "1"], env=env,
                      log_dir=str(tmp_path)) as lc:
        def complete(p):
            r = httpx.post(lc.url + "/v1/completions", timeout=120,
                           json={"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
            return r.status_code, r.json()
        want = [complete(p) for p in prompts]
        assert all(code == 200 for code, _ in want)
        lc.add_node("honest")
        lc.env = {**lc.env, faults.ENV: "rows"}
        lc.add_node("liar")
        lc.wait_active(2, 60)
        with ThreadPoolExecutor(len(prompts)) as ex:
            got = list(ex.map(complete, prompts))
        assert [c for c, _ in got] == [200] * len(prompts), got
        assert [b["choices"][0]["text"] for _, b in got] == [b["choices"][0]["text"] for _, b in want]
        log = (tmp_path / "server.log").read_text()
        assert "'liar' lost: too many bad messages" in log, lc.log_tail("server")
        assert "'honest' lost" not in log and "from node 'honest'" not in log
