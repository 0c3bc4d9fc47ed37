"""A small HTTP client: stream a completion, read the cluster view, print it as a table."""
from __future__ import annotations

import json
import sys

import httpx


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def get_json(url: str, api_key: str | None = None) -> dict:
    r = httpx.get(url, headers=_headers(api_key), timeout=10)
    r.raise_for_status()
    return r.json()


def stream_completion(url: str, prompt: str, max_tokens: int, temperature: float = 0.0,
                      seed: int | None = None, chat: bool = False, api_key: str | None = None,
                      out=sys.stdout) -> int:
    """Stream text to `out` as it is generated; returns an exit code."""
    body = {"max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if seed is not None:
        body["seed"] = seed
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    try:
        with httpx.stream("POST", url + path, json=body, headers=_headers(api_key), timeout=None) as r:
            if r.status_code != 200:
                r.read()
                print(f"error {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text = choice["delta"].get("content") if chat else choice.get("text")
                if text:
                    out.write(text)
                    out.flush()
    except httpx.ConnectError:
        print(f"cannot reach the server at {url}", file=sys.stderr)
        return 1
    out.write("\n")
    return 0


def print_status(view: dict) -> str:
    """The cluster view as a readable table."""
    rows = [("id", "name", "state", "neurons", "share", "weight", "ms/call", "heartbeat")]
    total = view["neurons"]
    for n in view["nodes"]:
        count = sum(e - s for s, e in n["neurons"])
        rows.append((str(n["id"]), n["name"], n["state"],
                     " ".join(f"[{s},{e})" for s, e in n["neurons"]) or "-",
                     f"{100 * count / total:.1f}%", f"{n['weight']:.2f}",
                     "-" if n["latency_ms"] is None else f"{n['latency_ms']:.2f}",
                     f"{n['last_heartbeat_s']:.1f}s ago"))
    local = sum(e - s for s, e in view["local_neurons"])
    if local:
        rows.append(("-", "server", "local", " ".join(f"[{s},{e})" for s, e in view["local_neurons"]),
                     f"{100 * local / total:.1f}%", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"model {view['model']}: {view['layers']} layers x {total} neurons, epoch {view['epoch']}, "
             f"{view['active_requests']} active / {view['queued_requests']} queued requests"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for h in view.get("rebalances", [])[-5:]:
        lines.append(f"  epoch {h['epoch']}: {h['reason']} ({h['bytes_moved'] / 1e6:.1f} MB, {h['seconds']}s)")
    return "\n".join(lines)
