// Compare page: overlaid curves per metric (smoothing, x by step/epoch/time, log y), config diff, sortable finals, CSV.
import { $, apiGet, badge, el, fmtBytes, fmtCount, fmtNum, fmtPct, items } from "kd/api.js";
import { ChartPanel, PALETTE, align, ema } from "kd/charts.js";

const ids = (new URLSearchParams(location.search).get("ids") || "").split(",").map((s) => s.trim()).filter((s) => /^\d+$/.test(s)).map(Number);
let exps = []; // [{id, name, kind, status, config, metrics, series}]
const panels = new Map();
const state = { smooth: 0, x: "step", logY: false, replicas: false, sort: { key: "test_acc", dir: -1 } };

const FINALS = [
  ["val_acc", "Val acc", fmtPct], ["test_acc", "Test acc", fmtPct], ["teacher_acc", "Teacher acc", fmtPct],
  ["student_params", "Params", fmtCount], ["student_size_bytes", "Size", fmtBytes],
  ["student_latency_ms", "Latency ms", (v) => fmtNum(v, 3)], ["compression", "Compression", (v) => (v ? `${fmtNum(v, 3)}×` : "–")],
  ["speedup", "Speed-up", (v) => (v ? `${fmtNum(v, 3)}×` : "–")],
];

function label(e) { return `#${e.id} ${e.name || e.config?.name || ""}`.trim(); }

// Legends and column heads name runs by what differs between them ("#3 temperature=2 alpha=0.5"), which
// stays short for a sweep; the full name is in the tooltips and the final-metrics table.
// Runs are named by their names when those tell them apart; otherwise by the config values that differ,
// with datasets and teachers by name ("dataset=blobs"), never by database id.
let shortLabels = new Map();
let refNames = { dataset: new Map(), teacher: new Map() };
function named(key, value) {
  const names = refNames[key];
  return names && names.has(value) ? names.get(value) : value;
}
function computeShortLabels() {
  const nameList = exps.map((e) => (e.name || "").trim());
  if (nameList.every(Boolean) && new Set(nameList).size === nameList.length) {
    shortLabels = new Map(exps.map((e) => [e.id, e.name.length > 48 ? `${e.name.slice(0, 47)}…` : e.name]));
    return;
  }
  const flats = exps.map((e) => flatten(e.config));
  const keys = [...new Set(flats.flatMap((f) => Object.keys(f)))].filter((k) => k !== "name" && new Set(flats.map((f) => f[k])).size > 1);
  shortLabels = new Map(exps.map((e, i) => [e.id, keys.length >= 1 && keys.length <= 3
    ? `${e.name || `#${e.id}`}: ${keys.map((k) => `${k.replace(/^codistill\./, "")}=${named(k, flats[i][k]) ?? "–"}`).join(", ")}` : label(e)]));
}

// Readable chart titles for the series the engine logs; any other name is shown with its parts spaced.
const TITLES = {
  "train/loss": "Training loss (total)", "train/loss_hard": "Training loss: labels part", "train/loss_soft": "Training loss: teacher part",
  "train/loss_distill": "Training loss: distillation part", "train/acc": "Training accuracy", "val/loss": "Validation loss",
  "val/acc": "Validation accuracy", "val/agreement": "Agreement with the teacher (validation)", lr: "Learning rate",
  "train/samples_per_s": "Throughput (samples/s)", "ensemble/val/acc": "Ensemble validation accuracy", churn: "Churn (replicas disagree)",
};
function title(name) {
  return TITLES[name] || name.replace(/[/_]+/g, " ").replace(/^./, (c) => c.toUpperCase());
}
function short(e) { return shortLabels.get(e.id) || label(e); }
function color(i) { return PALETTE[i % PALETTE.length]; }

// /api/compare/ gives configs and final metrics; each experiment's series come with wall time (with_time=1).
async function load() {
  const data = await apiGet(`/api/compare/?ids=${ids.join(",")}`);
  const listed = Array.isArray(data.experiments) ? data.experiments : items(data);
  const byId = new Map(listed.map((x) => [Number(x.id), x]));
  exps = await Promise.all(ids.map(async (id) => {
    const e = byId.get(id) || (await apiGet(`/api/experiments/${id}/`));
    const m = await apiGet(`/api/experiments/${id}/metrics/?max_points=2000&with_time=1`);
    return { ...e, id, series: m.series || {} };
  }));
}

// The x of a point [step, value, time]: the step, the epoch (interpolated from the logged "epoch"
// series) or seconds since the experiment's first logged point.
function xMapper(e) {
  if (state.x === "step") return (p) => p[0];
  if (state.x === "epoch") {
    const ep = e.series.epoch;
    if (!ep || !ep.length) return null;
    return (p) => {
      const s = p[0];
      if (s <= ep[0][0]) return (ep[0][1] * s) / Math.max(ep[0][0], 1);
      for (let i = 1; i < ep.length; i++) if (s <= ep[i][0]) {
        const [s0, e0] = ep[i - 1], [s1, e1] = ep[i];
        return e0 + ((e1 - e0) * (s - s0)) / Math.max(s1 - s0, 1);
      }
      const [sl, el_] = ep[ep.length - 1];
      return (el_ * s) / Math.max(sl, 1);
    };
  }
  let t0 = Infinity;
  for (const pts of Object.values(e.series)) for (const p of pts) if (typeof p[2] === "number" && p[2] < t0) t0 = p[2];
  if (!Number.isFinite(t0)) return null;
  return (p) => (typeof p[2] === "number" ? p[2] - t0 : null);
}

function metricNames() {
  const names = new Set();
  for (const e of exps) for (const n of Object.keys(e.series)) {
    if (/^(epoch|exchange\/)/.test(n)) continue;
    if (!state.replicas && /^replica\d+\//.test(n)) continue;
    names.add(n);
  }
  const order = [/^train\/loss$/, /^train\/.*loss/, /loss/, /^val\/acc$/, /acc/, /agreement/, /churn/, /^lr$/, /samples_per_s/];
  const rank = (n) => { const i = order.findIndex((re) => re.test(n)); return i < 0 ? order.length : i; };
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function drawCharts() {
  const container = $("#charts");
  const names = metricNames();
  const mappers = exps.map(xMapper);
  const missing = exps.filter((_, i) => !mappers[i]).map(label);
  $("#xaxis-note").textContent = missing.length
    ? `No ${state.x === "epoch" ? "epoch series" : "timestamps"} for ${missing.join(", ")}: drawn against steps.`
    : state.x === "time" ? "Seconds since each experiment logged its first point." : "";
  const xLabel = state.x === "time" ? "seconds" : state.x;
  for (const [key, p] of panels) if (!names.includes(key)) { p.destroy(); panels.delete(key); }
  let total = 0;
  for (const name of names) {
    if (!panels.has(name)) panels.set(name, new ChartPanel(container, { key: name, title: title(name), logY: state.logY, xLabel }));
    const panel = panels.get(name);
    panel.setLogY(state.logY);
    panel.setXLabel(xLabel);
    const list = [], labels = [], colors = [];
    exps.forEach((e, i) => {
      const pts = e.series[name];
      if (!pts || !pts.length) return;
      const map = mappers[i] || ((p) => p[0]);
      const kept = pts.filter((p) => map(p) !== null);
      list.push({ xs: kept.map(map), ys: ema(kept.map((p) => (state.logY && p[1] <= 0 ? null : p[1])), state.smooth) });
      labels.push(short(e));
      colors.push(color(i));
    });
    panel.update(labels, align(list), colors);
    total += Number(panel.root.dataset.points);
    container.append(panel.root);
  }
  container.dataset.points = total;
}

function finalsTable() {
  const t = $("#final-table");
  const { key, dir } = state.sort;
  const val = (e, k) => (k === "name" ? label(e) : k === "status" ? e.status : e.metrics?.[k]);
  const rows = exps.map((e, i) => ({ e, i })).sort((a, b) => {
    const x = val(a.e, key), y = val(b.e, key);
    if (x === undefined || x === null) return 1;
    if (y === undefined || y === null) return -1;
    return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * dir;
  });
  // The best value of each column in bold: highest accuracy / compression / speed-up, smallest size / latency.
  const best = {};
  if (exps.length > 1) for (const [k] of FINALS) {
    const vs = exps.map((e) => e.metrics?.[k]).filter((v) => typeof v === "number");
    if (new Set(vs).size > 1) best[k] = /params|size|latency/.test(k) ? Math.min(...vs) : Math.max(...vs);
  }
  const sortBy = (k, num) => {
    state.sort = { key: k, dir: key === k ? -dir : (num ? -1 : 1) };
    finalsTable();
    $(`#final-table th[data-key="${k}"]`).focus();
  };
  // Sortable by keyboard too: each head is focusable and says how the table is sorted.
  const head = (k, text, num) => el("th", {
    class: `sortable ${num ? "num" : ""} ${key === k ? (dir > 0 ? "sorted-asc" : "sorted-desc") : ""}`, "data-key": k, text,
    tabindex: 0, "aria-sort": key === k ? (dir > 0 ? "ascending" : "descending") : "none",
    onclick: () => sortBy(k, num),
    onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortBy(k, num); } },
  });
  t.replaceChildren(
    el("thead", {}, el("tr", {}, head("name", "Experiment"), head("status", "Status"), ...FINALS.map(([k, text]) => head(k, text, true)))),
    el("tbody", {}, rows.map(({ e, i }) => el("tr", { "data-id": e.id },
      el("td", {}, el("span", { style: `display:inline-block;width:.7rem;height:.7rem;border-radius:2px;margin-right:.4rem;background:${color(i)}` }),
        el("a", { href: `/experiments/${e.id}/`, text: label(e) })),
      el("td", {}, badge(e.status)),
      ...FINALS.map(([k, , f]) => el("td", { class: `num${best[k] !== undefined && e.metrics?.[k] === best[k] ? " best" : ""}`, text: f(e.metrics?.[k]) }))))));
}

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v) && k !== "model" && k !== "teacher_arch") flatten(v, `${prefix}${k}.`, out);
    else out[`${prefix}${k}`] = Array.isArray(v) || (v && typeof v === "object") ? JSON.stringify(v) : String(v);
  }
  return out;
}

function configTable() {
  const flats = exps.map((e) => flatten(e.config));
  const keys = [...new Set(flats.flatMap((f) => Object.keys(f)))].sort();
  const only = $("#diff-only").checked;
  const rows = keys.map((k) => ({ k, vals: flats.map((f) => f[k] ?? "–") })).map((r) => ({ ...r, diff: new Set(r.vals).size > 1 }));
  const shown = only ? rows.filter((r) => r.diff) : rows;
  $("#config-table").classList.add("keep-case");
  $("#config-table").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", { text: "Key" }), ...exps.map((e) => el("th", { title: label(e), text: short(e) })))),
    el("tbody", {}, shown.length ? shown.map((r) => el("tr", { class: r.diff && !only ? "diff" : "", "data-key": r.k },
      el("td", { class: "mono", text: r.k }), ...r.vals.map((v) => el("td", { class: "mono", text: named(r.k, v) }))))
      : el("tr", {}, el("td", { colspan: exps.length + 1, class: "muted", text: "The configs are identical." }))));
}

function exportCsv() {
  const lines = ["experiment_id,experiment,series,step,value"];
  const q = (s) => `"${String(s).replace(/"/g, '""')}"`;
  for (const e of exps) for (const [name, pts] of Object.entries(e.series)) for (const [s, v] of pts) lines.push(`${e.id},${q(e.name || "")},${q(name)},${s},${v ?? ""}`);
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  const a = el("a", { href: URL.createObjectURL(blob), download: `compare-${ids.join("-")}.csv` });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function seg(id, key, parse = (v) => v) {
  $(id).addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (!b) return;
    for (const x of $(id).children) { x.classList.toggle("on", x === b); x.setAttribute("aria-pressed", String(x === b)); }
    state[key] = parse(b.dataset.v);
    drawCharts();
  });
}

async function init() {
  if (!ids.length) {
    const box = el("div", { class: "empty", id: "cmp-empty" }, "Pick two or more experiments on the ", el("a", { href: "/experiments/", text: "Experiments page" }), " and press “Compare selected”.");
    $("#cmp-msg").replaceChildren(box);
    // Shortcuts to what people usually compare: their sweeps, and their latest finished runs.
    try {
      const list = items(await apiGet("/api/experiments/"));
      const links = [];
      const groups = new Map();
      for (const e of list) if (e.sweep_group) groups.set(e.sweep_group, [...(groups.get(e.sweep_group) || []), e]);
      for (const members of [...groups.values()].slice(0, 3)) {
        links.push(el("a", { class: "btn small secondary", href: `/compare/?ids=${members.map((e) => e.id).sort((a, b) => a - b).join(",")}`, text: `sweep of ${members.length} (${members[0].name.replace(/\s*\[.*$/, "")})` }));
      }
      const done = list.filter((e) => e.status === "succeeded").slice(0, 5);
      if (done.length >= 2) links.push(el("a", { class: "btn small secondary", id: "cmp-latest", href: `/compare/?ids=${done.map((e) => e.id).join(",")}`, text: `your latest ${done.length} finished runs` }));
      if (links.length) box.append(el("div", { class: "row", style: "justify-content:center;margin-top:.7rem;flex-wrap:wrap" }, el("span", { class: "small", text: "Or compare:" }), ...links));
    } catch { /* the plain hint stands */ }
    return;
  }
  $("#cmp-msg").replaceChildren(el("div", { class: "empty", id: "cmp-loading", text: `Loading ${ids.length} experiment${ids.length === 1 ? "" : "s"} and their curves…` }));
  try {
    const [dsList, ckList] = await Promise.all([apiGet("/api/datasets/").then(items).catch(() => []), apiGet("/api/checkpoints/").then(items).catch(() => [])]);
    refNames = { dataset: new Map(dsList.map((d) => [String(d.id), d.name])), teacher: new Map(ckList.map((c) => [String(c.id), c.name])) };
    await load();
  } catch (e) {
    $("#cmp-msg").replaceChildren(el("div", { class: "alert error", role: "alert", text: e.message }));
    return;
  }
  $("#cmp-msg").replaceChildren();
  $("#cmp-title").textContent = `Compare ${exps.length} experiment${exps.length === 1 ? "" : "s"}`;
  $("#cmp-body").classList.remove("hidden");
  $("#csv-btn").disabled = false;
  $("#csv-btn").addEventListener("click", exportCsv);
  $("#smooth").addEventListener("input", () => { state.smooth = Number($("#smooth").value); $("#smooth-val").textContent = state.smooth.toFixed(2); drawCharts(); });
  seg("#xaxis", "x");
  seg("#yaxis", "logY", (v) => v === "log");
  $("#replicas").addEventListener("change", () => { state.replicas = $("#replicas").checked; drawCharts(); });
  $("#diff-only").addEventListener("change", configTable);
  computeShortLabels();
  drawCharts();
  finalsTable();
  configTable();
}

init();
