"""The dashboard in a real headless browser (Debian's chromium) against a live cluster of two nodes.

The browser is driven over the Chrome DevTools protocol on a pipe (--remote-debugging-pipe: no
extra Python packages, no port). Plain `--dump-dom --virtual-time-budget` is not enough here: it
does not wait for a streamed response body, so the page would be dumped mid-answer.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import struct
import subprocess
import threading
import urllib.parse
from pathlib import Path

import httpx
import pytest

from skynet.launch import LocalCluster

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (skip if that is impossible)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True,
                       timeout=1200, env=env)
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"could not install chromium with apt-get: {e} {detail.decode(errors='replace')[-300:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"apt-get install chromium did not provide {CHROMIUM}")
    return CHROMIUM


class Browser:
    """Headless chromium, driven with CDP messages (NUL-separated JSON) on fds 3 and 4."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():   # in the child: its fd 3 reads our commands, its fd 4 writes replies
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             "--mute-audio", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next, self._replies, self.events = 0, {}, []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._next += 1
        mid = self._next
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: mid in self._replies or self.proc.poll() is not None, timeout):
                raise TimeoutError(f"no CDP reply to {method} in {timeout}s")
            reply = self._replies.pop(mid, None)
        if reply is None:
            raise RuntimeError(f"chromium exited ({self.proc.returncode}) during {method}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def evaluate(self, expression: str, timeout: float = 60):
        r = self.call("Runtime.evaluate", session=True, timeout=timeout + 5, expression=expression,
                      awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60) -> bool:
        """Poll a JS boolean expression in the page until it holds (True) or time runs out (False)."""
        return self.evaluate(f"""new Promise((resolve) => {{
            const t0 = Date.now();
            (function check() {{
                let ok = false;
                try {{ ok = Boolean({condition}); }} catch (e) {{}}
                if (ok) resolve(true);
                else if (Date.now() - t0 > {int(timeout * 1000)}) resolve(false);
                else setTimeout(check, 100);
            }})();
        }})""", timeout)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


@pytest.fixture(scope="module")
def lc():
    # fixed node weights: the page's answer is compared with a separate run as exact text
    with LocalCluster(model=None, nodes=2, node_args=["--weight", "1"], env={"SKYNET_NO_PROGRESS": "1"}) as c:
        yield c


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_dashboard_renders_nodes_and_streams_a_prompt(chromium, lc, tmp_path):
    # the answer the page must show: the same greedy request, not streamed
    r = httpx.post(lc.url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
                         "temperature": 0})
    r.raise_for_status()
    expected = r.json()["choices"][0]["message"]["content"]
    assert expected.strip()

    query = urllib.parse.urlencode({"prompt": PROMPT, "autorun": 1, "max_tokens": MAX_TOKENS,
                                    "temperature": 0})
    browser = Browser(chromium, tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=True, url=f"{lc.url}/?{query}")
        # the JS rendered both nodes from /v1/cluster, and the autorun prompt finished streaming
        assert browser.wait_for("document.querySelectorAll('#nodes tr.node').length === 2"), \
            browser.evaluate("document.body.innerText")
        assert browser.wait_for("['done', 'error'].includes(document.getElementById('answer').dataset.state)")
        # the chart has a sample with generated tokens in it (the history endpoint, polled)
        assert browser.wait_for("samples.some((p) => p.tokens_per_s > 0)", timeout=10)
        # for a tidy screenshot, give a busy machine's cluster a moment to settle (not asserted)
        browser.wait_for("lastView && lastView.pending_epoch === null && lastView.nodes.length === 2 && "
                         "lastView.nodes.every((n) => n.state === 'active')", timeout=15)
        browser.evaluate("new Promise((r) => setTimeout(r, 300))")   # let the chart repaint
        dom = browser.evaluate("document.documentElement.outerHTML")
        answer = browser.evaluate("document.getElementById('answer').textContent")
        state = browser.evaluate("document.getElementById('answer').dataset.state")
        stats = browser.evaluate("document.getElementById('run-stats').textContent")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", session=True, format="png")["data"])
        errors = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    finally:
        browser.close()

    assert not errors, f"uncaught errors in the page: {errors}"
    assert state == "done", (state, answer)
    assert answer == expected, (answer, expected)
    assert "finish: length" in stats or "finish: stop" in stats, stats
    for name in ("node0", "node1"):
        assert f'data-node="{name}"' in dom and f">{name}" in dom
    view = lc.cluster()
    assert f">{view['epoch']}<" in dom                       # the rebalance table lists epochs
    assert view["model"] in dom

    assert png_size(shot) == (1280, 900)
    (tmp_path / "dashboard.png").write_bytes(shot)
    if os.environ.get("SKYNET_UPDATE_DOCS") == "1":   # refresh the picture in the docs on demand
        (DOCS / "dashboard.png").write_bytes(shot)


def test_dashboard_assets_are_offline(lc):
    """No CDN or other outside resource: everything the page loads comes from this server."""
    page = httpx.get(lc.url + "/", timeout=10).text
    js = httpx.get(lc.url + "/static/app.js", timeout=10).text
    css = httpx.get(lc.url + "/static/style.css", timeout=10).text
    for text in (page, js, css):
        text = text.replace("http://www.w3.org/2000/svg", "")   # the inline favicon's XML namespace
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert 'src="/static/app.js"' in page and 'href="/static/style.css"' in page


def test_dashboard_shows_each_ranges_holders(chromium, tmp_path):
    """--replicas 2: the plan line names every range's holders, each node row its holding."""
    with LocalCluster(model=None, nodes=2, server_args=["--replicas", "2"], node_args=["--weight", "1"],
                      env={"SKYNET_NO_PROGRESS": "1"}, log_dir=str(tmp_path / "logs")) as c:
        c.wait_active(2, 60)
        view = c.cluster()
        browser = Browser(chromium, tmp_path / "profile")
        try:
            browser.call("Page.navigate", session=True, url=f"{c.url}/")
            assert browser.wait_for("document.getElementById('plan-sub').textContent.includes('replicas 2')"), \
                browser.evaluate("document.body.innerText")
            sub = browser.evaluate("document.getElementById('plan-sub').textContent")
            rows = browser.evaluate("document.getElementById('nodes').innerText")
        finally:
            browser.close()
    for r in view["ranges"]:
        s, e = r["neurons"]
        assert f"[{s}, {e}) {' + '.join(r['holders'])}" in sub, (sub, view["ranges"])
        assert len(r["holders"]) == 2
    assert rows.count("holds [0, ") == 2, rows
