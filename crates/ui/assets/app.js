// vinfra dashboard: live regions (htmx polls them), the console follower and the
// hit-ratio plots (uPlot). No inline script anywhere: the CSP allows scripts from /ui only.
"use strict";

// A poll must not replace the element the user is on (a button being tabbed to, a link):
// skip that second's refresh while focus is inside the live region.
document.addEventListener("htmx:beforeRequest", (e) => {
  const t = e.detail.elt;
  if (t && t.classList && t.classList.contains("live")) {
    const a = document.activeElement;
    if (a && a !== t && t.contains(a)) e.preventDefault();
  }
});

// The console follows its end, unless the user scrolled up to read.
document.addEventListener("htmx:beforeSwap", (e) => {
  const t = e.detail.target;
  if (t && t.id === "console") {
    t.dataset.follow = t.scrollTop + t.clientHeight >= t.scrollHeight - 8 ? "1" : "0";
  }
});
document.addEventListener("htmx:afterSwap", (e) => {
  const t = e.detail.target;
  if (t && t.id === "console" && t.dataset.follow !== "0") t.scrollTop = t.scrollHeight;
});

const COLOURS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#0969da"];

function plot(el) {
  let chart = null;
  let shape = "";
  async function refresh() {
    let doc;
    try {
      const r = await fetch(el.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!r.ok) return;
      doc = await r.json();
    } catch (_) {
      return; // the server is restarting: try again next second
    }
    const series = doc.series.filter((s) => s.x.length > 0);
    el.dataset.series = String(series.length);
    el.dataset.points = String(series.reduce((n, s) => n + s.x.length, 0));
    el.dataset.states = series.map((s) => s.state).join(",");
    if (series.length === 0) {
      if (chart) { chart.destroy(); chart = null; shape = ""; }
      el.textContent = "No samples yet: the curve starts with the destination's first report.";
      return;
    }
    const data = series.length === 1 ? [series[0].x, series[0].y]
      : uPlot.join(series.map((s) => [s.x, s.y]));
    const newShape = series.map((s) => s.label).join("|");
    if (chart && newShape === shape) {
      chart.setData(data);
      return;
    }
    if (chart) chart.destroy();
    el.textContent = "";
    shape = newShape;
    chart = new uPlot({
      width: Math.max(320, Math.min(el.clientWidth || 800, 900)),
      height: 280,
      scales: { x: { time: false }, y: { range: [0, 100] } },
      axes: [{ label: "seconds" }, { label: "hit ratio %" }],
      series: [{ label: "seconds" }].concat(series.map((s, i) => ({
        label: s.label, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true,
      }))),
    }, data, el);
  }
  refresh();
  setInterval(refresh, 1000);
}

// Per-class traffic rates: one sample a second, kept since the page opened (2 minutes).
function rates(el) {
  const xs = [];
  const ys = {};
  let chart = null;
  let classes = [];
  async function refresh() {
    let doc;
    try {
      const r = await fetch(el.dataset.src, { credentials: "same-origin" });
      if (!r.ok) return;
      doc = await r.json();
    } catch (_) {
      return;
    }
    xs.push(doc.t);
    for (const c of doc.rates) {
      if (!ys[c.class]) ys[c.class] = xs.slice(0, -1).map(() => null);
      ys[c.class].push(c.bytes_per_s);
    }
    for (const k of Object.keys(ys)) {
      while (ys[k].length < xs.length) ys[k].push(null);
      if (ys[k].length > 120) ys[k].shift();
    }
    if (xs.length > 120) xs.shift();
    el.dataset.points = String(xs.length);
    const names = Object.keys(ys).sort();
    const data = [xs.slice()].concat(names.map((k) => ys[k].slice()));
    if (chart && names.join("|") === classes.join("|")) {
      chart.setData(data);
      return;
    }
    if (chart) chart.destroy();
    classes = names;
    el.textContent = "";
    chart = new uPlot({
      width: Math.max(320, Math.min(el.clientWidth || 800, 900)),
      height: 240,
      axes: [{}, { label: "bytes/s" }],
      series: [{ label: "time" }].concat(names.map((k, i) => ({
        label: k, stroke: COLOURS[i % COLOURS.length], width: 2,
      }))),
    }, data, el);
  }
  refresh();
  setInterval(refresh, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".plot[data-src]").forEach((el) =>
    el.dataset.kind === "rates" ? rates(el) : plot(el));
  const c = document.getElementById("console");
  if (c) c.scrollTop = c.scrollHeight;
});
