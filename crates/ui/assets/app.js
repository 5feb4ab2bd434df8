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

const COLOURS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#0969da",
  "#bf3989", "#6e7781", "#e16f24", "#116329"];

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

// The browser terminal (Terminals page): this script is the terminal. It holds the
// credentials in memory only, signs each operation message with the secret (HMAC-SHA256,
// the MAC of model::terminals::mac_input) and sends it over a terminal session (a
// WebSocket to /v1/terminal-sessions with brief answers) as any terminal does; the
// server checks it like any other, and releases what it held if the tab goes. Once the
// session answered, headers leave out the server and terminal (the MAC covers them). Keys map as `vinfra terminal
// connect` maps them: printable runs and Enter become type_text, editing and cursor keys
// and Ctrl-letter key_combo. The pointer box sends pointer_move / pointer_button / wheel,
// the power buttons power, the screenshot button screenshot (the picture is shown). One
// message in flight at a time (order kept); keys typed meanwhile go together in the next,
// and of pointer moves made meanwhile only the last.
const MAC_CONTEXT = "vinfra-terminal-operation-v1";
const NAMED_KEYS = {
  Backspace: ["backspace"], Delete: ["delete"], Escape: ["esc"], ArrowUp: ["up"],
  ArrowDown: ["down"], ArrowLeft: ["left"], ArrowRight: ["right"], Home: ["home"],
  End: ["end"], PageUp: ["pgup"], PageDown: ["pgdn"],
};

function keyOp(e) {
  if (e.metaKey || e.altKey) return null;
  if (e.ctrlKey) {
    return /^[a-z]$/i.test(e.key) ? { op: "key_combo", qcodes: ["ctrl", e.key.toLowerCase()] } : null;
  }
  if (e.key === "Enter") return { op: "type_text", text: "\n" };
  if (NAMED_KEYS[e.key]) return { op: "key_combo", qcodes: NAMED_KEYS[e.key] };
  if (e.key.length === 1 && e.key >= " " && e.key <= "~") return { op: "type_text", text: e.key };
  return null; // Tab moves the focus on; other keys have no operation
}

function terminal(root) {
  const enc = new TextEncoder();
  const status = root.querySelector("#bt-status");
  const pad = root.querySelector("#bt-keys");
  const log = root.querySelector("#bt-log");
  const creds = root.querySelector("#bt-creds");
  const pointer = root.querySelector("#bt-pointer");
  const shot = root.querySelector("#bt-shot");
  let term = null;
  const queue = [];
  let busy = false;
  let lastSeq = 0;
  const say = (m) => { status.textContent = m; };
  // The session: opened at the first message, again after it closed. Answers come in
  // the order messages went; `waiting` resolves them so.
  let ws = null;
  let established = false;
  const waiting = [];
  function session() {
    if (ws && ws.readyState === WebSocket.OPEN) return Promise.resolve(ws);
    return new Promise((resolve, reject) => {
      const s = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/terminal-sessions?replies=brief`);
      established = false;
      s.onopen = () => { ws = s; resolve(s); };
      s.onmessage = (e) => {
        let reply = {};
        try { reply = JSON.parse(e.data); } catch (_) { /* answered as not understood */ }
        if (reply.reply === "outcome") established = true;
        const w = waiting.shift();
        if (w) w(reply);
      };
      s.onclose = () => {
        if (ws === s) ws = null;
        while (waiting.length) waiting.shift()({ reply: "lost" });
        reject(new Error("closed"));
      };
    });
  }

  root.querySelector("#bt-file").addEventListener("change", async (e) => {
    const f = e.target.files && e.target.files[0];
    if (f) creds.value = await f.text();
  });
  root.querySelector("#bt-use").addEventListener("click", async () => {
    let c;
    try {
      c = JSON.parse(creds.value);
    } catch (_) {
      say("Credentials: not JSON (paste the file vinfra terminal create --credentials wrote).");
      return;
    }
    if (!c || typeof c.secret !== "string" || typeof c.terminal !== "string" || typeof c.server !== "string") {
      say("Credentials: terminal, secret and server are needed.");
      return;
    }
    if (!window.crypto || !crypto.subtle) {
      say("This browser offers no WebCrypto here: open the dashboard over https (or on localhost).");
      return;
    }
    const key = await crypto.subtle.importKey("raw", enc.encode(c.secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    term = { id: c.terminal, server: c.server, name: c.name || c.terminal, key };
    // Out of the page's DOM: only the non-extractable key is kept.
    creds.value = "";
    root.querySelector("#bt-file").value = "";
    say(`Terminal ${term.name}: focus the box below and type.`);
    root.dataset.ready = "1";
  });

  async function send(op) {
    const body = JSON.stringify({ operation: op });
    const seq = Math.max(Date.now() * 1000, lastSeq + 1);
    lastSeq = seq;
    const timestamp = Date.now();
    const input = `${MAC_CONTEXT}\n${term.server}\n${term.id}\n${seq}\n${timestamp}\n${body}`;
    const sig = new Uint8Array(await crypto.subtle.sign("HMAC", term.key, enc.encode(input)));
    const mac = Array.from(sig, (b) => b.toString(16).padStart(2, "0")).join("");
    const li = document.createElement("li");
    li.textContent = `${JSON.stringify(op)} → …`;
    log.prepend(li);
    while (log.children.length > 20) log.lastChild.remove();
    try {
      const s = await session();
      const header = JSON.stringify(established
        ? { seq, timestamp, mac }
        : { server: term.server, terminal: term.id, seq, timestamp, mac });
      const answered = new Promise((resolve) => waiting.push(resolve));
      // The body goes exactly as signed: the MAC covers its bytes.
      s.send(`{"header":${header},"body":${body}}`);
      const doc = await answered;
      if (doc.reply === "lost") {
        li.textContent = `${JSON.stringify(op)} → unknown (the session closed before its answer)`;
        li.dataset.outcome = "unsent";
        return;
      }
      const ok = doc.reply === "outcome";
      const outcome = ok ? doc.outcome : `refused (${doc.reason || "?"}): ${doc.detail || ""}`;
      li.textContent = `${JSON.stringify(op)} → ${outcome}`;
      li.dataset.outcome = ok ? doc.outcome : "refused";
      li.dataset.op = op.op;
      if (ok && doc.screenshot && shot) {
        shot.src = `data:image/png;base64,${doc.screenshot.png_base64}`;
        shot.alt = `The VM's display, ${doc.screenshot.width}×${doc.screenshot.height}`;
        shot.hidden = false;
      }
    } catch (_) {
      li.textContent = `${JSON.stringify(op)} → not sent (the server is unreachable)`;
      li.dataset.outcome = "unsent";
    }
  }

  async function pump() {
    if (busy || queue.length === 0) return;
    busy = true;
    let op = queue.shift();
    // Pointer moves made while the last message was out: only where it ended matters.
    while (op.op === "pointer_move" && queue.length > 0 && queue[0].op === "pointer_move") {
      op = queue.shift();
    }
    // Keys typed while the last message was out go as one (type_text is at most 256).
    while (op.op === "type_text" && queue.length > 0 && queue[0].op === "type_text"
           && op.text.length + queue[0].text.length <= 200) {
      op = { op: "type_text", text: op.text + queue.shift().text };
    }
    await send(op);
    busy = false;
    pump();
  }

  const enqueue = (op) => {
    if (!term) { say("Give the terminal's credentials first."); return false; }
    queue.push(op);
    pump();
    return true;
  };
  pad.addEventListener("keydown", (e) => {
    const op = keyOp(e);
    if (!op) return;
    e.preventDefault();
    enqueue(op);
  });

  // The pointer: the box stands for the VM's display (absolute positions, 0–32767 on
  // each axis, as a tablet reports them); buttons and the wheel as pressed.
  const BUTTONS = ["left", "middle", "right"];
  const at = (e) => {
    const r = pointer.getBoundingClientRect();
    const f = (v, len) => Math.max(0, Math.min(32767, Math.round((v / Math.max(1, len)) * 32767)));
    return { op: "pointer_move", x: f(e.clientX - r.left, r.width), y: f(e.clientY - r.top, r.height) };
  };
  pointer.addEventListener("mousemove", (e) => { if (term) enqueue(at(e)); });
  pointer.addEventListener("mousedown", (e) => {
    if (!BUTTONS[e.button]) return;
    e.preventDefault();
    pointer.focus();
    if (enqueue(at(e))) enqueue({ op: "pointer_button", button: BUTTONS[e.button], down: true });
  });
  pointer.addEventListener("mouseup", (e) => {
    if (BUTTONS[e.button]) enqueue({ op: "pointer_button", button: BUTTONS[e.button], down: false });
  });
  pointer.addEventListener("contextmenu", (e) => e.preventDefault());
  pointer.addEventListener("wheel", (e) => {
    e.preventDefault();
    const notches = Math.max(-10, Math.min(10, Math.round(-e.deltaY / 100) || (e.deltaY < 0 ? 1 : -1)));
    enqueue({ op: "wheel", delta: notches });
  }, { passive: false });
  // Power and screenshot buttons.
  root.querySelectorAll("button[data-power]").forEach((b) =>
    b.addEventListener("click", () => enqueue({ op: "power", action: b.dataset.power })));
  const shotButton = root.querySelector("#bt-screenshot");
  if (shotButton) shotButton.addEventListener("click", () => enqueue({ op: "screenshot" }));
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".plot[data-src]").forEach((el) =>
    el.dataset.kind === "rates" ? rates(el) : plot(el));
  const c = document.getElementById("console");
  if (c) c.scrollTop = c.scrollHeight;
  const bt = document.getElementById("browser-terminal");
  if (bt) terminal(bt);
  // The benchmark upload: a chosen file fills the text field (the form posts the text).
  const file = document.getElementById("doc-file");
  const doc = document.getElementById("doc");
  if (file && doc) {
    file.addEventListener("change", async () => {
      if (file.files && file.files[0]) doc.value = await file.files[0].text();
    });
  }
});
