// tetherfed live dashboard: REST polling + the decision SSE stream, drawn with plotly.js.
// Data sources (all under /v1/federations/{fed}):
//   GET /workers            every 1.5 s: the workers table and one loss point per new publish step
//   GET /decisions          once: the history; then GET /decisions/stream (SSE, read with fetch so
//                           the token travels in the Authorization header, resumed with Last-Event-ID)
//   GET /compatibility?workers=all  every 3 s: every layer's matrix over every worker's latest
//                           snapshot (ended workers too, so a finished run keeps its last matrix)
//   GET /workers/{wid}/telemetry  every 5 s when the coordinator serves it (its OpenAPI lists it):
//                           the series each worker has, then the new points of the scalar ones
// The token is kept in sessionStorage and sent only as "Authorization: Bearer ..." (never in a URL).
"use strict";
(function () {
  const POLL_MS = 1500, COMPAT_MS = 3000, DIAG_MS = 5000, FEDS_MS = 3000, DRAW_MS = 1000;
  const MAX_POINTS = 2000, MAX_HOLDS = 2000;
  const COLORS = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692",
    "#B6E880", "#FF97FF", "#FECB52"];
  const ACTION_COLOR = { merge: "#2ca02c", drift: "#d62728", hold: "#9e9e9e" };
  const TELEMETRY_PATH = "/v1/federations/{fed}/workers/{wid}/telemetry";
  const CONFIG = { displaylogo: false, responsive: true };
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  let token = sessionStorage.getItem("tetherfed.token") || "";
  let telemetry = false;
  let state = null; // the selected federation's data
  let session = 0; // bumped on every switch: loops of an older session stop

  class HttpError extends Error {
    constructor(status, detail) { super(status + ": " + detail); this.status = status; }
  }

  function headers() { return token ? { Authorization: "Bearer " + token } : {}; }

  function setStatus(text, error) {
    const node = $("status");
    node.textContent = text;
    node.className = error ? "status error" : "status";
  }

  async function api(path, signal) {
    const response = await fetch(path, { headers: headers(), cache: "no-store", signal: signal });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
      throw new HttpError(response.status, detail);
    }
    return response.json();
  }

  function fedPath(suffix) { return "/v1/federations/" + enc(state.name) + suffix; }

  // -- token ---------------------------------------------------------------------------------

  function askToken(why) {
    $("token-form").hidden = false;
    $("forget").hidden = true;
    setStatus(why, true);
  }

  function onAuthError(error) {
    if (error instanceof HttpError && (error.status === 401 || error.status === 403)) {
      askToken("token rejected (" + error.status + "): enter an admin or read-only token");
      return true;
    }
    return false;
  }

  $("token-form").addEventListener("submit", function (event) {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("tetherfed.token", token);
    $("token").value = "";
    $("token-form").hidden = true;
    $("forget").hidden = false;
    start();
  });

  $("forget").addEventListener("click", function () {
    sessionStorage.removeItem("tetherfed.token");
    token = "";
    session += 1;
    askToken("token forgotten");
  });

  // -- federations ---------------------------------------------------------------------------

  async function refreshFederations(mine) {
    while (mine === session) {
      try {
        const feds = await api("/v1/federations");
        const select = $("federation");
        const names = feds.data.map((f) => f.name);
        const known = Array.from(select.options).map((o) => o.value).filter(Boolean);
        if (names.join() !== known.join()) {
          select.innerHTML = names.length ? "" : '<option value="">(none yet)</option>';
          names.forEach((n) => select.add(new Option(n, n)));
        }
        const wanted = decodeURIComponent(location.hash.replace(/^#fed=/, ""));
        const pick = state ? state.name : (names.includes(wanted) ? wanted : names[0]);
        if (pick && (!state || state.name !== pick)) { select.value = pick; choose(pick); }
        if (!names.length) setStatus("no federation yet");
      } catch (error) {
        if (onAuthError(error)) return;
        setStatus("coordinator unreachable: " + error.message, true);
      }
      await sleep(FEDS_MS);
    }
  }

  $("federation").addEventListener("change", function (event) {
    if (event.target.value) choose(event.target.value);
  });

  function choose(name) {
    if (state && state.abort) state.abort.abort();
    history.replaceState(null, "", "#fed=" + enc(name));
    state = { name: name, workers: new Map(), decisions: 0, marks: [], edges: new Map(),
      timeline: { merge: [], drift: [], hold: [] }, compat: {}, layer: "", diag: new Map(),
      dirty: true, abort: new AbortController(), lastId: 0 };
    const mine = session;
    pollWorkers(mine, state);
    followDecisions(mine, state);
    pollCompatibility(mine, state);
    if (telemetry) pollDiagnostics(mine, state);
    setStatus("federation " + name);
  }

  // -- workers and loss ----------------------------------------------------------------------

  function worker(st, wid, name) {
    if (!st.workers.has(wid)) {
      st.workers.set(wid, { id: wid, name: name || wid, color: COLORS[st.workers.size % COLORS.length],
        steps: [], losses: [], row: {}, merges: 0, drifts: 0 });
    }
    return st.workers.get(wid);
  }

  function addPoint(w, step, loss) {
    if (step == null || loss == null) return;
    if (w.steps.length && step <= w.steps[w.steps.length - 1]) return;
    w.steps.push(step);
    w.losses.push(loss);
    if (w.steps.length > MAX_POINTS) { // halve: keep every other point
      w.steps = w.steps.filter((_, i) => i % 2 === 0);
      w.losses = w.losses.filter((_, i) => i % 2 === 0);
    }
  }

  async function pollWorkers(mine, st) {
    while (mine === session && st === state) {
      try {
        const page = await api(fedPath("/workers"));
        page.data.forEach(function (rec) {
          const w = worker(st, rec.worker_id, rec.name);
          w.name = rec.name;
          w.row = rec;
          addPoint(w, rec.step, rec.loss);
        });
        await loadHistory(st); // catch-up in case a proxy holds the stream back
        st.dirty = true;
      } catch (error) {
        if (onAuthError(error)) return;
        setStatus("workers: " + error.message, true);
      }
      await sleep(POLL_MS);
    }
  }

  function lossAt(w, step) {
    const xs = w.steps, ys = w.losses;
    if (!xs.length) return null;
    if (step <= xs[0]) return ys[0];
    for (let i = 1; i < xs.length; i++) {
      if (step <= xs[i]) return ys[i - 1] + (ys[i] - ys[i - 1]) * (step - xs[i - 1]) / (xs[i] - xs[i - 1]);
    }
    return ys[ys.length - 1];
  }

  // -- decisions -----------------------------------------------------------------------------

  function onDecision(st, d) {
    if (d.id <= st.lastId) return; // the stream and the REST catch-up may both deliver it
    st.lastId = d.id;
    st.decisions += 1;
    const w = worker(st, d.worker_id, null);
    const list = st.timeline[d.action];
    if (list) {
      list.push(d);
      if (d.action === "hold" && list.length > MAX_HOLDS) list.splice(0, list.length - MAX_HOLDS);
    }
    if (d.action === "merge" || d.action === "drift") {
      st.marks.push({ worker: d.worker_id, step: d.own_snapshot.step, action: d.action, layer: d.layer, id: d.id });
      w[d.action + "s"] += 1;
    }
    if (d.action === "merge" && d.partner_id) {
      const key = [d.worker_id, d.partner_id].sort().join("\u0000");
      st.edges.set(key, (st.edges.get(key) || 0) + 1);
    }
    st.dirty = true;
  }

  async function loadHistory(st) {
    for (;;) {
      const page = await api(fedPath("/decisions?after=" + st.lastId + "&limit=10000"), st.abort.signal);
      page.data.forEach((d) => onDecision(st, d));
      if (page.count < 10000) return;
    }
  }

  function parseEvents(st, text) {
    // SSE blocks are separated by a blank line; "data:" lines carry a decision, ":" lines are comments.
    const blocks = text.split("\n\n");
    const rest = blocks.pop();
    blocks.forEach(function (block) {
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) onDecision(st, JSON.parse(data));
    });
    return rest;
  }

  async function readStream(st) {
    const hdrs = Object.assign({ Accept: "text/event-stream" }, headers());
    if (st.lastId) hdrs["Last-Event-ID"] = String(st.lastId);
    const response = await fetch(fedPath("/decisions/stream"), { headers: hdrs, signal: st.abort.signal });
    if (!response.ok) throw new HttpError(response.status, response.statusText);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) return;
      buffer = parseEvents(st, (buffer + chunk.value).replace(/\r\n?/g, "\n")); // SSE allows CRLF, CR, LF
    }
  }

  async function followDecisions(mine, st) {
    while (mine === session && st === state) {
      try {
        await loadHistory(st);
        setStatus("federation " + st.name + ": live");
        await readStream(st);
      } catch (error) {
        if (st.abort.signal.aborted) return;
        if (onAuthError(error)) return;
        setStatus("decision stream: " + error.message + " (reconnecting)", true);
      }
      await sleep(1000);
    }
  }

  // -- compatibility -------------------------------------------------------------------------

  async function pollCompatibility(mine, st) {
    while (mine === session && st === state) {
      try {
        const all = await api(fedPath("/compatibility?workers=all"));
        all.data.forEach((m) => { st.compat[m.layer] = m; });
        const select = $("layer");
        const layers = Object.keys(st.compat).sort();
        if (layers.join() !== Array.from(select.options).map((o) => o.value).join()) {
          select.innerHTML = "";
          layers.forEach((l) => select.add(new Option(l, l)));
          select.value = st.layer && layers.includes(st.layer) ? st.layer : layers[0] || "";
        }
        st.layer = select.value;
        st.dirty = true;
      } catch (error) {
        if (onAuthError(error)) return;
      }
      await sleep(COMPAT_MS);
    }
  }

  $("layer").addEventListener("change", function (event) {
    if (state) { state.layer = event.target.value; state.dirty = true; }
  });

  // -- diagnostics (when the coordinator serves telemetry) -----------------------------------

  const SCALARS = ["jacobian_radius", "effective_rank", "gzip_ratio"];

  async function pollSeries(st, w, listed) {
    const key = w.id + "\u0000" + listed.metric + "\u0000" + listed.layer;
    if (!st.diag.has(key)) {
      st.diag.set(key, { worker: w, metric: listed.metric, layer: listed.layer, steps: [], values: [], last: -1 });
    }
    const series = st.diag.get(key);
    if (listed.last_step <= series.last) return;
    const query = "?metric=" + enc(listed.metric) + "&layer=" + enc(listed.layer) + "&after=" + series.last;
    const page = await api(fedPath("/workers/" + enc(w.id) + "/telemetry" + query));
    page.data.forEach(function (p) {
      if (typeof p.value === "number") { series.steps.push(p.step); series.values.push(p.value); }
    });
    if (page.last_step != null) series.last = page.last_step;
  }

  async function pollDiagnostics(mine, st) {
    while (mine === session && st === state) {
      for (const w of Array.from(st.workers.values())) {
        try {
          const listing = await api(fedPath("/workers/" + enc(w.id) + "/telemetry"));
          for (const listed of listing.data.filter((s) => SCALARS.includes(s.metric))) {
            await pollSeries(st, w, listed);
          }
        } catch (error) {
          if (onAuthError(error)) return;
        }
      }
      st.dirtyDiag = true;
      await sleep(DIAG_MS);
    }
  }

  $("diag-metric").addEventListener("change", function () { if (state) state.dirtyDiag = true; });

  function drawDiagnostics(st) {
    const all = Array.from(st.diag.values()).filter((s) => s.values.length);
    const metric = $("diag-metric").value;
    const traces = all.filter((s) => s.metric === metric).map((s) => ({ type: "scatter", mode: "lines+markers",
      name: s.worker.name + " " + s.layer, x: s.steps, y: s.values, line: { color: s.worker.color } }));
    Plotly.react("diag", traces, { margin: { t: 10 }, xaxis: { title: { text: "step" } },
      yaxis: { title: { text: metric } }, uirevision: st.name + metric }, CONFIG);
    const rows = all.map((s) => "<tr><td>" + esc(s.worker.name) + "</td><td>" + esc(s.metric) + "</td><td>" +
      esc(s.layer) + "</td><td>" + esc(s.steps[s.steps.length - 1]) + "</td><td>" +
      esc(fmt(s.values[s.values.length - 1])) + "</td></tr>");
    $("diagnostics").innerHTML = rows.length
      ? "<table><thead><tr><th>worker</th><th>metric</th><th>layer</th><th>step</th><th>latest</th></tr></thead><tbody>" +
        rows.join("") + "</tbody></table>"
      : '<p class="nodata">no data: enable --diagnostics on the workers</p>';
  }

  // -- drawing -------------------------------------------------------------------------------

  function esc(value) {
    return String(value == null ? "-" : value).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  }

  function fmt(value) { return typeof value === "number" ? value.toPrecision(4) : value; }

  function drawTable(st) {
    const body = $("workers").querySelector("tbody");
    body.innerHTML = Array.from(st.workers.values()).map(function (w) {
      const r = w.row;
      return "<tr><td style='color:" + w.color + "'>" + esc(w.name) + "</td><td>" + esc(r.status) + "</td><td>" +
        esc(r.step) + "</td><td>" + esc(r.epoch) + "</td><td>" + esc(fmt(r.loss)) + "</td><td>" + esc(r.generation) +
        "</td><td>" + w.merges + "</td><td>" + w.drifts + "</td></tr>";
    }).join("");
  }

  function markTrace(st, action) {
    const marks = st.marks.filter((m) => m.action === action && st.workers.has(m.worker));
    const points = marks.map((m) => ({ m: m, y: lossAt(st.workers.get(m.worker), m.step) })).filter((p) => p.y != null);
    return { type: "scatter", mode: "markers", name: action === "merge" ? "merges" : "drifts",
      x: points.map((p) => p.m.step), y: points.map((p) => p.y),
      text: points.map((p) => st.workers.get(p.m.worker).name + " #" + p.m.id + " " + p.m.layer),
      marker: { symbol: action === "merge" ? "triangle-up" : "triangle-down", size: 9, color: ACTION_COLOR[action] },
      meta: { kind: "mark", action: action } };
  }

  function drawLoss(st) {
    const traces = Array.from(st.workers.values()).map((w) => ({ type: "scatter", mode: "lines", name: w.name,
      x: w.steps, y: w.losses, line: { color: w.color }, meta: { kind: "loss" } }));
    traces.push(markTrace(st, "merge"), markTrace(st, "drift"));
    Plotly.react("loss", traces, { margin: { t: 10 }, xaxis: { title: { text: "step" } },
      yaxis: { title: { text: "loss" } }, uirevision: st.name }, CONFIG);
  }

  function drawCompat(st) {
    const m = st.compat[st.layer];
    const names = m ? m.workers.map((wid) => (st.workers.get(wid) || { name: wid }).name) : [];
    Plotly.react("compat", [{ type: "heatmap", z: m ? m.matrix : [], x: names, y: names, colorscale: "RdBu",
      zmid: 0, zmin: m && m.measure !== "dot" ? -1 : undefined, zmax: m && m.measure !== "dot" ? 1 : undefined,
      colorbar: { title: { text: m ? m.measure : "" } }, hoverongaps: false }],
    { margin: { t: 10 }, yaxis: { autorange: "reversed" }, uirevision: st.name + st.layer }, CONFIG);
  }

  function drawTimeline(st) {
    const traces = ["hold", "drift", "merge"].map((action) => ({ type: "scatter", mode: "markers", name: action,
      x: st.timeline[action].map((d) => d.created_at),
      y: st.timeline[action].map((d) => (st.workers.get(d.worker_id) || { name: d.worker_id }).name),
      marker: { color: ACTION_COLOR[action], size: 7, opacity: 0.7 } }));
    Plotly.react("timeline", traces, { margin: { t: 10 }, uirevision: st.name }, CONFIG);
  }

  function drawGraph(st) {
    const ws = Array.from(st.workers.values());
    const pos = new Map(ws.map((w, k) => [w.id, [Math.cos(2 * Math.PI * k / ws.length), Math.sin(2 * Math.PI * k / ws.length)]]));
    const top = Math.max(1, ...st.edges.values());
    const traces = [];
    st.edges.forEach(function (count, key) {
      const [a, b] = key.split("\u0000");
      if (!pos.has(a) || !pos.has(b)) return;
      traces.push({ type: "scatter", mode: "lines", x: [pos.get(a)[0], pos.get(b)[0]], y: [pos.get(a)[1], pos.get(b)[1]],
        line: { width: 1 + 9 * count / top, color: "#7f7f7f" }, hoverinfo: "text", text: count + " merges", showlegend: false });
    });
    traces.push({ type: "scatter", mode: "markers+text", x: ws.map((w) => pos.get(w.id)[0]), y: ws.map((w) => pos.get(w.id)[1]),
      text: ws.map((w) => w.name), textposition: "top center", marker: { size: 20, color: ws.map((w) => w.color) }, showlegend: false });
    const axis = { visible: false, range: [-1.5, 1.5] };
    Plotly.react("graph", traces, { margin: { t: 10, b: 10 }, xaxis: axis, yaxis: Object.assign({ scaleanchor: "x" }, axis) }, CONFIG);
  }

  function draw() {
    const st = state;
    if (st && st.dirty) {
      st.dirty = false;
      drawTable(st);
      drawLoss(st);
      drawCompat(st);
      drawTimeline(st);
      drawGraph(st);
    }
    if (st && st.dirtyDiag) {
      st.dirtyDiag = false;
      drawDiagnostics(st);
    }
    setTimeout(draw, DRAW_MS);
  }

  // -- start ---------------------------------------------------------------------------------

  async function start() {
    session += 1;
    state = null;
    const mine = session;
    try {
      const openapi = await api("/openapi.json");
      telemetry = TELEMETRY_PATH in (openapi.paths || {});
    } catch (error) {
      telemetry = false;
    }
    refreshFederations(mine);
  }

  async function init() {
    if (typeof Plotly === "undefined") {
      setStatus("plotly.js is not installed on the coordinator (pip install 'tetherfed[report]')", true);
      return;
    }
    const config = await api("/ui/config.json");
    draw();
    if (config.auth && !token) { askToken("this coordinator needs a token"); return; }
    $("forget").hidden = !config.auth;
    start();
  }

  init().catch((error) => setStatus("start failed: " + error.message, true));
})();
