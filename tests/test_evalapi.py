"""The evaluation API against a real cluster (server + 2 nodes, --precision exact): logprobs and
echo on /v1/completions, chat logprobs, n choices, /tokenize and /detokenize, and their bad input.

Logprobs must be HF transformers' log_softmax within 1e-4 (exact precision is float32 like HF).
"""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from conftest import hf_logits, hf_model
from skynet.launch import LocalCluster
from skynet.sampling import log_softmax
from test_serving import ENV, assert_error

TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog because"
MSGS = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(model=None, nodes=2, server_args=["--precision", "exact"], env=ENV) as c:
        yield c


@pytest.fixture(scope="module")
def hf(default_model_dir):
    return hf_model(default_model_dir)


def post(lc, path: str, body: dict) -> dict:
    r = httpx.post(lc.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def sse(lc, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", lc.url + path, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def tokenize(lc, **body) -> list[int]:
    return post(lc, "/tokenize", body)["tokens"]


def hf_greedy(hf, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """HF's greedy continuation and its logprobs (T, V) at every position of ids + continuation."""
    out = []
    for _ in range(steps):
        out.append(int(hf_logits(hf, ids + out)[-1].argmax()))
    return out, log_softmax(hf_logits(hf, ids + out))


def check_legacy(lp: dict, k: int, text: str) -> None:
    """Shape and self-consistency of one legacy logprobs object."""
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if value is None:
            assert top is None
            continue
        assert value <= 0 and tok in top and top[tok] == value
        values = list(top.values())
        assert len(top) <= k + 1 and values == sorted(values, reverse=True)
        assert values[0] >= value
    assert "".join(lp["tokens"]) == text
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]


# ---------------------------------------------------------------------------------- completions
def test_echo_logprobs_match_hf(lc, hf):
    ids = tokenize(lc, prompt=TEXT)
    out, ref = hf_greedy(hf, ids, 5)
    r = post(lc, "/v1/completions", {"prompt": TEXT, "max_tokens": 5, "temperature": 0, "logprobs": 5,
                                     "echo": True})
    c = r["choices"][0]
    lp = c["logprobs"]
    assert c["text"].startswith(TEXT) and r["usage"]["completion_tokens"] == 5
    check_legacy(lp, 5, c["text"])
    seq = ids + out
    assert lp["tokens"] == post(lc, "/tokenize", {"prompt": c["text"], "return_token_strs": True})["token_strs"]
    assert lp["token_logprobs"][0] is None
    want = ref[np.arange(len(seq) - 1), seq[1:]]
    assert np.abs(np.asarray(lp["token_logprobs"][1:]) - want).max() <= TOL
    for pos, top in enumerate(lp["top_logprobs"][1:]):
        best = np.sort(ref[pos])[::-1][:5]
        assert np.abs(np.asarray(list(top.values())[:5]) - best).max() <= TOL

    # without echo: the same numbers for the generated tokens, offsets from the completion's start
    r2 = post(lc, "/v1/completions", {"prompt": TEXT, "max_tokens": 5, "temperature": 0, "logprobs": 0})
    c2 = r2["choices"][0]
    check_legacy(c2["logprobs"], 0, c2["text"])
    assert c["text"] == TEXT + c2["text"]
    assert np.abs(np.asarray(c2["logprobs"]["token_logprobs"]) - want[-5:]).max() <= TOL
    assert all(len(t) == 1 for t in c2["logprobs"]["top_logprobs"])


def test_score_only(lc, hf):
    """echo + max_tokens 0 scores a text: no token is generated; token ids and batches work."""
    ids = tokenize(lc, prompt=TEXT)
    ref = log_softmax(hf_logits(hf, ids))
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    r = post(lc, "/v1/completions", {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1})
    c = r["choices"][0]
    assert c["text"] == TEXT and c["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert np.abs(np.asarray(c["logprobs"]["token_logprobs"][1:]) - want).max() <= TOL
    # what lm-eval's local-completions sends: a batch of token-id prompts, echo, max_tokens 1
    short = ids[:6]
    r = post(lc, "/v1/completions", {"prompt": [ids, short], "max_tokens": 1, "echo": True,
                                     "logprobs": 1, "temperature": 0, "seed": 1234})
    a, b = sorted(r["choices"], key=lambda ch: ch["index"])
    assert len(a["logprobs"]["tokens"]) == len(ids) + 1 and len(b["logprobs"]["tokens"]) == 7
    assert np.abs(np.asarray(a["logprobs"]["token_logprobs"][1:-1]) - want).max() <= TOL
    assert np.abs(np.asarray(b["logprobs"]["token_logprobs"][1:-1]) - want[:5]).max() <= TOL
    assert a["logprobs"]["token_logprobs"][-1] == pytest.approx(ref[-1].max(), abs=TOL)
    # echo without logprobs: just the text
    r = post(lc, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True})
    assert r["choices"][0]["text"] == TEXT and r["choices"][0]["logprobs"] is None


def test_echo_stream(lc):
    body = {"prompt": TEXT, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    whole = post(lc, "/v1/completions", body)["choices"][0]
    chunks = sse(lc, "/v1/completions", body)
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    assert text == whole["text"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        for key, value in (ch["choices"][0]["logprobs"] or {}).items():
            merged[key] += value
    assert merged == whole["logprobs"]


# ---------------------------------------------------------------------------------- chat
def test_chat_logprobs(lc, hf):
    ids = tokenize(lc, messages=MSGS)
    out, ref = hf_greedy(hf, ids, 6)
    body = {"messages": MSGS, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    c = post(lc, "/v1/chat/completions", body)["choices"][0]
    content = c["logprobs"]["content"]
    assert [e["token"] for e in content] == [post(lc, "/detokenize", {"tokens": [t]})["prompt"] for t in out]
    assert "".join(e["token"] for e in content) == c["message"]["content"]
    got = np.asarray([e["logprob"] for e in content])
    want = ref[np.arange(len(ids) - 1, len(ids) + 5), out]
    assert np.abs(got - want).max() <= TOL
    for e in content:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] == e["logprob"]
        assert e["bytes"] == list(e["token"].encode())
    chunks = sse(lc, "/v1/chat/completions", body)
    streamed = [e for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content
    plain = post(lc, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == c["message"]["content"]


# ---------------------------------------------------------------------------------- n
def test_n_choices(lc):
    body = {"prompt": "My favourite animal is", "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 42}
    a, b = post(lc, "/v1/completions", body), post(lc, "/v1/completions", body)
    texts = [ch["text"] for ch in sorted(a["choices"], key=lambda ch: ch["index"])]
    assert [ch["index"] for ch in a["choices"]] == [0, 1, 2]
    assert texts == [ch["text"] for ch in b["choices"]]
    assert len(set(texts)) > 1, texts                       # each choice its own stream
    assert a["usage"]["completion_tokens"] == 18
    one = post(lc, "/v1/completions", {**body, "n": 1})
    assert one["choices"][0]["text"] == texts[0]            # choice 0 is the seed's own stream
    chunks = sse(lc, "/v1/completions", body)
    streamed = ["".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == texts
    assert chunks[-1]["usage"]["completion_tokens"] == 18

    greedy = post(lc, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 5, "temperature": 0, "n": 3})
    assert len({ch["message"]["content"] for ch in greedy["choices"]}) == 1
    assert greedy["usage"]["completion_tokens"] == 15


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenize_detokenize(lc):
    r = post(lc, "/tokenize", {"prompt": TEXT, "return_token_strs": True})
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 8192
    assert "".join(r["token_strs"]) == TEXT
    assert post(lc, "/detokenize", {"tokens": r["tokens"]}) == {"prompt": TEXT}
    chat = tokenize(lc, messages=MSGS)
    bare = tokenize(lc, messages=MSGS, add_generation_prompt=False)
    assert len(chat) > len(bare) and chat[:len(bare)] == bare
    r = post(lc, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 1})
    assert r["usage"]["prompt_tokens"] == len(chat)


# ---------------------------------------------------------------------------------- bad input
BAD = [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, None),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10**9]]}, "prompt"),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"messages": MSGS, "n": -1}, "n"),
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "messages": MSGS}, None),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": [1, -2]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD)
def test_bad_input(lc, path, body, param):
    e = assert_error(httpx.post(lc.url + path, json=body, timeout=60), 400)
    if param:
        assert e["param"] == param and param in e["message"], e


def test_queue_bound(lc):
    """More choices than the server ever queues is a 400, not a 429 that retrying cannot fix."""
    body = {"prompt": ["a"] * 20, "n": 16, "max_tokens": 1}
    e = assert_error(httpx.post(lc.url + "/v1/completions", json=body, timeout=60), 400)
    assert "max-queue" in e["message"]
