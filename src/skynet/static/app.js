// SkyNet dashboard: polls /v1/cluster and /v1/stats/history once a second and streams completions.
// Plain JS, no build step, no external resources. Query parameters (all optional):
//   ?prompt=...&autorun=1&max_tokens=N&temperature=T&mode=chat|completion&key=API_KEY
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const POLL_MS = 1000;
const WINDOW_S = 300;
const PALETTE = ["#4aa3ff", "#3ecf8e", "#f5b84c", "#c38bff", "#ff7eb6", "#5fd4d4", "#ff9f5a", "#a8d65c"];
const SERVER_COLOR = "#6b7785";

let apiKey = params.get("key") || localStorage.getItem("skynet.apiKey") || "";
let samples = [];          // [{t, tokens_per_s, active, queued}], newest last
let lastView = null;
let controller = null;     // AbortController of the running completion

// ------------------------------------------------------------------ helpers
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function headers(extra = {}) {
  return apiKey ? {...extra, Authorization: "Bearer " + apiKey} : extra;
}
function fmtBytes(b) {
  if (!b) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1000 && i < u.length - 1) { b /= 1000; i++; }
  return (b >= 100 || i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + u[i];
}
function fmtInt(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function fmtAge(s) {
  if (s < 60) return s.toFixed(0) + "s";
  if (s < 3600) return (s / 60).toFixed(0) + "m";
  return (s / 3600).toFixed(1) + "h";
}
function count(ranges) { return ranges.reduce((a, [s, e]) => a + (e - s), 0); }
function colorOf(id) { return PALETTE[(id - 1) % PALETTE.length]; }

class Unauthorized extends Error {}

async function getJSON(path) {
  const r = await fetch(path, {headers: headers(), cache: "no-store"});
  if (r.status === 401) throw new Unauthorized("API key required");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function setConn(state, text) {
  $("conn").className = "conn " + state;
  $("conn-text").textContent = text;
}

// ------------------------------------------------------------------ polling
async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

async function refresh() {
  try {
    const view = await getJSON("/v1/cluster");
    const since = samples.length ? samples[samples.length - 1].t : 0;
    const hist = await getJSON("/v1/stats/history?since=" + since);
    const last = samples.length ? samples[samples.length - 1].t : 0;
    samples.push(...hist.samples.filter((p) => p.t > last));   // two refreshes may overlap
    const cutoff = (samples.length ? samples[samples.length - 1].t : 0) - WINDOW_S;
    samples = samples.filter((p) => p.t >= cutoff);
    lastView = view;
    render(view);
    drawChart();
    setConn("ok", "live");
    $("key-form").classList.add("hidden");
  } catch (e) {
    if (e instanceof Unauthorized) {
      setConn("bad", "API key required");
      $("key-form").classList.remove("hidden");
    } else {
      setConn("bad", "server unreachable");
    }
  }
}

// ------------------------------------------------------------------ rendering
function bar(ranges, total, color, label) {
  const segs = ranges.map(([s, e]) =>
    `<div class="seg" style="left:${(100 * s / total).toFixed(3)}%;width:${(100 * (e - s) / total).toFixed(3)}%;` +
    `background:${color}"></div>`).join("");
  return `<div class="bar" title="${esc(label)}">${segs}<span class="lbl">${esc(label)}</span></div>`;
}

function render(v) {
  const N = v.neurons;
  const latest = samples.length ? samples[samples.length - 1] : null;
  const active = v.nodes.filter((n) => n.state === "active" && n.neurons.length).length;
  const mlp = v.mlp || {};
  $("model").textContent = `${v.model} · ${v.layers} layers · hidden ${v.hidden} · ${fmtInt(N)} MLP neurons` +
    (v.uptime_s != null ? ` · up ${fmtAge(v.uptime_s)}` : "");
  $("t-tps").textContent = latest ? latest.tokens_per_s.toFixed(1) : "0.0";
  $("t-active").textContent = v.active_requests;
  $("t-queued").textContent = v.queued_requests;
  $("t-nodes").textContent = `${active} / ${v.nodes.length}`;
  $("t-epoch").textContent = v.epoch + (v.pending_epoch != null ? ` → ${v.pending_epoch}` : "");
  $("t-requests").textContent = fmtInt(v.requests);
  $("t-generated").textContent = fmtInt(v.generated_tokens);
  $("t-fallbacks").textContent = `${fmtInt(mlp.fallbacks || 0)} / ${fmtInt(v.dropped_messages)}`;
  $("t-fallbacks").title = Object.entries(mlp.fallback_reasons || {}).map(([k, n]) => `${k}: ${n}`).join("\n")
    || "no node range was computed by the server";
  $("scale-max").textContent = fmtInt(N);
  $("plan-sub").textContent = v.pending_epoch != null
    ? `epoch ${v.epoch} serving; epoch ${v.pending_epoch} loading`
    : `epoch ${v.epoch} · ${v.nodes.length} node${v.nodes.length === 1 ? "" : "s"} connected`;
  if ((v.replicas || 1) > 1) {   // each range's holders, primary first
    $("plan-sub").textContent += ` · replicas ${v.replicas}: ` + (v.ranges || []).map((r) =>
      `[${r.neurons[0]}, ${r.neurons[1]}) ${r.holders.join(" + ")}`).join(" · ");
  }

  // one bar with the whole plan
  const planSegs = [];
  for (const n of v.nodes) for (const r of n.neurons) planSegs.push([r, colorOf(n.id), n.name]);
  for (const r of v.local_neurons) planSegs.push([r, SERVER_COLOR, "server"]);
  $("planbar").innerHTML = planSegs.map(([[s, e], c, name]) =>
    `<div class="seg" style="left:${(100 * s / N).toFixed(3)}%;width:${(100 * (e - s) / N).toFixed(3)}%;` +
    `background:${c}" title="${esc(name)} [${s}, ${e})">${esc(name)}</div>`).join("");

  // node rows, then the server's own share
  const rowBytes = 3 * v.hidden * 4 * v.layers;   // gate, up, down rows of every layer (float32)
  const rows = v.nodes.map((n) => {
    const c = count(n.neurons), held = count(n.holds && n.holds.length ? n.holds : n.neurons);
    const rng = n.neurons.map(([s, e]) => `[${s}, ${e})`).join(" ") +
      (held > c ? ` (holds ${n.holds.map(([s, e]) => `[${s}, ${e})`).join(" ")})` : "") || "none";
    return `<tr class="node" data-node="${esc(n.name)}">
      <td><div class="name"><span class="swatch" style="background:${colorOf(n.id)}"></span>${esc(n.name)}
        <small>#${n.id}</small></div></td>
      <td><span class="badge ${esc(n.state)}">${esc(n.state)}</span></td>
      <td>${bar(n.neurons, N, colorOf(n.id), rng)}</td>
      <td class="num">${(100 * c / N).toFixed(1)}%</td>
      <td class="num">${n.weight.toFixed(2)}</td>
      <td class="num">${n.latency_ms == null ? "–" : n.latency_ms.toFixed(2)}</td>
      <td class="num">${fmtBytes(held * rowBytes)} / ${fmtBytes(n.mem_bytes)}</td>
      <td class="num">${n.cores}</td>
      <td class="num">${n.gflops.toFixed(1)}</td>
      <td class="num">${n.last_heartbeat_s.toFixed(1)}s ago</td>
    </tr>`;
  });
  const lc = count(v.local_neurons);
  const lrng = v.local_neurons.map(([s, e]) => `[${s}, ${e})`).join(" ") || "none";
  rows.push(`<tr class="server">
      <td><div class="name"><span class="swatch" style="background:${SERVER_COLOR}"></span>server <small>local</small></div></td>
      <td><span class="badge local">local</span></td>
      <td>${bar(v.local_neurons, N, SERVER_COLOR, lrng)}</td>
      <td class="num">${(100 * lc / N).toFixed(1)}%</td>
      <td class="num">–</td><td class="num">–</td><td class="num">${fmtBytes(lc * rowBytes)}</td>
      <td class="num">–</td><td class="num">–</td><td class="num">–</td></tr>`);
  $("nodes").innerHTML = rows.join("");

  // rebalance history, newest first
  const reb = (v.rebalances || []).slice().reverse();
  $("reb-sub").textContent = reb.length ? `${reb.length} plan switch${reb.length === 1 ? "" : "es"}` : "";
  $("rebalances").innerHTML = reb.length ? reb.map((h) => {
    const plan = Object.entries(h.ranges || {}).map(([name, [s, e]]) => `${name} [${s}, ${e})`);
    if (h.local && h.local.length) plan.push("server " + h.local.map(([s, e]) => `[${s}, ${e})`).join(" "));
    return `<tr><td class="num">${h.epoch}</td><td>${new Date(h.time * 1000).toLocaleTimeString()}</td>
      <td class="reason">${esc(h.reason)}</td><td class="num">${(h.bytes_moved / 1e6).toFixed(1)}</td>
      <td class="num">${Number(h.seconds).toFixed(2)}</td><td class="mono">${esc(plan.join(" · "))}</td></tr>`;
  }).join("") : `<tr class="empty"><td colspan="6">no rebalances yet</td></tr>`;
}

// ------------------------------------------------------------------ chart
function niceMax(x) {
  if (x <= 1) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 4, 8, 10]) if (m * p >= x) return m * p;   // quarters stay round
  return 10 * p;
}

function drawChart() {
  const cv = $("chart");
  const dpr = window.devicePixelRatio || 1;
  const W = cv.clientWidth, H = cv.clientHeight;
  if (!W || !H) return;
  if (cv.width !== Math.round(W * dpr) || cv.height !== Math.round(H * dpr)) {
    cv.width = Math.round(W * dpr);
    cv.height = Math.round(H * dpr);
  }
  const g = cv.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, W, H);
  const css = getComputedStyle(document.documentElement);
  const col = (name) => css.getPropertyValue(name).trim();
  const L = 44, R = 30, T = 8, B = 20;
  const pw = W - L - R, ph = H - T - B;
  const tEnd = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
  // the window grows with the data in whole minutes: 1 minute for a fresh server, then up to 5
  const span = samples.length ? tEnd - samples[0].t : 0;
  const win = Math.min(WINDOW_S, 60 * Math.max(1, Math.ceil(span / 60)));
  const tStart = tEnd - win;
  const x = (t) => L + pw * (t - tStart) / win;
  $("chart-window").textContent = win === 60 ? "last minute" : `last ${win / 60} min`;
  const yMax = niceMax(Math.max(1, ...samples.map((p) => p.tokens_per_s)));
  const rMax = Math.max(2, ...samples.map((p) => Math.max(p.active, p.queued)));
  const y = (v) => T + ph * (1 - v / yMax);
  const yr = (v) => T + ph * (1 - v / rMax);

  // grid and axes labels
  g.font = "11px system-ui, sans-serif";
  g.strokeStyle = col("--line");
  g.fillStyle = col("--muted");
  g.lineWidth = 1;
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = yMax * i / 4, yy = Math.round(y(v)) + 0.5;
    g.beginPath(); g.moveTo(L, yy); g.lineTo(L + pw, yy); g.stroke();
    g.fillText(String(Number(v.toFixed(2))), L - 6, yy);
  }
  g.textAlign = "left";
  g.fillText(String(rMax), L + pw + 6, T + 4);
  g.fillText("0", L + pw + 6, T + ph);
  g.textAlign = "center";
  g.textBaseline = "top";
  const step = win === 60 ? 10 : 60;
  for (let s = win; s >= 0; s -= step) {
    g.fillText(s === 0 ? "now" : step === 60 ? `-${s / 60}m` : `-${s}s`, x(tEnd - s), T + ph + 5);
  }
  if (!samples.length) {
    g.fillText("waiting for samples…", L + pw / 2, T + ph / 2);
    return;
  }
  g.save();
  g.beginPath(); g.rect(L, T, pw, ph); g.clip();
  // tokens/s: filled area
  const acc = col("--accent");
  g.beginPath();
  g.moveTo(x(samples[0].t), y(0));
  for (const p of samples) g.lineTo(x(p.t), y(p.tokens_per_s));
  g.lineTo(x(samples[samples.length - 1].t), y(0));
  g.closePath();
  g.fillStyle = acc + "40";
  g.fill();
  g.beginPath();
  samples.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, x(p.t), y(p.tokens_per_s)));
  g.strokeStyle = acc;
  g.lineWidth = 1.5;
  g.stroke();
  // active and queued requests: step lines on the right axis
  for (const [key, c] of [["active", col("--ok")], ["queued", col("--warn")]]) {
    g.beginPath();
    samples.forEach((p, i) => {
      if (i) g.lineTo(x(p.t), yr(samples[i - 1][key]));
      else g.moveTo(x(p.t), yr(p[key]));
      g.lineTo(x(p.t), yr(p[key]));
    });
    g.strokeStyle = c;
    g.lineWidth = 1.5;
    g.stroke();
  }
  g.restore();
}

// ------------------------------------------------------------------ try it: streamed completion
function parseEvents(buf, onData) {
  // consume complete SSE events ("data: ...\n\n"); return the unfinished rest
  let i;
  while ((i = buf.indexOf("\n\n")) >= 0) {
    const event = buf.slice(0, i);
    buf = buf.slice(i + 2);
    for (const line of event.split("\n")) {
      if (line.startsWith("data: ") && line !== "data: [DONE]") onData(JSON.parse(line.slice(6)));
    }
  }
  return buf;
}

async function runPrompt() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || controller) return;
  const chat = $("mode").value === "chat";
  const body = {max_tokens: Number($("max-tokens").value) || 64,
                temperature: Number($("temperature").value) || 0, stream: true};
  if (chat) body.messages = [{role: "user", content: prompt}];
  else body.prompt = prompt;
  const out = $("answer");
  out.textContent = "";
  out.dataset.state = "streaming";
  $("run-stats").textContent = "waiting for the first token…";
  $("send").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null, usage = null, finish = null;
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: headers({"Content-Type": "application/json"})});
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      throw new Error((err && err.error && err.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf = parseEvents(buf + dec.decode(value, {stream: true}), (j) => {
        const c = j.choices[0];
        const text = chat ? (c.delta && c.delta.content) : c.text;
        if (text) {
          if (tFirst === null) tFirst = performance.now();
          out.textContent += text;
          out.scrollTop = out.scrollHeight;
          $("run-stats").textContent = "streaming…";
        }
        if (c.finish_reason) finish = c.finish_reason;
        if (j.usage) usage = j.usage;
      });
    }
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : 0;
    const decode = tFirst !== null && n > 1 ? (n - 1) / ((performance.now() - tFirst) / 1000) : 0;
    $("run-stats").textContent = `${n} tokens in ${secs.toFixed(2)}s · first token ` +
      `${tFirst === null ? "–" : ((tFirst - t0) / 1000).toFixed(2) + "s"} · ${decode.toFixed(1)} tok/s · ` +
      `finish: ${finish}`;
    out.dataset.state = finish === "error" ? "error" : "done";
  } catch (e) {
    if (e.name === "AbortError") {
      out.dataset.state = "done";
      $("run-stats").textContent = "stopped";
    } else {
      out.dataset.state = "error";
      out.textContent += (out.textContent ? "\n" : "") + "error: " + e.message;
      $("run-stats").textContent = "failed";
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    refresh();   // show the finished request in the tiles now, not at the next poll
  }
}

// ------------------------------------------------------------------ wiring
$("prompt-form").addEventListener("submit", (e) => { e.preventDefault(); runPrompt(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runPrompt(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem("skynet.apiKey", apiKey);
  setConn("", "connecting");
});
window.addEventListener("resize", drawChart);

if (params.has("prompt")) $("prompt").value = params.get("prompt");
if (params.has("max_tokens")) $("max-tokens").value = params.get("max_tokens");
if (params.has("temperature")) $("temperature").value = params.get("temperature");
if (params.get("mode") === "completion") $("mode").value = "completion";
drawChart();
poll();
if (params.get("autorun") === "1") runPrompt();
