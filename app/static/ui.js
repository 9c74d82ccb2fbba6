// Sluice live view: polls the JSON API and draws tables and charts. No dependencies.
"use strict";

(() => {
  // ---- errors are shown on the page (and kept for tests in #js-errors) ---------------------
  const errorBox = document.getElementById("js-errors");
  function reportError(text) {
    errorBox.hidden = false;
    errorBox.textContent += text + "\n";
  }
  window.addEventListener("error", (e) => reportError("error: " + e.message));
  window.addEventListener("unhandledrejection", (e) => reportError("unhandled: " + e.reason));

  const POLL_MS = 1500;
  const KEEP_SECONDS = 15 * 60;
  const KEY_STORAGE = "sluice-api-key";
  const $ = (id) => document.getElementById(id);

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    windowSeconds: 300,
    paused: false,
    selected: null, // "topic/subscription" or null
    history: [], // samples: {t, total: {...}, subs: Map(id -> {...})}
    // Recent counter snapshots {t, heads: Map(topic -> head), delivered: Map(id -> total)}:
    // rates are taken over the last few seconds, not just since the previous poll.
    snapshots: [],
    polls: 0,
    timer: null,
  };

  // ---- formatting ----------------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => (n === null || n === undefined ? "–" : intFmt.format(n));
  function fmtRate(r) {
    if (r === null || r === undefined || !isFinite(r)) return "–";
    if (r === 0) return "0";
    if (r < 10) return r.toFixed(2);
    if (r < 100) return r.toFixed(1);
    return intFmt.format(Math.round(r));
  }
  function fmtAge(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " m";
    return Math.floor(s / 86400) + " d " + Math.round((s % 86400) / 3600) + " h";
  }
  function fmtDuration(s) {
    if (s % 86400 === 0) return s / 86400 + " d";
    if (s % 3600 === 0) return s / 3600 + " h";
    if (s % 60 === 0) return s / 60 + " m";
    return s + " s";
  }

  // ---- API -----------------------------------------------------------------------------------
  class AuthError extends Error {}
  class GoneError extends Error {}

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    const response = await fetch(path, { headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      throw new AuthError(response.status === 401 ? "API key needed" : "API key lacks read scope");
    }
    if (response.status === 404) throw new GoneError(path);
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  async function fetchTopic(name) {
    const base = "/v1/topics/" + encodeURIComponent(name);
    try {
      const [info, subs] = await Promise.all([
        api(base),
        api(base + "/subscriptions?limit=100"),
      ]);
      return { info, subs: subs.subscriptions };
    } catch (e) {
      if (e instanceof GoneError) return null; // deleted between the list and now
      throw e;
    }
  }

  async function fetchAll() {
    const list = await api("/v1/topics?limit=100");
    const topics = await Promise.all(list.topics.map((t) => fetchTopic(t.name)));
    return { topics: topics.filter(Boolean), more: list.next_after !== null };
  }

  // ---- one sample: derive rates from a snapshot a few seconds back ---------------------------
  const RATE_WINDOW_MS = 4500;

  function makeSample(data, t) {
    const prev = state.snapshots.find((s) => s.t >= t - RATE_WINDOW_MS - 500) || null;
    const dt = prev ? (t - prev.t) / 1000 : 0;
    const heads = new Map();
    const delivered = new Map();
    const subs = new Map();
    const topicRows = [];
    const total = { backlog: 0, inFlight: 0, lag: 0, dead: 0, pub: 0, del: 0, ack: 0, subs: 0 };

    for (const { info, subs: subList } of data.topics) {
      heads.set(info.name, info.head_offset);
      let pub = info.publish_rate_per_second;
      if (prev && dt > 0 && prev.heads.has(info.name)) {
        const before = prev.heads.get(info.name);
        const now = info.head_offset;
        const added = now === null ? 0 : before === null ? now + 1 : now - before;
        pub = Math.max(0, added) / dt;
      }
      total.pub += pub;
      topicRows.push({ info, pub, subCount: subList.length });

      for (const s of subList) {
        const id = s.topic + "/" + s.name;
        delivered.set(id, s.delivered_total);
        let del = s.rates_per_second.delivered;
        if (prev && dt > 0 && prev.delivered.has(id)) {
          del = Math.max(0, s.delivered_total - prev.delivered.get(id)) / dt;
        }
        const row = {
          id,
          topic: s.topic,
          name: s.name,
          backlog: s.backlog,
          inFlight: s.in_flight,
          delayed: s.delayed,
          lag: s.lag,
          dead: s.dead_lettered,
          age: s.oldest_unacked_age_seconds,
          del,
          ack: s.rates_per_second.acked,
        };
        subs.set(id, row);
        total.backlog += row.backlog;
        total.inFlight += row.inFlight;
        total.lag += row.lag;
        total.dead += row.dead;
        total.del += row.del;
        total.ack += row.ack;
        total.subs += 1;
      }
    }
    state.snapshots.push({ t, heads, delivered });
    state.snapshots = state.snapshots.filter((s) => s.t >= t - 2 * RATE_WINDOW_MS);
    return { t, total, subs, topicRows, topics: data.topics.length, more: data.more };
  }

  // ---- tables --------------------------------------------------------------------------------
  function cell(tr, text, cls, field) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    if (field) td.dataset.field = field;
    tr.appendChild(td);
    return td;
  }

  function numCell(tr, value, field, text, extra) {
    const cls = "num" + (value === 0 ? " zero" : "") + (extra ? " " + extra : "");
    return cell(tr, text === undefined ? fmtInt(value) : text, cls, field);
  }

  function sparkline(id) {
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 120 24");
    svg.setAttribute("preserveAspectRatio", "none");
    const points = windowed().map((s) => [s.t, s.subs.has(id) ? s.subs.get(id).lag : null])
      .filter((p) => p[1] !== null);
    if (points.length < 2) return svg;
    const now = Date.now();
    const from = Math.min(points[0][0], now - 10000);
    const max = Math.max(1, ...points.map((p) => p[1]));
    const xy = points.map(([t, v]) => [
      ((t - from) / (now - from)) * 120,
      22 - (v / max) * 20,
    ]);
    const line = xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" ");
    const area = document.createElementNS(svgNS, "polygon");
    area.setAttribute("points", line + " " + xy[xy.length - 1][0].toFixed(1) + ",24 " +
      xy[0][0].toFixed(1) + ",24");
    const poly = document.createElementNS(svgNS, "polyline");
    poly.setAttribute("points", line);
    svg.append(area, poly);
    return svg;
  }

  function renderSubscriptions(sample) {
    const body = $("subs-body");
    const rows = [...sample.subs.values()];
    body.replaceChildren();
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.dataset.topic = r.topic;
      tr.dataset.subscription = r.name;
      if (state.selected === r.id) tr.className = "selected";
      cell(tr, r.topic, "name", "topic");
      cell(tr, r.name, "name", "subscription");
      numCell(tr, r.backlog, "backlog");
      numCell(tr, r.inFlight, "in_flight");
      numCell(tr, r.delayed, "delayed");
      numCell(tr, r.lag, "lag");
      numCell(tr, r.dead, "dead_lettered", undefined, r.dead > 0 ? "bad" : "");
      const ageClass = r.age !== null && r.age > 60 ? "warn" : "";
      numCell(tr, r.age === null ? 0 : r.age, "oldest_unacked_age_seconds", fmtAge(r.age), ageClass);
      numCell(tr, r.del, "delivered_per_second", fmtRate(r.del));
      numCell(tr, r.ack, "acked_per_second", fmtRate(r.ack));
      const sparkCell = document.createElement("td");
      sparkCell.appendChild(sparkline(r.id));
      tr.appendChild(sparkCell);
      tr.addEventListener("click", () => select(state.selected === r.id ? null : r.id));
      body.appendChild(tr);
    }
    $("subs-empty").hidden = rows.length > 0;
  }

  function renderTopics(sample) {
    const body = $("topics-body");
    body.replaceChildren();
    for (const { info, pub, subCount } of sample.topicRows) {
      const tr = document.createElement("tr");
      tr.dataset.topic = info.name;
      cell(tr, info.name, "name", "topic");
      numCell(tr, info.head_offset, "head_offset");
      numCell(tr, info.message_count, "message_count");
      numCell(tr, pub, "published_per_second", fmtRate(pub));
      numCell(tr, subCount, "subscriptions");
      cell(tr, fmtDuration(info.retention_seconds), "num", "retention");
      body.appendChild(tr);
    }
    $("topics-empty").hidden = sample.topicRows.length > 0;
  }

  function renderTotals(sample) {
    const t = sample.total;
    $("total-topics").textContent = fmtInt(sample.topics) + (sample.more ? "+" : "");
    $("total-subs").textContent = fmtInt(t.subs);
    $("total-backlog").textContent = fmtInt(t.backlog);
    $("total-inflight").textContent = fmtInt(t.inFlight);
    $("total-lag").textContent = fmtInt(t.lag);
    $("total-dead").textContent = fmtInt(t.dead);
    $("total-pub").textContent = fmtRate(t.pub);
    $("total-del").textContent = fmtRate(t.del);
  }

  // ---- charts (canvas, drawn by hand) --------------------------------------------------------
  const COLORS = {
    backlog: "#2563eb",
    inFlight: "#d97706",
    lag: "#7c3aed",
    pub: "#16a34a",
    del: "#2563eb",
    ack: "#db2777",
  };

  function windowed() {
    const from = Date.now() - state.windowSeconds * 1000;
    return state.history.filter((s) => s.t >= from);
  }

  // The time axis grows with the history, from one minute up to the chosen window.
  function chartSpanSeconds() {
    const samples = windowed();
    if (samples.length === 0) return 60;
    const data = (Date.now() - samples[0].t) / 1000;
    for (const span of [60, 120, 180, 300, 600, 900]) {
      if (span >= data || span >= state.windowSeconds) return Math.min(span, state.windowSeconds);
    }
    return state.windowSeconds;
  }

  function agoLabel(seconds) {
    if (seconds === 0) return "now";
    if (seconds < 60 || seconds % 60 !== 0) return "−" + seconds + " s";
    return "−" + seconds / 60 + " min";
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * exp) return m * exp;
    return 10 * exp;
  }

  function chartSeries(kind) {
    const samples = windowed();
    const pick = (field) =>
      samples.map((s) => {
        if (state.selected === null) return [s.t, s.total[field]];
        const sub = s.subs.get(state.selected);
        return [s.t, sub ? sub[field] : null];
      });
    if (kind === "backlog") {
      return [
        { label: "lag", color: COLORS.lag, points: pick("lag") },
        { label: "backlog", color: COLORS.backlog, points: pick("backlog"), fill: true },
        { label: "in flight", color: COLORS.inFlight, points: pick("inFlight") },
      ];
    }
    const series = [];
    if (state.selected === null) {
      series.push({ label: "published", color: COLORS.pub, points: pick("pub"), fill: true });
    }
    series.push({ label: "delivered", color: COLORS.del, points: pick("del") });
    series.push({ label: "acked (1-min avg)", color: COLORS.ack, points: pick("ack") });
    return series;
  }

  const hover = new Map(); // canvas id -> x in CSS pixels, or undefined

  function drawChart(canvas, series, isRate) {
    const css = getComputedStyle(document.documentElement);
    const textColor = css.getPropertyValue("--muted").trim() || "#6b7685";
    const gridColor = css.getPropertyValue("--grid").trim() || "#edf0f5";
    const panelColor = css.getPropertyValue("--panel").trim() || "#fff";
    const lineColor = css.getPropertyValue("--line").trim() || "#e3e8ef";
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600;
    const height = canvas.clientHeight || 220;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";

    const now = Date.now();
    const span = chartSpanSeconds();
    const from = now - span * 1000;
    let max = 0;
    for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
    max = niceMax(max * 1.1);
    const fmtY = isRate ? fmtRate : (v) => fmtInt(Math.round(v));
    const left = Math.max(36, ctx.measureText(fmtY(max)).width + 14);
    const top = 26;
    const right = 10;
    const bottom = 22;
    const w = width - left - right;
    const h = height - top - bottom;
    const x = (t) => left + ((t - from) / (now - from)) * w;
    const y = (v) => top + h - (v / max) * h;

    // grid and axes
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (max / 4) * i;
      const yy = Math.round(y(v)) + 0.5;
      ctx.strokeStyle = gridColor;
      ctx.beginPath();
      ctx.moveTo(left, yy);
      ctx.lineTo(left + w, yy);
      ctx.stroke();
      ctx.fillStyle = textColor;
      ctx.fillText(fmtY(v), left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = [10, 15, 30, 60, 120, 180].find((s) => span / s <= 6) || 300;
    for (let ago = 0; ago <= span; ago += step) {
      const xx = x(now - ago * 1000);
      ctx.fillStyle = textColor;
      ctx.fillText(agoLabel(ago), Math.min(Math.max(xx, left + 14), left + w - 14), top + h + 6);
    }

    // series
    for (const s of series) {
      const pts = s.points.filter(([, v]) => v !== null);
      if (pts.length === 0) continue;
      if (s.fill && pts.length > 1) {
        ctx.beginPath();
        ctx.moveTo(x(pts[0][0]), y(0));
        for (const [t, v] of pts) ctx.lineTo(x(t), y(v));
        ctx.lineTo(x(pts[pts.length - 1][0]), y(0));
        ctx.closePath();
        ctx.fillStyle = s.color + "22";
        ctx.fill();
      }
      ctx.beginPath();
      pts.forEach(([t, v], i) => (i === 0 ? ctx.moveTo(x(t), y(v)) : ctx.lineTo(x(t), y(v))));
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();
      if (pts.length === 1) {
        ctx.fillStyle = s.color;
        ctx.beginPath();
        ctx.arc(x(pts[0][0]), y(pts[0][1]), 2.5, 0, Math.PI * 2);
        ctx.fill();
      }
      ctx.lineWidth = 1;
    }

    // legend with the latest values
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let lx = left;
    for (const s of series) {
      const last = [...s.points].reverse().find(([, v]) => v !== null);
      const text = s.label + "  " + (last ? fmtY(last[1]) : "–");
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, 8, 10, 3);
      ctx.fillStyle = textColor;
      ctx.fillText(text, lx + 14, 10);
      lx += ctx.measureText(text).width + 32;
    }

    // hover read-out
    const hx = hover.get(canvas.id);
    if (hx !== undefined && hx >= left && hx <= left + w && series[0].points.length) {
      const t = from + ((hx - left) / w) * (now - from);
      let best = null;
      for (const [pt] of series[0].points) {
        if (best === null || Math.abs(pt - t) < Math.abs(best - t)) best = pt;
      }
      const bx = x(best);
      ctx.strokeStyle = textColor;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(bx, top);
      ctx.lineTo(bx, top + h);
      ctx.stroke();
      ctx.setLineDash([]);
      const lines = [new Date(best).toLocaleTimeString()];
      for (const s of series) {
        const p = s.points.find(([pt]) => pt === best);
        lines.push(s.label + ": " + (p && p[1] !== null ? fmtY(p[1]) : "–"));
      }
      const boxW = Math.max(...lines.map((l) => ctx.measureText(l).width)) + 16;
      const boxH = lines.length * 15 + 8;
      const bxLeft = bx + 10 + boxW > left + w ? bx - 10 - boxW : bx + 10;
      ctx.fillStyle = panelColor;
      ctx.strokeStyle = lineColor;
      ctx.fillRect(bxLeft, top + 4, boxW, boxH);
      ctx.strokeRect(bxLeft + 0.5, top + 4.5, boxW, boxH);
      ctx.fillStyle = textColor;
      lines.forEach((l, i) => ctx.fillText(l, bxLeft + 8, top + 14 + i * 15));
    }
  }

  function renderCharts() {
    drawChart($("chart-backlog"), chartSeries("backlog"), false);
    drawChart($("chart-rates"), chartSeries("rates"), true);
    $("chart-scope").textContent = state.selected === null ? "all subscriptions" : state.selected;
    $("scope-clear").hidden = state.selected === null;
  }

  function render() {
    const sample = state.history[state.history.length - 1];
    if (!sample) return;
    renderTotals(sample);
    renderSubscriptions(sample);
    renderTopics(sample);
    renderCharts();
  }

  function select(id) {
    state.selected = id;
    render();
  }

  // ---- status and polling --------------------------------------------------------------------
  function setStatus(kind, text) {
    $("status").dataset.state = kind;
    $("status-text").textContent = text;
    document.body.dataset.state = kind;
  }

  async function poll() {
    state.timer = null;
    if (state.paused) return;
    try {
      const data = await fetchAll();
      const t = Date.now();
      state.history.push(makeSample(data, t));
      const cutoff = t - KEEP_SECONDS * 1000;
      while (state.history.length && state.history[0].t < cutoff) state.history.shift();
      state.polls += 1;
      document.body.dataset.polls = String(state.polls);
      render();
      setStatus("live", "live");
      $("updated").textContent = "updated " + new Date(t).toLocaleTimeString();
    } catch (e) {
      if (e instanceof AuthError) {
        setStatus("auth", e.message);
        $("key-panel").hidden = false;
      } else {
        setStatus("error", "offline, retrying…");
      }
    }
    if (!state.paused) state.timer = setTimeout(poll, POLL_MS);
  }

  function restart() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.snapshots = [];
    poll();
  }

  // ---- controls ------------------------------------------------------------------------------
  for (const button of document.querySelectorAll("[data-window]")) {
    button.addEventListener("click", () => {
      state.windowSeconds = Number(button.dataset.window);
      for (const b of document.querySelectorAll("[data-window]")) {
        b.classList.toggle("active", b === button);
      }
      render();
    });
  }

  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    if (state.paused) {
      if (state.timer !== null) clearTimeout(state.timer);
      state.timer = null;
      setStatus("paused", "paused");
    } else {
      restart();
    }
  });

  $("key-button").addEventListener("click", () => {
    $("key-panel").hidden = !$("key-panel").hidden;
    if (!$("key-panel").hidden) $("key-input").focus();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    restart();
  });
  $("key-clear").addEventListener("click", () => {
    state.key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    restart();
  });
  $("scope-clear").addEventListener("click", () => select(null));

  for (const id of ["chart-backlog", "chart-rates"]) {
    const canvas = $(id);
    canvas.addEventListener("mousemove", (e) => {
      hover.set(id, e.offsetX);
      renderCharts();
    });
    canvas.addEventListener("mouseleave", () => {
      hover.delete(id);
      renderCharts();
    });
  }
  window.addEventListener("resize", () => renderCharts());

  poll();
})();
