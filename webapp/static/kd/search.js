// Search pages: the list, the form (budget in words and units, a cost estimate), and the live view (trials, scatter, front).
import uPlot from "uplot";
import { $, ACTIVE, apiGet, apiSend, badge, el, fmtBytes, fmtCount, fmtDate, fmtDuration, fmtNum, fmtPct, items, progressBar, showError } from "kd/api.js";

const COST_NAMES = { params: "parameters", size_bytes: "size (bytes)", latency_ms: "latency (ms per sample)" };

function budgetText(b) {
  const parts = [];
  if (b.max_params) parts.push(`≤ ${fmtCount(b.max_params)} params`);
  if (b.max_size_bytes) parts.push(`≤ ${fmtBytes(b.max_size_bytes)}`);
  if (b.max_latency_ms) parts.push(`≤ ${b.max_latency_ms} ms on ${b.device || "cpu"}`);
  return parts.join(", ");
}

const METHOD_NAMES = { hinton: "Hinton", dkd: "DKD", dist: "DIST" };
const NOT_EXPORTED = "Only trials on the front when they finish export their model; this one's weights were not kept. Open its experiment for its curves and config.";

function methodText(p) {
  const m = METHOD_NAMES[p.method || "hinton"] || p.method;
  return p.logit_standardization ? `${m} + LS` : m;
}

function studentText(s) {
  if (!s) return "";
  if (s.arch === "mlp") return `mlp [${(s.hidden || []).join(", ")}]`;
  if (s.arch === "cnn") return `cnn [${(s.channels || []).join(", ")}]`;
  if (s.arch === "resnet") return `resnet${s.depth}x${s.width}`;
  return JSON.stringify(s);
}

// ---- list ------------------------------------------------------------------------------------------
async function listPage() {
  const body = $("#search-table tbody");
  const data = await apiGet("/api/searches/");
  const rows = data.searches || [];
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No searches yet. ", el("a", { href: "/searches/new/", text: "Start one" }), ".")));
    return;
  }
  body.replaceChildren(...rows.map((s) => el("tr", { "data-id": s.id },
    el("td", {}, el("a", { href: `/searches/${s.id}/`, text: s.name })), el("td", {}, badge(s.status)),
    el("td", {}, progressBar(s.progress, false, s.status)), el("td", { text: budgetText(s.budget) }),
    el("td", { class: "num", text: String(s.trials_total) }), el("td", { class: "num best-acc", text: s.best_val_acc != null ? fmtPct(s.best_val_acc) : "" }),
    el("td", { class: "hide-sm", text: fmtDate(s.created) }))));
}

// ---- form ------------------------------------------------------------------------------------------
async function newPage() {
  const [datasets, checkpoints] = await Promise.all([apiGet("/api/datasets/"), apiGet("/api/checkpoints/")]);
  const dsel = $("#s-dataset");
  dsel.replaceChildren(el("option", { value: "digits", text: "digits (built-in)" }),
    ...items(datasets).filter((d) => d.status === "ready" && d.format !== "builtin").map((d) => el("option", { value: d.id, text: d.name })));
  const tsel = $("#s-teacher");
  const teachers = items(checkpoints).filter((c) => c.status === "ready" || !c.status);
  tsel.replaceChildren(...teachers.map((c) => el("option", { value: c.id, text: `${c.name}${c.num_params ? ` (${fmtCount(c.num_params)} params)` : ""}` })));
  if (!teachers.length) showError($("#s-error"), "You have no teacher yet: upload one on the Teachers page or train one (New experiment, kind train).");
  for (const r of document.querySelectorAll("input[name=students]")) r.addEventListener("change", () => $("#s-students").classList.toggle("hidden", r.value !== "list" || !r.checked));
  const estimate = () => {
    const trials = Number($("#s-trials").value) || 0, epochs = Number($("#s-epochs").value) || 0, par = Number($("#s-parallel").value) || 1;
    $("#s-estimate").textContent = `At most ${trials * epochs} trial-epochs (${trials} trials × ${epochs} epochs, ${par} at a time); pruning usually stops weak trials after 1 or 3 epochs, so expect about half.`;
  };
  for (const id of ["#s-trials", "#s-epochs", "#s-parallel"]) $(id).addEventListener("input", estimate);
  estimate();
  $("#search-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("#s-error").replaceChildren();
    const kind = $("#s-budget-kind").value;
    let value = Number($("#s-budget-value").value);
    if (kind === "max_size_bytes") value = Math.round(value * 1024);
    if (kind === "max_params") value = Math.round(value);
    const budget = { [kind]: value, device: $("#s-device").value };
    const space = { temperature: [Number($("#s-t-lo").value), Number($("#s-t-hi").value)], alpha: [Number($("#s-a-lo").value), Number($("#s-a-hi").value)] };
    space.method = [...document.querySelectorAll("input[name=method]:checked")].map((c) => c.value);
    const ls = $("#s-ls").value;
    space.logit_standardization = ls === "both" ? [false, true] : ls === "on";
    if (document.querySelector("input[name=students]:checked").value === "list") {
      try { space.students = JSON.parse($("#s-students").value); } catch (e) { showError($("#s-error"), `The student list is not valid JSON: ${e.message}`); return; }
    } else space.students = "auto";
    const ds = $("#s-dataset").value;
    const body = { name: $("#s-name").value, dataset: /^\d+$/.test(ds) ? Number(ds) : ds, teacher: Number($("#s-teacher").value), budget, space,
      trials: Number($("#s-trials").value), parallel: Number($("#s-parallel").value), epochs: Number($("#s-epochs").value) };
    try {
      const created = await apiSend("POST", "/api/searches/", body);
      location.href = `/searches/${created.id}/`;
    } catch (e) { showError($("#s-error"), e.message); }
  });
  // Before this a submit would be the browser's own (a page reload). Not `form.dataset`: the form's control
  // named "dataset" shadows it.
  $("#search-form").setAttribute("data-ready", "true");
}

// ---- live view -------------------------------------------------------------------------------------
let plot = null;
let points = [];

function drawScatter(search) {
  const cost = search.cost;
  const trained = search.trials.filter((t) => ["complete", "pruned"].includes(t.state) && t.figures && t.figures[cost] != null);
  const front = new Set(search.pareto);
  points = trained.map((t) => ({ x: t.figures[cost], y: t.state === "complete" ? t.metrics.val_acc : (t.metrics.val_acc ?? t.metrics.val_acc_last), state: t.state, exp: t.experiment, front: front.has(t.experiment) }))
    .filter((p) => typeof p.y === "number").sort((a, b) => a.x - b.x);
  const xs = [...new Set(points.map((p) => p.x))];
  const col = (pred) => xs.map((x) => { const ys = points.filter((p) => p.x === x && pred(p)).map((p) => p.y); return ys.length ? Math.max(...ys) : null; });
  const data = [xs, col((p) => p.state === "complete" && !p.front), col((p) => p.state === "pruned"), col((p) => p.front)];
  const dots = (stroke, fill) => ({ stroke, paths: () => null, points: { show: true, size: 9, stroke, fill } });
  const opts = {
    width: Math.min(900, $("#s-scatter").clientWidth || 600), height: 320,
    scales: { x: { time: false }, y: { range: [0, 1] } },
    axes: [{ label: COST_NAMES[cost] || cost }, { label: "validation accuracy" }],
    series: [{ label: COST_NAMES[cost] }, { label: "complete", ...dots("#2f6fde", "#2f6fde") }, { label: "pruned", ...dots("rgba(120,120,120,.35)", "rgba(120,120,120,.2)") },
      { label: "front", stroke: "#d9480f", width: 2, spanGaps: true, points: { show: true, size: 11, stroke: "#d9480f", fill: "#fff" } }],
  };
  if (plot) plot.destroy();
  $("#s-scatter").replaceChildren();
  plot = new uPlot(opts, data, $("#s-scatter"));
  plot.over.addEventListener("click", (ev) => {
    const r = plot.over.getBoundingClientRect();
    let best = null, bestD = 15 * 15;
    for (const p of points) {
      const dx = plot.valToPos(p.x, "x") - (ev.clientX - r.left), dy = plot.valToPos(p.y, "y") - (ev.clientY - r.top);
      if (dx * dx + dy * dy < bestD) { bestD = dx * dx + dy * dy; best = p; }
    }
    if (best && best.exp) location.href = `/experiments/${best.exp}/`;
  });
}

function renderSearch(s) {
  $("#s-title").textContent = s.name;
  $("#s-status").replaceChildren(badge(s.status));
  $("#search").dataset.status = s.status;
  $("#s-cost-name").textContent = COST_NAMES[s.cost] || s.cost;
  const p = s.status === "succeeded" ? 1 : s.progress;
  $("#s-progress").replaceChildren(progressBar(p, true, s.status));
  const counts = Object.entries(s.counts).map(([k, v]) => `${v} ${k}`).join(", ");
  $("#s-progress-text").textContent = `${Math.round(p * 100)}% of ${s.trials_total} trials${counts ? ` (${counts})` : ""}; ${s.trial_epochs} trial-epochs so far.`;
  const elapsed = s.started ? (Date.now() - new Date(s.started)) / 1000 : 0;
  $("#s-eta").textContent = ACTIVE.has(s.status) && p > 0.05 ? `about ${fmtDuration(elapsed * (1 - p) / p)} left` : "";
  $("#s-cancel").classList.toggle("hidden", !ACTIVE.has(s.status));
  $("#s-error-box").replaceChildren(...(s.status === "failed" ? [el("div", { class: "alert error", role: "alert", text: `This search failed: ${s.error || "no reason recorded"}` })] : []));
  const best = s.trials.find((t) => t.experiment === s.best);
  // "Use this student" leads to the downloads; a trial without an exported model gets a disabled button and why.
  const use = best && (best.exported
    ? el("a", { class: "btn", id: "use-student", href: `/experiments/${best.experiment}/#downloads`, text: "Use this student" })
    : el("span", {}, el("button", { class: "btn", id: "use-student", type: "button", disabled: true, "aria-describedby": "use-student-why", text: "Use this student" }),
      el("div", { class: "small muted", id: "use-student-why", text: NOT_EXPORTED })));
  $("#s-best").replaceChildren(...(best ? [
    el("div", { class: "stat", id: "best-trial" }, el("div", { class: "v", text: fmtPct(best.metrics.val_acc) }), el("div", { class: "l", text: `best inside the budget: ${studentText(best.params.student)}, ${methodText(best.params)}` })),
    el("div", { class: "stat" }, el("div", { class: "v", text: fmtCount(best.figures.params) }), el("div", { class: "l", text: "parameters" })),
    el("div", { class: "stat" }, use),
  ] : []));
  $("#trial-table tbody").replaceChildren(...s.trials.filter((t) => t.state !== "over_budget").map((t) => el("tr", { "data-state": t.state, "data-exported": t.exported ? "true" : "false", class: t.state === "pruned" ? "muted" : "" },
    el("td", { class: "num", text: String(t.number) }), el("td", {}, badge(t.state)), el("td", { text: studentText(t.params.student) }),
    el("td", { class: "num", text: fmtNum(t.params.temperature, 3) }), el("td", { class: "num", text: fmtNum(t.params.alpha, 3) }), el("td", { class: "method", text: methodText(t.params) }),
    el("td", { class: "num", text: fmtCount(t.figures.params) }), el("td", { class: "num hide-sm", text: t.figures.size_bytes ? fmtBytes(t.figures.size_bytes) : "" }),
    el("td", { class: "num hide-sm", text: t.figures.latency_ms != null ? `${fmtNum(t.figures.latency_ms, 3)} ms` : "" }),
    el("td", { class: "num", text: fmtPct(t.metrics.val_acc ?? t.metrics.val_acc_last) }), el("td", { class: "num hide-sm", text: fmtPct(t.metrics.test_acc) }),
    el("td", { class: "num hide-sm", text: t.metrics.epochs_run ?? t.metrics.epoch ?? "" }),
    el("td", {}, t.experiment ? el("a", { href: `/experiments/${t.experiment}/`, text: "open" }) : "",
      t.exported ? [" · ", el("a", { class: "use", href: `/experiments/${t.experiment}/#downloads`, text: "use" })]
        : ["complete", "pruned"].includes(t.state) ? [" · ", el("span", { class: "muted small no-model", title: NOT_EXPORTED, text: "no model" })] : ""))));
  const over = s.trials.filter((t) => t.state === "over_budget");
  $("#s-over-card").classList.toggle("hidden", !over.length);
  $("#s-over").replaceChildren(...over.map((t) => el("li", { text: `#${t.number} ${studentText(t.params.student)}: ${t.reason}` })));
  drawScatter(s);
}

async function detailPage() {
  const id = Number($("#search").dataset.id);
  let timer = null;
  const refresh = async () => { timer = null; try { renderSearch(await apiGet(`/api/searches/${id}/`)); } catch (e) { showError($("#s-error-box"), e.message); } };
  const soon = () => { if (!timer) timer = setTimeout(refresh, 300); };
  await refresh();
  $("#s-cancel").addEventListener("click", async () => {
    try { await apiSend("POST", `/api/searches/${id}/cancel/`); } catch (e) { showError($("#s-error-box"), e.message); }
    refresh();
  });
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const connect = () => {
    const socket = new WebSocket(`${proto}//${location.host}/ws/searches/${id}/`);
    socket.onopen = () => { $("#s-live").textContent = "● live"; soon(); };
    socket.onmessage = soon; // every trial or status message: the REST answer is the record
    socket.onclose = (ev) => { $("#s-live").textContent = ""; if (ev.code < 4000) setTimeout(connect, 2000); };
  };
  connect();
}

if ($("#search-table")) listPage();
else if ($("#search-form")) newPage();
else if ($("#search")) detailPage();
