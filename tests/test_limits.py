"""Big request bodies against a real server process on 127.0.0.1: refused before they are read.

A 50 MB prompt used to be read, parsed and tokenized on the event loop before the answer (a 400)
came, and /health stalled for minutes meanwhile. Bodies are sent here over a raw socket, so the
test controls exactly what the server has received when it answers.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from skynet.launch import LocalCluster

ENV = {"SKYNET_NO_PROGRESS": "1", "SKYNET_CLUSTER_KEY": "", "SKYNET_API_KEY": ""}
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIG = 50 * 1024 * 1024
PIECE = 256 * 1024


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    """Server on the tiny model (context 512), no nodes, an API key, the default body cap."""
    with LocalCluster(str(tiny_model("llama")), 0, server_args=["--api-key", KEY], env=ENV,
                      log_dir=str(tmp_path_factory.mktemp("keyed"))) as lc:
        yield lc


@pytest.fixture(scope="module")
def capped(tiny_model, tmp_path_factory):
    """Server on the tiny model, no key, --max-body-bytes 100000."""
    with LocalCluster(str(tiny_model("llama")), 0, server_args=["--max-body-bytes", "100000"], env=ENV,
                      log_dir=str(tmp_path_factory.mktemp("capped"))) as lc:
        yield lc


class BigPost(threading.Thread):
    """POST /v1/completions with a `total`-byte JSON body, sent in pieces over a raw socket while
    another thread reads the answer; sending stops once the answer came or the server hung up."""

    def __init__(self, port: int, total: int, headers: dict, chunked: bool = False):
        super().__init__(daemon=True)
        self.port, self.total, self.headers, self.chunked = port, total, headers, chunked
        self.sent, self.answer, self.answered = 0, b"", threading.Event()

    def body_piece(self, i: int) -> bytes:
        if i == 0:
            return b'{"prompt": "'
        if self.sent + PIECE + 2 >= self.total:
            return b"a" * max(0, self.total - self.sent - 2) + b'"}'
        return b"a" * PIECE

    def run(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        reader = threading.Thread(target=self._read, args=(s,), daemon=True)
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        head += "Transfer-Encoding: chunked\r\n\r\n" if self.chunked else f"Content-Length: {self.total}\r\n\r\n"
        try:
            s.sendall(head.encode())
            reader.start()
            i = 0
            while self.sent < self.total and not self.answered.is_set():
                piece = self.body_piece(i)
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
                self.sent += len(piece)
                i += 1
            if self.chunked and not self.answered.is_set():
                s.sendall(b"0\r\n\r\n")
        except OSError:   # the server answered and closed the connection mid-body: expected
            pass
        reader.join(timeout=120)
        s.close()

    def _read(self, s: socket.socket) -> None:
        try:
            while b"\r\n\r\n" not in self.answer or len(self.answer.split(b"\r\n\r\n", 1)[1]) < 20:
                data = s.recv(65536)
                if not data:
                    break
                self.answer += data
        except OSError:
            pass
        self.answered.set()

    def status(self) -> int:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1 ") else 0

    def error(self) -> dict:
        return json.loads(self.answer.split(b"\r\n\r\n", 1)[1])["error"]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def refused_while_health_answers(lc, post: BigPost) -> BigPost:
    post.start()
    polls = 0
    while not post.answered.wait(0.05) or polls == 0:
        t0 = time.monotonic()
        r = httpx.get(lc.url + "/health", timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < 2.5, (time.monotonic() - t0, r.text)
        polls += 1
        assert polls < 200, "no answer to the big body"
    post.join(timeout=60)
    assert post.sent < post.total, "the whole body was sent before the server answered"
    return post


def test_health_answers_while_a_50mb_body_is_refused(keyed):
    before = rss(keyed.server.pid)
    post = refused_while_health_answers(keyed, BigPost(keyed.port, BIG, AUTH))
    assert post.status() == 413, post.answer[:300]
    assert rss(keyed.server.pid) - before < 32 << 20   # the body was never held in memory
    assert "exceeds" in post.error()["message"] or "large" in post.error()["message"].lower()
    # the server is unharmed
    r = httpx.post(keyed.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_chunked_body_is_refused_once_it_passes_the_cap(keyed):
    post = refused_while_health_answers(keyed, BigPost(keyed.port, BIG, AUTH, chunked=True))
    assert post.status() == 413, post.answer[:300]


def test_unauthenticated_big_body_is_refused_before_it_is_read(keyed):
    post = refused_while_health_answers(keyed, BigPost(keyed.port, BIG, {}))
    assert post.status() == 401, post.answer[:300]
    assert post.error()["code"] == "invalid_api_key"


def test_default_cap_follows_the_context(keyed):
    from skynet.api import body_limit

    limit = body_limit(0, 512)   # the tiny model's context
    assert limit >= 128 * 512
    pad = lambda n: json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).ljust(n).encode()
    r = httpx.post(keyed.url + "/v1/completions", headers={**AUTH, "content-type": "application/json"},
                   content=pad(limit), timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(keyed.url + "/v1/completions", headers={**AUTH, "content-type": "application/json"},
                   content=pad(limit + 1), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"], r.text


def test_max_body_bytes_flag(capped):
    pad = lambda n: json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).ljust(n).encode()
    ok = httpx.post(capped.url + "/v1/completions", content=pad(100_000), timeout=60,
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    big = httpx.post(capped.url + "/v1/chat/completions", content=pad(100_001), timeout=60,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and set(big.json()) == {"error"}, big.text


# ---------------------------------------------------------------------------- long prompts vs streams
@pytest.fixture(scope="module")
def long_context(tiny_model, tmp_path_factory):
    """Server on a tiny model with an 8,192-token context (so 300,000 characters pass the
    length bound and must be tokenized), no nodes."""
    model = tiny_model("llama", max_position_embeddings=8192)
    with LocalCluster(str(model), 0, env=ENV, log_dir=str(tmp_path_factory.mktemp("long"))) as lc:
        yield lc


def test_a_long_prompt_does_not_stall_running_streams(long_context):
    """8 streams run; meanwhile three 300,000-character chat prompts arrive (templated and
    tokenized, then refused for the context). Tokenization used to run on the event loop and
    froze every stream for about as long as a long prompt's request took; now the chunks keep
    coming (the bound is relative to that request time, so a loaded machine does not fail it)."""
    lc = long_context
    arrivals: list[list[float]] = [[] for _ in range(8)]
    body = {"prompt": "Hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    done = threading.Event()

    def read(i: int) -> None:   # until the long prompts are refused, then hang up (frees the slot)
        with httpx.stream("POST", lc.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    arrivals[i].append(time.monotonic())
                if done.is_set():
                    return

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(8)]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while min(len(a) for a in arrivals) < 20:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.02)
        big = "The quick brown fox jumps over the lazy dog. " * 6700   # 301,500 characters
        t0, took = time.monotonic(), []
        for _ in range(3):
            t = time.monotonic()
            r = httpx.post(lc.url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": big}], "max_tokens": 8})
            took.append(time.monotonic() - t)
            assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
        t1 = time.monotonic()
        time.sleep(0.2)
    finally:
        done.set()
        for t in readers:
            t.join(timeout=60)
    assert all(a[-1] > t1 for a in arrivals), "a stream ended before the long prompts were refused"
    before = sorted(b - a for s in arrivals for a, b in zip(s, s[1:]) if b < t0)
    step = before[len(before) // 2]
    during = max(b - a for s in arrivals for a, b in zip(s, s[1:]) if t0 <= b <= t1 + 0.1)
    assert during < max(10 * step, 0.5 * max(took)), (during, step, took)
