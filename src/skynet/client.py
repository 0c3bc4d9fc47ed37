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


def _bar(ranges, total: int, width: int = 24, fill: str = "#") -> str:
    """Where the ranges lie in [0, total), as a fixed-width text bar: |....####....|."""
    cells = ["."] * width
    for s, e in ranges:
        a, b = int(s * width / total), max(int(s * width / total) + 1, round(e * width / total))
        for i in range(a, min(b, width)):
            cells[i] = fill
    return "|" + "".join(cells) + "|"


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def print_status(view: dict) -> str:
    """The cluster view as a readable table (returned as a string)."""
    total = view["neurons"]
    row_bytes = 3 * view["hidden"] * 4 * view["layers"]
    head = ("id", "node", "state", "neurons", f"[0, {total})", "share", "weight", "ms/layer",
            "held / offered", "heartbeat")
    rows = []
    for n in view["nodes"]:
        count = sum(e - s for s, e in n["neurons"])
        held = sum(e - s for s, e in n.get("holds") or n["neurons"])
        rows.append((str(n["id"]), n["name"], n["state"],
                     " ".join(f"[{s},{e})" for s, e in n["neurons"]) or "-",
                     _bar(n["neurons"], total), f"{100 * count / total:.1f}%", f"{n['weight']:.2f}",
                     "-" if n["latency_ms"] is None else f"{n['latency_ms']:.2f}",
                     f"{_bytes(held * row_bytes)} / {_bytes(n['mem_bytes'])}",
                     f"{n['last_heartbeat_s']:.1f}s ago"))
    local = sum(e - s for s, e in view["local_neurons"])
    rows.append(("-", "server", "local", " ".join(f"[{s},{e})" for s, e in view["local_neurons"]) or "-",
                 _bar(view["local_neurons"], total), f"{100 * local / total:.1f}%", "-", "-",
                 _bytes(local * row_bytes), "-"))
    right = {5, 6, 7, 8}   # numeric columns
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    pending = view.get("pending_epoch")
    mlp = view.get("mlp") or {}
    lines = [f"model {view['model']}: {view['layers']} layers, hidden {view['hidden']}, {total} MLP neurons",
             f"epoch {view['epoch']}" + (f" (epoch {pending} loading)" if pending is not None else "")
             + f"; {len(view['nodes'])} node(s); {view['active_requests']} active / "
               f"{view['queued_requests']} queued requests; {view.get('requests', 0)} requests, "
               f"{view.get('generated_tokens', 0)} tokens generated"
             + (f"; {mlp['fallbacks']} MLP fallbacks" if mlp.get("fallbacks") else ""),
             "", line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    if view.get("replicas", 1) > 1:
        lines += ["", f"range holders (--replicas {view['replicas']}; primary first):"]
        lines += [f"  [{r['neurons'][0]},{r['neurons'][1]})  {', '.join(r['holders'])}"
                  for r in view.get("ranges", [])]
    history = view.get("rebalances", [])[-5:]
    if history:
        lines += ["", "rebalances (latest last):"]
        for h in history:
            lines.append(f"  epoch {h['epoch']:>3}  {h['bytes_moved'] / 1e6:7.1f} MB  {h['seconds']:6.2f}s  "
                         f"{h['reason']}")
    return "\n".join(lines)
