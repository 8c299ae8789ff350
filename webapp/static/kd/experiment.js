// Experiment page: history from /metrics/, then live WebSocket points (deduplicated), status, model card, downloads.
import { $, ACTIVE, apiGet, apiSend, badge, el, fmtBytes, fmtCount, fmtDate, fmtDuration, fmtNum, fmtPct, progressBar } from "kd/api.js";
import { ChartPanel, PALETTE, PANEL_ORDER, SeriesStore, align, panelOf } from "kd/charts.js";

const id = Number($("#exp").dataset.id);
const store = new SeriesStore();
const panels = new Map();
let exp = null;
let drawnVersion = -1;
let socket = null;
let socketOpen = false;
let backoff = 1000;
let closed = false;

// ---- status and details ------------------------------------------------------------------------
function setStatus(status, progress, eta) {
  if (!exp) return;
  if (status) exp.status = status;
  if (typeof progress === "number") exp.progress = progress;
  if (eta !== undefined) exp.eta_s = eta;
  renderStatus();
}

function renderStatus() {
  const e = exp;
  $("#exp-status").replaceChildren(badge(e.status));
  $("#exp").dataset.status = e.status;
  const p = e.status === "succeeded" ? 1 : (e.progress || 0);
  $("#progress-bar").replaceChildren(progressBar(p, true, e.status));
  $("#progress-text").textContent = `${Math.round(p * 100)}%`;
  $("#progress-text").dataset.progress = p;
  $("#eta-text").textContent = e.status === "running" && e.eta_s ? `about ${fmtDuration(e.eta_s)} left` : e.status === "queued" ? "waiting for a worker" : "";
  const t = [];
  if (e.started) t.push(`started ${fmtDate(e.started)}`);
  if (e.finished) t.push(`finished ${fmtDate(e.finished)}`);
  if (e.started && e.finished) t.push(`took ${fmtDuration((new Date(e.finished) - new Date(e.started)) / 1000)}`);
  $("#times").textContent = t.join(" · ");
  $("#cancel-btn").classList.toggle("hidden", !ACTIVE.has(e.status));
  if (e.status === "failed") {
    $("#exp-error").replaceChildren(el("div", { class: "alert error", role: "alert", id: "error-text" }, el("strong", { text: "This experiment failed: " }), e.error || "no reason was recorded."));
  } else if (e.status === "cancelled") {
    $("#exp-error").replaceChildren(el("div", { class: "alert note", text: "This experiment was cancelled." }));
  } else $("#exp-error").replaceChildren();
}

function stat(v, l, id) { return el("div", { class: "stat", "data-metric": id }, el("div", { class: "v", text: v }), el("div", { class: "l", text: l })); }

function renderModelCard() {
  const m = exp.metrics || {};
  const show = exp.status === "succeeded";
  $("#model-card").classList.toggle("hidden", !show);
  if (!show) return;
  const c = exp.config || {};
  const stats = [
    stat(fmtPct(m.test_acc), "test accuracy", "test_acc"),
    stat(fmtPct(m.val_acc), "val accuracy", "val_acc"),
  ];
  if (m.teacher_acc !== undefined) stats.push(stat(fmtPct(m.teacher_acc), "teacher test accuracy", "teacher_acc"));
  stats.push(stat(fmtCount(m.student_params), "parameters", "student_params"));
  if (m.teacher_params) stats.push(stat(fmtCount(m.teacher_params), "teacher parameters", "teacher_params"));
  if (m.student_size_bytes) stats.push(stat(fmtBytes(m.student_size_bytes), "size", "student_size_bytes"));
  if (m.student_latency_ms !== undefined) stats.push(stat(`${fmtNum(m.student_latency_ms, 3)} ms`, "CPU latency / batch", "student_latency_ms"));
  if (m.compression) stats.push(stat(`${fmtNum(m.compression, 3)}×`, "compression", "compression"));
  if (m.speedup) stats.push(stat(`${fmtNum(m.speedup, 3)}×`, "speed-up", "speedup"));
  // Codistillation: the replicas together and apart.
  if (m.ensemble_test_acc !== undefined) stats.push(stat(fmtPct(m.ensemble_test_acc), "ensemble test accuracy", "ensemble_test_acc"));
  if (m.churn !== undefined && m.churn !== null) stats.push(stat(fmtPct(m.churn), "churn (replicas disagree)", "churn"));
  for (let k = 0; m[`replica${k}_test_acc`] !== undefined; k++) {
    stats.push(stat(fmtPct(m[`replica${k}_test_acc`]), `replica ${k} test accuracy${m.best_replica === k ? " (best)" : ""}`, `replica${k}_test_acc`));
  }
  $("#card-stats").replaceChildren(...stats);
  const note = [`Produced by this config with seed ${c.seed ?? 0}`];
  if (m.teacher_acc !== undefined && m.test_acc !== undefined) note.push(`accuracy ${m.test_acc >= m.teacher_acc ? "+" : "−"}${(Math.abs(m.test_acc - m.teacher_acc) * 100).toFixed(1)} points vs the teacher`);
  $("#card-note").textContent = note.join("; ") + ".";

  const replicas = exp.kind === "codistill" ? (c.codistill?.replicas || 1) : 0;
  const pick = $("#replica-pick");
  if (replicas > 1 && !pick.firstChild) {
    const sel = el("select", { id: "replica", "aria-label": "replica", style: "width:auto" },
      el("option", { value: "", text: "best replica" }), ...Array.from({ length: replicas }, (_, k) => el("option", { value: k, text: `replica ${k}` })));
    sel.addEventListener("change", renderDownloads);
    pick.replaceChildren(sel);
  }
  renderDownloads();
}

function renderDownloads() {
  const r = $("#replica")?.value;
  const extra = r ? `&replica=${r}` : "";
  $("#downloads").replaceChildren(...[["safetensors", "safetensors"], ["torchscript", "TorchScript"], ["onnx", "ONNX"]].map(([fmt, label]) =>
    el("a", { class: "btn small secondary", href: `/api/experiments/${id}/download/?format=${fmt}${extra}`, download: "", "data-format": fmt, text: `⬇ ${label}` })));
}

function renderConfig() {
  const c = exp.config || {};
  $("#config-json").textContent = JSON.stringify(c, null, 2);
  const rows = [];
  const flat = (obj, prefix = "") => {
    for (const [k, v] of Object.entries(obj)) {
      if (v && typeof v === "object" && !Array.isArray(v) && k !== "model" && k !== "teacher_arch") flat(v, `${prefix}${k}.`);
      else rows.push([`${prefix}${k}`, Array.isArray(v) || (v && typeof v === "object") ? JSON.stringify(v) : String(v)]);
    }
  };
  const shown = { ...c };
  if (exp.kind !== "codistill") delete shown.codistill;
  if (exp.kind !== "distill") { delete shown.temperature; delete shown.alpha; delete shown.soft_loss; delete shown.teacher; }
  // Ids mean little to a reader: name the dataset and teacher.
  if (exp.dataset?.name) shown.dataset = `${exp.dataset.name} (#${exp.dataset.id})`;
  if (shown.teacher && exp.teacher?.name) shown.teacher = `${exp.teacher.name} (#${exp.teacher.id})`;
  for (const k of Object.keys(shown)) if (shown[k] === null) delete shown[k];
  flat(shown);
  $("#config-kv").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

async function loadExperiment() {
  try {
    exp = await apiGet(`/api/experiments/${id}/`);
  } catch (e) {
    $("#exp-error").replaceChildren(el("div", { class: "alert error", text: e.status === 404 ? "No such experiment (or it is not yours)." : e.message }));
    return false;
  }
  $("#exp-name").textContent = exp.name || exp.config?.name || `Experiment #${id}`;
  document.title = `${$("#exp-name").textContent} · KD Studio`;
  $("#exp-kind").textContent = exp.kind;
  renderStatus();
  renderModelCard();
  renderConfig();
  return true;
}

// ---- charts ------------------------------------------------------------------------------------
function draw() {
  requestAnimationFrame(draw);
  if (store.version === drawnVersion) return;
  const now = performance.now();
  // Redraw at most ~5 times a second: plenty for training curves, cheap with 100k-point series.
  if (draw.last && now - draw.last < 200) return;
  draw.last = now;
  drawnVersion = store.version;
  const groups = new Map();
  for (const name of store.names().sort()) {
    const [key, title] = panelOf(name);
    if (!key) continue;
    if (!groups.has(key)) groups.set(key, { title, names: [] });
    groups.get(key).names.push(name);
  }
  const keys = [...groups.keys()].sort((a, b) => (PANEL_ORDER.indexOf(a) + 1 || 99) - (PANEL_ORDER.indexOf(b) + 1 || 99) || a.localeCompare(b));
  const container = $("#charts");
  for (const key of keys) {
    const g = groups.get(key);
    if (!panels.has(key)) panels.set(key, new ChartPanel(container, { key, title: g.title, logY: false }));
    const list = g.names.map((n) => { const s = store.get(n); return { xs: s.steps, ys: s.values }; });
    panels.get(key).update(g.names, align(list), g.names.map((_, i) => PALETTE[i % PALETTE.length]));
  }
  // Panels in a stable order even when a later series creates an earlier panel.
  for (const key of keys) container.append(panels.get(key).root);
  container.dataset.points = store.count();
  $("#charts-empty").classList.toggle("hidden", store.count() > 0);
}

async function loadHistory() {
  try {
    const data = await apiGet(`/api/experiments/${id}/metrics/?max_points=2000`);
    store.addHistory(data.series);
  } catch { /* the socket still brings live points; the next reconnect retries */ }
}

// ---- live socket ---------------------------------------------------------------------------------
function setLive(text, on) { $("#live").textContent = text; $("#live").className = `small ${on ? "live-on" : "live-off"}`; }

function connect() {
  if (closed) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${proto}//${location.host}/ws/experiments/${id}/`);
  socket.onopen = () => {
    socketOpen = true;
    backoff = 1000;
    setLive("● live", true);
    // Whatever was logged while we were away comes from the history; duplicates merge away.
    loadHistory();
  };
  socket.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (msg.type === "metric" || msg.type === "metrics") store.addMessage(msg);
    else if (msg.type === "status") {
      const wasActive = ACTIVE.has(exp?.status);
      setStatus(msg.status, msg.progress, msg.eta_s);
      // A job that just finished has its final metrics and files: fetch them once.
      if (wasActive && !ACTIVE.has(msg.status)) loadExperiment();
    }
  };
  socket.onclose = () => {
    socketOpen = false;
    if (closed) return;
    setLive(`○ reconnecting in ${Math.round(backoff / 1000)}s`, false);
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 30000);
  };
}

// Without a socket, status still moves: poll the experiment while it is active.
async function poll() {
  if (!socketOpen && exp && ACTIVE.has(exp.status)) {
    const before = exp.status;
    await loadExperiment();
    if (before !== exp.status || ACTIVE.has(exp.status)) loadHistory();
  }
  setTimeout(poll, 3000);
}

$("#cancel-btn").addEventListener("click", async () => {
  $("#cancel-btn").disabled = true;
  try {
    const res = await apiSend("POST", `/api/experiments/${id}/cancel/`);
    setStatus(res?.status || "cancelled");
  } catch (e) {
    $("#exp-error").replaceChildren(el("div", { class: "alert error", text: `Could not cancel: ${e.message}` }));
  }
  $("#cancel-btn").disabled = false;
  loadExperiment();
});

// A handle for tests and the console: the live store and socket.
window.kdLive = { store, socket: () => socket };

window.addEventListener("beforeunload", () => { closed = true; if (socket) socket.close(); });

(async () => {
  if (!(await loadExperiment())) return;
  await loadHistory();
  requestAnimationFrame(draw);
  connect();
  poll();
})();
