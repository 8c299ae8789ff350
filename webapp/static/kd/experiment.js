// Experiment page: history from /metrics/, then live WebSocket points (deduplicated), status, model card, downloads.
import { $, ACTIVE, apiGet, apiSend, badge, el, fmtBytes, fmtCount, fmtDate, fmtDuration, fmtNum, fmtPct, items, progressBar } from "kd/api.js";
import { ChartPanel, PANEL_ORDER, SeriesStore, align, panelOf, seriesStyle } from "kd/charts.js";
import { contractList, contractOf, snippets } from "kd/contract.js";

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
  if (status && status !== exp.status) window.dispatchEvent(new Event("kd:jobs-changed"));
  if (status) exp.status = status;
  if (typeof progress === "number") exp.progress = progress;
  if (eta !== undefined) exp.eta_s = eta;
  renderStatus();
}

// The charts' empty state says what to expect, which depends on the status.
function updateEmpty() {
  $("#charts-empty").classList.toggle("hidden", store.count() > 0);
  $("#charts-empty").textContent = !exp || ACTIVE.has(exp.status)
    ? (exp?.status === "queued" ? "Waiting for a worker: curves appear as soon as the job logs its first step." : "No points yet: curves appear as soon as the job logs its first step.")
    : `This job logged no points before it ${exp.status === "failed" ? "failed (see the reason above)" : "stopped"}.`;
}

function renderStatus() {
  const e = exp;
  updateEmpty();
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
  if (!ACTIVE.has(e.status)) $("#live").textContent = "";
  if (e.status === "failed") {
    $("#exp-error").replaceChildren(el("div", { class: "alert error", role: "alert", id: "error-text" }, el("strong", { text: "This experiment failed: " }), e.error || "no reason was recorded.",
      el("div", { class: "small", style: "margin-top:.35rem" }, "Fix the config and run it again: ", el("a", { href: `/experiments/new/?clone=${id}`, text: "clone and edit" }), ".")));
  } else if (e.status === "cancelled") {
    $("#exp-error").replaceChildren(el("div", { class: "alert note", id: "cancelled-note" }, "This experiment was cancelled",
      e.progress ? ` at ${Math.round(e.progress * 100)}%` : "", hasModel() ? ": the best model so far was kept (model card below) with its curves. " : ": its curves so far are kept below; no model was saved. ",
      el("a", { href: `/experiments/new/?clone=${id}`, text: "Clone and edit" }), " to run it again."));
  } else $("#exp-error").replaceChildren();
}

function stat(v, l, id) { return el("div", { class: "stat", "data-metric": id }, el("div", { class: "v", text: v }), el("div", { class: "l", text: l })); }

function signedPoints(d) { return `${d >= 0 ? "+" : "−"}${Math.abs(d * 100).toFixed(1)} points`; }

// One plain sentence a reader can quote: accuracy against the teacher, size and speed against it.
function verdict(m) {
  const parts = [];
  if (exp.kind === "distill" && m.test_acc !== undefined && m.teacher_acc !== undefined) {
    parts.push("The student reaches ", el("strong", { text: fmtPct(m.test_acc) }), " test accuracy against the teacher's ",
      el("strong", { text: fmtPct(m.teacher_acc) }), ` (${signedPoints(m.test_acc - m.teacher_acc)})`);
    if (m.compression) parts.push(", with ", el("strong", { text: `${fmtNum(m.compression, 3)}× fewer parameters` }),
      ` (${fmtCount(m.student_params)} vs ${fmtCount(m.teacher_params)})`);
    if (m.speedup) parts.push(m.speedup >= 1 ? " and runs " : " but runs ",
      el("strong", { text: m.speedup >= 1 ? `${fmtNum(m.speedup, 3)}× faster` : `${fmtNum(1 / m.speedup, 3)}× slower` }), " on one CPU sample",
      latencyOverlap(m) ? " (within run-to-run spread: the two latency ranges overlap)" : "");
    parts.push(".");
  } else if (exp.kind === "codistill" && m.ensemble_test_acc !== undefined) {
    parts.push(`The best replica (${m.best_replica ?? 0}) reaches `, el("strong", { text: fmtPct(m.test_acc) }),
      " test accuracy; the replicas averaged reach ", el("strong", { text: fmtPct(m.ensemble_test_acc) }), ".");
    if (m.churn !== undefined && m.churn !== null) parts.push(` They disagree on ${fmtPct(m.churn)} of test samples (churn).`);
  } else if (exp.kind === "train" && m.test_acc !== undefined) {
    parts.push("Trained on the labels alone: ", el("strong", { text: fmtPct(m.test_acc) }), ` test accuracy with ${fmtCount(m.student_params)} parameters.`,
      " Use it as a teacher: “Distill this model” trains a smaller student from it.");
  }
  return parts;
}

// Latency as measured: the median of repeated single-sample CPU calls, with its p10–p90 spread (older runs: median only).
function latencyStat(m, who, label) {
  const med = m[`${who}_latency_ms`], lo = m[`${who}_latency_ms_p10`], hi = m[`${who}_latency_ms_p90`];
  const box = stat(`${fmtNum(med, 3)} ms`, label, `${who}_latency_ms`);
  if (lo !== undefined && lo !== null && hi !== undefined && hi !== null) {
    box.append(el("div", { class: "l latency-spread", text: `p10–p90: ${fmtNum(lo, 3)}–${fmtNum(hi, 3)} ms` }));
  }
  return box;
}

// Student and teacher latencies whose p10–p90 ranges overlap: a speed-up or slow-down within noise.
function latencyOverlap(m) {
  const r = (w) => [m[`${w}_latency_ms_p10`], m[`${w}_latency_ms_p90`]];
  const [slo, shi] = r("student"), [tlo, thi] = r("teacher");
  if ([slo, shi, tlo, thi].some((v) => typeof v !== "number")) return false;
  return slo <= thi && tlo <= shi;
}

// Milliseconds, in µs below 0.1 ms (no exponents in a sentence).
function fmtMicro(ms) { return ms < 0.1 ? `${fmtNum(Math.round(ms * 10000) / 10, 3)} µs` : `${fmtNum(ms, 2)} ms`; }

// How latency was measured, and, for a model whose time is mostly fixed per-call cost, why it may not be faster.
function latencyNotes(m) {
  const note = [];
  if (m.student_latency_ms_p10 !== undefined) {
    note.push(`latency is the median of ${fmtCount(m.student_latency_repeats)} single-sample CPU calls on the worker after a warm-up ` +
      `(batch size ${m.latency_batch_size ?? 1}, ${m.latency_threads ?? "?"} CPU thread${m.latency_threads === 1 ? "" : "s"}), ` +
      "and p10–p90 is the range of the middle 80% of those calls");
  } else note.push("latency is the median of single-sample CPU runs on the worker");
  const oh = m.student_latency_overhead;
  if (typeof oh === "number" && oh >= 0.5) {
    note.push(`about ${Math.round(oh * 100)}% of this student's time per sample is fixed per-call overhead of Python and the framework, not arithmetic ` +
      `(fed many samples in one call, it costs about ${fmtMicro(m.student_latency_ms * (1 - oh))} per sample), so a smaller model need not run faster on one sample, ` +
      "and its speed-up over the teacher mostly compares overheads; compare speed on larger models or batched calls");
  } else if (oh === undefined && ((m.student_params ?? Infinity) < 100_000 || (m.speedup !== undefined && m.speedup < 1))) {
    // Runs measured before the overhead figure existed: the parameter count is the hint.
    note.push(`for a model this small (${fmtCount(m.student_params)} parameters) the time is mostly fixed per-call overhead of the framework, not arithmetic, so latency and speed-up can differ by 20% or more between identical runs, and a smaller student can even time slower than its teacher; compare speed on larger models or batched calls`);
  }
  return note;
}

// A cancelled job may still have saved its best model so far.
function hasModel() { return exp.status === "succeeded" || (exp.status === "cancelled" && (exp.artifacts || []).length > 0); }

// A model at chance level learned nothing; say so before anyone ships or distils it.
async function warnChance(m) {
  if (typeof m.test_acc !== "number" || !exp.dataset?.id || $("#chance-warning")) return;
  let classes;
  try { classes = (await apiGet(`/api/datasets/${exp.dataset.id}/`)).num_classes; } catch { return; }
  if (!classes || m.test_acc > 1.5 / classes) return;
  $("#card-verdict").after(el("div", { class: "alert error", id: "chance-warning", role: "alert" },
    el("strong", { text: "This model is at chance level: " }),
    `${fmtPct(m.test_acc)} test accuracy on ${classes} classes (guessing gives ${fmtPct(1 / classes)}). `,
    "It learned nothing: the learning rate is probably too high (see the training loss), or the labels carry no signal."));
}

// How the run computed: its precision and peak memory, each named for what it measures (GPU tensors, or the CPU process).
function runFacts(m) {
  const facts = [];
  if (m.precision) {
    const how = m.compiled === true ? " · torch.compile" : m.compiled === false ? " · eager (compile failed)" : "";
    facts.push(stat(m.precision, `precision${how}`, "precision"));
  }
  const mib = (v) => fmtBytes(v * 2 ** 20);
  if (typeof m.gpu_peak_allocated_mb === "number") {
    const box = stat(mib(m.gpu_peak_allocated_mb), "GPU peak allocated (training)", "gpu_peak_allocated_mb");
    if (typeof m.gpu_peak_reserved_mb === "number") box.append(el("div", { class: "l", text: `reserved: ${mib(m.gpu_peak_reserved_mb)}` }));
    facts.push(box);
  } else if (typeof m.process_peak_rss_mb === "number") {
    facts.push(stat(mib(m.process_peak_rss_mb), "peak RSS of the worker process (CPU run; not GPU memory)", "process_peak_rss_mb"));
  }
  return facts;
}

// What the run did not do as asked (metrics.notes), as a short list; hidden when there is none.
function renderNotes(m) {
  const notes = Array.isArray(m.notes) ? m.notes.filter((n) => typeof n === "string" && n) : [];
  $("#card-notes").classList.toggle("hidden", !notes.length);
  $("#card-notes-list").replaceChildren(...notes.map((n) => el("li", { text: n })));
}

function renderModelCard() {
  const m = exp.metrics || {};
  const show = hasModel();
  $("#model-card").classList.toggle("hidden", !show);
  if (!show) return;
  const c = exp.config || {};
  const stats = [
    stat(fmtPct(m.test_acc), "test accuracy", "test_acc"),
    stat(fmtPct(m.val_acc), "val accuracy (best epoch)", "val_acc"),
  ];
  if (m.teacher_acc !== undefined) stats.push(stat(fmtPct(m.teacher_acc), `teacher ${m.teacher_acc_split || "test"} accuracy`, "teacher_acc"));
  stats.push(stat(fmtCount(m.student_params), "parameters", "student_params"));
  if (m.teacher_params) stats.push(stat(fmtCount(m.teacher_params), "teacher parameters", "teacher_params"));
  if (m.student_size_bytes) stats.push(stat(fmtBytes(m.student_size_bytes), "weights on disk", "student_size_bytes"));
  if (m.student_latency_ms !== undefined) stats.push(latencyStat(m, "student", "CPU latency per sample (median)"));
  if (m.teacher_latency_ms) stats.push(latencyStat(m, "teacher", "teacher CPU latency per sample (median)"));
  if (m.compression) stats.push(stat(`${fmtNum(m.compression, 3)}×`, "fewer parameters than the teacher", "compression"));
  if (m.speedup) stats.push(stat(`${fmtNum(m.speedup, 3)}×`, "CPU speed-up over the teacher", "speedup"));
  if (m.test_agreement !== undefined && m.test_agreement !== null) stats.push(stat(fmtPct(m.test_agreement), "agrees with the teacher (test)", "test_agreement"));
  // Fidelity (Stanton et al. 2021): how far the student's distribution is from the teacher's, not only its top-1.
  if (m.test_kl_to_teacher !== undefined && m.test_kl_to_teacher !== null) stats.push(stat(fmtNum(m.test_kl_to_teacher, 3), "KL(teacher ‖ student), test, T = 1", "test_kl_to_teacher"));
  if (m.teacher_coverage !== undefined && m.teacher_coverage !== null) stats.push(stat(fmtPct(m.teacher_coverage), "train samples with a soft label", "teacher_coverage"));
  // Codistillation: the replicas together and apart.
  if (m.ensemble_test_acc !== undefined) stats.push(stat(fmtPct(m.ensemble_test_acc), "ensemble test accuracy", "ensemble_test_acc"));
  if (m.churn !== undefined && m.churn !== null) stats.push(stat(fmtPct(m.churn), "churn (replicas disagree)", "churn"));
  for (let k = 0; m[`replica${k}_test_acc`] !== undefined; k++) {
    stats.push(stat(fmtPct(m[`replica${k}_test_acc`]), `replica ${k} test accuracy${m.best_replica === k ? " (best)" : ""}`, `replica${k}_test_acc`));
  }
  stats.push(...runFacts(m));
  $("#card-stats").replaceChildren(...stats);
  $("#card-verdict").replaceChildren(...verdict(m));
  warnChance(m);
  const note = [`Produced by this config with seed ${c.seed ?? 0}`];
  if (exp.device) note.push(`trained on ${exp.device}`);
  // A model of a few thousand parameters spends its time in per-call overhead, not arithmetic: its
  // latency and speed-up are within noise, and a smaller student can time slower than its teacher.
  note.push(...latencyNotes(m));
  $("#card-note").textContent = note.join("; ") + ".";
  renderNotes(m);
  renderDistilButton();
  renderContract();

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

// A trained model is a teacher: offer the next step where the user already is.
// The file name the download endpoint gives (api.py _slug), so the snippet runs as pasted.
function fileBase() {
  const slug = (exp.name || "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+|[-.]+$/g, "").slice(0, 80) || "experiment";
  return `${slug}-${exp.id}`;
}

// How to call the downloaded student: the dataset's input contract and a snippet per runtime.
let contractShown = false;
async function renderContract() {
  if (contractShown) return;
  const body = $("#contract-body");
  if (!exp.dataset) { body.textContent = "The dataset this model was trained on was deleted, so its input contract is no longer known."; return; }
  contractShown = true;
  try {
    const ds = await apiGet(`/api/datasets/${exp.dataset.id}/`);
    const c = contractOf(ds);
    const code = snippets(c, { onnx: `${fileBase()}.onnx`, torchscript: `${fileBase()}.ts` });
    body.replaceChildren(contractList(c),
      el("p", { class: "small muted", text: "The model normalises its inputs itself: give it the dataset's values as they are, not standardised." }),
      el("h3", { text: "onnxruntime (.onnx download)" }), el("pre", { id: "snippet-onnx", text: code.onnx }),
      el("h3", { text: "PyTorch (TorchScript download)" }), el("pre", { id: "snippet-torch", text: code.torch }));
  } catch (e) { contractShown = false; body.textContent = `Could not load the dataset's input contract: ${e.message}`; }
}

async function renderDistilButton() {
  const btn = $("#distil-btn");
  if (exp.kind !== "train" || exp.status !== "succeeded" || btn.dataset.teacher) return;
  try {
    const t = items(await apiGet("/api/checkpoints/")).find((x) => x.source_experiment === id);
    if (!t) return;
    btn.href = `/experiments/new/?kind=distill&teacher=${t.id}`;
    btn.dataset.teacher = t.id;
    btn.classList.remove("hidden");
  } catch { /* the Teachers page offers the same */ }
}

function renderDownloads() {
  const r = $("#replica")?.value;
  const extra = r ? `&replica=${r}` : "";
  const have = exp.artifacts ? new Set(exp.artifacts.map((a) => a.kind)) : null;
  $("#downloads").replaceChildren(...[["safetensors", "safetensors"], ["torchscript", "TorchScript"], ["onnx", "ONNX"]].filter(([fmt]) => !have || have.has(fmt)).map(([fmt, label]) =>
    el("a", { class: "btn small secondary", href: `/api/experiments/${id}/download/?format=${fmt}${extra}`, download: "", "data-format": fmt, title: `Download the model as ${label}`, text: `⬇ ${label}` })));
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
  else if (shown.dataset !== undefined && shown.dataset !== null) shown.dataset = `deleted (was dataset #${shown.dataset})`;
  if (shown.teacher && exp.teacher?.name) shown.teacher = `${exp.teacher.name} (#${exp.teacher.id})`;
  else if (shown.teacher) shown.teacher = `deleted (was teacher #${shown.teacher})`;
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
// Losses often fall by decades; "auto" switches their panels to a log axis when they do.
const LOSS_PANELS = new Set(["loss", "val_loss"]);
let yMode = "auto";

function spansDecades(seriesValues) {
  let lo = Infinity, hi = 0;
  for (const vs of seriesValues) for (const v of vs) if (v > 0 && Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return hi > 0 && hi / lo > 100;
}

$("#yaxis").addEventListener("click", (ev) => {
  const b = ev.target.closest("button");
  if (!b) return;
  for (const x of $("#yaxis").children) { x.classList.toggle("on", x === b); x.setAttribute("aria-pressed", String(x === b)); }
  yMode = b.dataset.v;
  drawnVersion = -1;
  draw.last = 0;
});
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
    const panel = panels.get(key);
    const raw = g.names.map((n) => store.get(n).values);
    const logY = LOSS_PANELS.has(key) && (yMode === "log" || (yMode === "auto" && spansDecades(raw)));
    panel.setLogY(logY);
    panel.root.dataset.logy = logY ? "1" : "0";
    // A log axis cannot show zero or negative values: leave gaps there.
    const list = g.names.map((n, i) => { const s = store.get(n); return { xs: s.steps, ys: logY ? raw[i].map((v) => (v > 0 ? v : null)) : raw[i] }; });
    const style = seriesStyle(g.names);
    panel.update(g.names, align(list), style.map((x) => x.color), style.map((x) => x.dash));
  }
  // Panels in a stable order even when a later series creates an earlier panel.
  for (const key of keys) container.append(panels.get(key).root);
  container.dataset.points = store.count();
  updateEmpty();
}

// `since`: only steps after it (a reconnect: what the socket missed, exact up to 2,000 steps per series).
let historyLoaded = false;
async function loadHistory(since = null) {
  try {
    const after = since === null ? "" : `&since=${since}`;
    const data = await apiGet(`/api/experiments/${id}/metrics/?max_points=2000${after}`);
    store.addHistory(data.series);
    if (since === null) historyLoaded = true;
  } catch { /* the socket still brings live points; the next reconnect retries */ }
}

// Where a reconnect resumes: the oldest "newest step" among the series that came live (several sinks, e.g.
// codistillation groups, move at their own pace), less one (a step's values may span two live messages; the
// server closes a socket at the first message it cannot deliver, so everything before is here).
const liveNames = new Set();
function resumeStep() {
  if (!historyLoaded) return null;
  const names = liveNames.size ? [...liveNames] : store.names();
  let last = Infinity;
  for (const name of names) { const s = store.get(name)?.steps; if (s?.length) last = Math.min(last, s[s.length - 1]); }
  return last === Infinity ? null : Math.max(-1, last - 1);
}
function noteLive(msg) {
  const points = msg.type === "metric" ? [msg] : msg.points || [];
  for (const p of points) for (const name of Object.keys(p.values || {})) liveNames.add(name);
}

// ---- live socket ---------------------------------------------------------------------------------
// The live badge matters only while the job moves; a finished page needs no connection status.
function setLive(text, on) {
  const active = exp && ACTIVE.has(exp.status);
  $("#live").textContent = active ? text : "";
  $("#live").className = `small ${on ? "live-on" : "live-off"}`;
}

function connect() {
  if (closed) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${proto}//${location.host}/ws/experiments/${id}/`);
  socket.onopen = () => {
    socketOpen = true;
    backoff = 1000;
    setLive("● live", true);
    // Whatever was logged while we were away comes from the history; duplicates merge away.
    loadHistory(resumeStep());
  };
  socket.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (msg.type === "metric" || msg.type === "metrics") { store.addMessage(msg); noteLive(msg); }
    else if (msg.type === "status") {
      const wasActive = ACTIVE.has(exp?.status);
      setStatus(msg.status, msg.progress, msg.eta_s);
      // A job that just finished has its final metrics and files: fetch them once.
      if (wasActive && !ACTIVE.has(msg.status)) loadExperiment();
    }
  };
  // Closed by the server (4408 too slow, 4409 live messages lost, a restart) or the network: reconnect, then
  // refetch what was missed. Jitter spreads hundreds of tabs closed at once (a Redis restart) over the backoff.
  socket.onclose = () => {
    socketOpen = false;
    if (closed) return;
    const wait = backoff * (0.5 + Math.random());
    setLive(`○ reconnecting in ${Math.max(1, Math.round(wait / 1000))}s`, false);
    setTimeout(connect, wait);
    backoff = Math.min(backoff * 2, 30000);
  };
}

// Without a socket, status still moves: poll the experiment while it is active. With one, check now and
// then too, so a final status message lost on the way (a reconnect at the wrong moment) cannot leave the
// page showing "running" forever.
let lastPoll = 0;
async function poll() {
  const due = !socketOpen || Date.now() - lastPoll > 10_000;
  if (due && exp && ACTIVE.has(exp.status)) {
    lastPoll = Date.now();
    const before = exp.status;
    await loadExperiment();
    if (before !== exp.status || ACTIVE.has(exp.status)) loadHistory();
  }
  setTimeout(poll, 3000);
}

$("#cancel-btn").addEventListener("click", async () => {
  // One click next to "Clone and edit" must not end a long run: ask, naming it and what is kept.
  const running = exp?.status === "running";
  if (!confirm(`Stop “${exp?.name ?? `#${id}`}”?\n\nIt ends as cancelled${running ? " and keeps the best model it has so far" : ""}. This cannot be resumed; clone it to run again.`)) return;
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
