"""``GET /dashboard``: a live picture of the swarm, served by the Oracle itself (no external assets).

The page polls ``/v1/cluster/status`` once a second with the admin key it was opened with
(``/dashboard?key=sk-oracle-...``) and draws: a coverage strip (one cell per block, darker with
more replicas), every Scout (span, state, how it is reached, reputation, latency, throughput, load, free KV cache),
tokens/s over the last minutes, sessions, speculative acceptance and golden tickets.
"""

from __future__ import annotations

import json

from aiohttp import web

from .auth import presented_key
from .state import STATE

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shard swarm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px system-ui, sans-serif; margin: 20px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } .muted { color: #777; font-size: 12px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 110px; }
.card b { display: block; font-size: 18px; }
#strip { display: flex; gap: 2px; margin: 6px 0 16px; }
.block { flex: 1; height: 34px; border-radius: 3px; font-size: 10px; color: #fff; display: flex;
         align-items: flex-end; justify-content: center; }
.c0 { background: #d9534f; } .c1 { background: #5cb85c; } .c2 { background: #3d8b3d; } .c3 { background: #255625; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border-bottom: 1px solid #eee; padding: 5px 8px; text-align: left; font-size: 13px; }
th { background: #f0f0f0; } .state-active { color: #2a7a2a; } .state-dead, .state-refused, .state-quarantined { color: #b52b27; }
svg { background: #fff; border: 1px solid #ddd; border-radius: 6px; }
#error { color: #b52b27; }
</style></head>
<body data-ready="0">
<h1>Shard swarm</h1><div class="muted" id="who">connecting…</div><div id="error"></div>
<div class="cards" id="cards"></div>
<div><b>Coverage</b> <span class="muted">one cell per block; darker = more Scouts serving it, red = none</span></div>
<div id="strip"></div>
<div><b>Tokens/s</b> <span class="muted">last minutes</span></div>
<svg id="rate" width="600" height="90" viewBox="0 0 600 90"></svg>
<h2 style="font-size:16px">Scouts</h2>
<table><thead><tr><th>peer</th><th>role</th><th>blocks</th><th>state</th><th>reached</th><th>reputation</th><th>latency ms</th>
<th>throughput</th><th>load</th><th>sessions</th><th>free KV</th></tr></thead><tbody id="scouts"></tbody></table>
<script>
const KEY = __KEY__;
const history = [];
let last = null;
function esc(s) { return String(s ?? "–").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function card(label, value) { return `<div class="card">${esc(label)}<b>${esc(value)}</b></div>`; }
async function tick() {
  try {
    const r = await fetch("/v1/cluster/status", {headers: KEY ? {"Authorization": "Bearer " + KEY} : {}});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const s = await r.json();
    const now = Date.now() / 1000;
    if (last) history.push(Math.max(0, (s.tokens_generated - last.tokens) / (now - last.t)));
    while (history.length > 180) history.shift();
    last = {tokens: s.tokens_generated, t: now};
    document.getElementById("who").textContent = `${s.model} · ${s.mode} · Oracle ${s.oracle_peer_id || "(local)"}`;
    const spec = s.speculative || {};
    const tickets = s.tickets || {};
    document.getElementById("cards").innerHTML = [
      card("tokens/s", history.length ? history[history.length - 1].toFixed(1) : "–"),
      card("running", s.running_sequences), card("waiting", s.waiting_requests), card("sessions", s.sessions),
      card("failovers", s.failovers),
      card("round trips/token", s.round_trips_per_token ?? "–"),
      card("acceptance", spec.acceptance_rate == null ? "–" : (100 * spec.acceptance_rate).toFixed(0) + "%"),
      card("tokens/pass", spec.tokens_per_pass ?? "–"),
      card("tickets ok/failed", `${tickets.passed ?? 0}/${tickets.failed ?? 0}`),
    ].join("");
    document.getElementById("strip").innerHTML = s.coverage.map((n, b) =>
      `<div class="block c${Math.min(n, 3)}" data-block="${b}" data-coverage="${n}" title="block ${b}: ${n} Scout(s)">${b}</div>`).join("");
    document.getElementById("scouts").innerHTML = s.scouts.map(x => `<tr data-peer="${esc(x.peer_id)}">
      <td title="${esc(x.peer_id)}">${esc(x.peer_id.slice(-10))}</td><td>${esc(x.role || "span")}</td>
      <td>${x.span ? esc(x.span[0] + "–" + x.span[1]) : "–"}</td><td class="state-${esc(x.state)}">${esc(x.state)}</td>
      <td class="reached">${esc(x.reached)}</td><td>${esc(x.reputation)}</td><td>${esc(x.latency_ms)}</td><td>${esc(x.throughput)}</td><td>${esc(x.load)}</td>
      <td>${esc(x.sessions)}</td><td>${x.free_kv_bytes == null ? "–" : (x.free_kv_bytes / 1048576).toFixed(0) + " MB"}</td></tr>`).join("");
    const max = Math.max(1, ...history);
    const pts = history.map((v, i) => `${(i * 600 / 179).toFixed(1)},${(88 - v * 84 / max).toFixed(1)}`).join(" ");
    document.getElementById("rate").innerHTML = `<polyline fill="none" stroke="#337ab7" stroke-width="2" points="${pts}"/>
      <text x="4" y="12" font-size="10" fill="#777">max ${max.toFixed(1)}</text>`;
    document.getElementById("error").textContent = "";
    document.body.dataset.ready = "1";
  } catch (e) {
    document.getElementById("error").textContent = "cannot read the cluster status: " + e.message;
  }
}
tick();
setInterval(tick, 1000);
</script></body></html>"""

LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Shard swarm</title></head>
<body style="font: 14px system-ui; margin: 40px"><h1 style="font-size:20px">Shard swarm</h1><p>{message}</p>
<form method="get"><input name="key" size="60" placeholder="sk-oracle-… (an admin key)"> <button>Open</button></form>
</body></html>"""


async def dashboard(request: web.Request) -> web.Response:
    """The page, for an admin key given as ``?key=`` (or a header); a key form otherwise."""
    state = request.app[STATE]
    key_text = request.query.get("key") or presented_key(request)
    if state.auth is not None:
        if not key_text:
            return web.Response(text=LOGIN.format(message="The dashboard needs an admin key."), content_type="text/html", status=401)
        key = await state.auth.verify(key_text)
        if not key.is_admin:
            return web.Response(text=LOGIN.format(message="That key is not an admin key."), content_type="text/html", status=403)
    literal = json.dumps(key_text or None).replace("<", "\\u003c")  # a JS literal that cannot close the script
    return web.Response(text=PAGE.replace("__KEY__", literal), content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
