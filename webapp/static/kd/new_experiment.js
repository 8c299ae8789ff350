// New-experiment form: builds an ExperimentConfig (kd_core/config.py), shows student size live, launches (or sweeps).
import { $, apiGet, apiSend, el, fmtBytes, fmtCount, items, showError } from "kd/api.js";
import { paramCount } from "kd/params.js";

const q = new URLSearchParams(location.search);
let datasets = [];
let teachers = [];
// Config keys the form does not edit survive a clone unchanged.
let base = {};

const KIND_HELP = {
  distill: "Hinton et al. 2015: the student matches the teacher's softened outputs and the labels.",
  train: "Train a model on the labels alone: a baseline, or a teacher to distil later.",
  codistill: "Anil et al. 2018: replicas train together and each learns from the others' predictions.",
};

const num = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
const intList = (text) => text.split(/[\s,]+/).filter(Boolean).map(Number);
const numList = (text) => text.split(/[\s,;]+/).filter(Boolean).map(Number);

function spec() {
  const arch = $("#f-arch").value;
  if (arch === "resnet") return { arch, depth: Number($("#f-depth").value), width: Number($("#f-width").value) };
  const s = { arch, hidden: intList($("#f-hidden").value) };
  if (arch === "cnn") s.channels = intList($("#f-channels").value);
  const d = num("#f-dropout");
  if (d) s.dropout = d;
  return s;
}

function config() {
  const kind = $("#f-kind").value;
  const dsVal = $("#f-dataset").value;
  const c = { ...base, kind, dataset: /^\d+$/.test(dsVal) ? Number(dsVal) : dsVal, model: spec() };
  const name = $("#f-name").value.trim();
  if (name) c.name = name; else delete c.name;
  for (const k of ["epochs", "batch_size", "seed", "log_every"]) c[k] = Math.round(num(`#f-${k}`));
  for (const k of ["lr", "weight_decay", "momentum", "val_fraction", "test_fraction"]) c[k] = num(`#f-${k}`);
  const maxSteps = num("#f-max_steps");
  if (maxSteps) c.max_steps = Math.round(maxSteps); else delete c.max_steps;
  for (const k of ["optimizer", "schedule", "augment"]) c[k] = $(`#f-${k}`).value;
  if (kind === "distill") {
    c.teacher = Number($("#f-teacher").value) || null;
    c.temperature = num("#f-temperature");
    c.alpha = num("#f-alpha");
    c.soft_loss = $("#f-soft_loss").value;
  } else {
    delete c.teacher;
    delete c.teacher_arch;
  }
  if (kind === "codistill") {
    const cd = {};
    for (const k of ["replicas", "burn_in_steps", "exchange_every", "group_size"]) cd[k] = Math.round(num(`#c-${k}`));
    cd.weight = num("#c-weight");
    for (const k of ["loss", "exchange", "data", "placement"]) cd[k] = $(`#c-${k}`).value;
    c.codistill = cd;
  } else {
    delete c.codistill;
  }
  for (const [k, v] of Object.entries(c)) if (v === undefined || Number.isNaN(v)) delete c[k];
  return c;
}

function sweep() {
  if ($("#f-kind").value !== "distill") return null;
  const t = numList($("#f-sweep-t").value);
  const a = numList($("#f-sweep-a").value);
  if (!t.length && !a.length) return null;
  const s = {};
  if (t.length) s.temperature = t;
  if (a.length) s.alpha = a;
  return s;
}

function selectedDataset() { return datasets.find((d) => String(d.id) === $("#f-dataset").value); }
function selectedTeacher() { return teachers.find((t) => String(t.id) === $("#f-teacher").value); }

function sizeRow(label, value, frac, cls) {
  return el("div", { class: "bar" }, el("span", { class: "name", text: label }),
    el("span", { class: "track" }, el("span", { class: "fill", style: `width:${Math.max(1, Math.min(100, frac * 100)).toFixed(1)}%;${cls ? "background:#9aa5b4" : ""}` })),
    el("span", { class: "n", text: value }));
}

function updateSize() {
  const box = $("#size-box");
  const ds = selectedDataset();
  if (!ds) { box.replaceChildren(el("div", { class: "small muted", text: "Pick a dataset to see the student's size." })); return; }
  let n;
  try { n = paramCount(spec(), ds.input_shape, ds.num_classes); } catch (e) {
    box.replaceChildren(el("div", { class: "small", style: "color:var(--bad)", id: "student-params-error", text: e.message })); return;
  }
  const t = $("#f-kind").value === "distill" ? selectedTeacher() : null;
  const tp = t?.num_params;
  const rows = [el("div", { class: "small" }, "Student: ", el("strong", { id: "student-params", "data-params": n, text: `${fmtCount(n)} parameters` }),
    ` · ${fmtBytes(n * 4)} as float32`)];
  if (tp) {
    const max = Math.max(n, tp);
    rows.push(sizeRow("student", fmtCount(n), n / max), sizeRow("teacher", fmtCount(tp), tp / max, true),
      el("div", { class: "small muted", id: "size-ratio", text: n < tp ? `${(tp / n).toFixed(1)}× smaller than the teacher (${(100 * n / tp).toFixed(1)}% of its parameters)` : `${(n / tp).toFixed(2)}× the teacher's parameters: not a compression` }));
  }
  box.replaceChildren(...rows);
}

function updateKind() {
  const kind = $("#f-kind").value;
  $("#kind-help").textContent = KIND_HELP[kind];
  $("#teacher-field").classList.toggle("hidden", kind !== "distill");
  $("#kd-block").classList.toggle("hidden", kind !== "distill");
  $("#codistill-block").classList.toggle("hidden", kind !== "codistill");
}

function updateArch() {
  const arch = $("#f-arch").value;
  for (const f of document.querySelectorAll("#exp-form .field[class*='arch-']")) f.classList.toggle("hidden", !f.classList.contains(`arch-${arch}`));
}

function refresh() {
  updateKind();
  updateArch();
  updateSize();
  $("#wd-note").classList.toggle("strong", (num("#f-weight_decay") || 0) > 0);
  const s = sweep();
  const count = s ? (s.temperature?.length || 1) * (s.alpha?.length || 1) : 0;
  $("#sweep-count").textContent = s ? `Launches ${count} experiments, one per combination.` : "";
  $("#launch-btn").textContent = s ? `Launch ${count} experiments` : "Launch";
  $("#config-preview").textContent = JSON.stringify(s ? { ...config(), sweep: s } : config(), null, 2);
}

function fill(c) {
  const set = (id, v) => { if (v !== undefined && v !== null && $(id)) $(id).value = v; };
  set("#f-kind", c.kind);
  set("#f-name", c.name);
  set("#f-dataset", c.dataset);
  set("#f-teacher", c.teacher);
  for (const k of ["epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "seed", "augment", "temperature", "alpha", "soft_loss",
    "log_every", "max_steps", "momentum", "val_fraction", "test_fraction"]) set(`#f-${k}`, c[k]);
  const m = c.model || {};
  set("#f-arch", m.arch);
  if (m.hidden) set("#f-hidden", m.hidden.join(", "));
  if (m.channels) set("#f-channels", m.channels.join(", "));
  set("#f-dropout", m.dropout);
  set("#f-depth", m.depth);
  set("#f-width", m.width);
  for (const [k, v] of Object.entries(c.codistill || {})) set(`#c-${k}`, v);
}

function options(select, list, label, emptyText) {
  select.replaceChildren(...(list.length ? list.map((x) => el("option", { value: x.id, text: label(x) })) : [el("option", { value: "", text: emptyText })]));
}

function fits(t, ds) {
  if (!ds || !t) return true;
  const shapeOk = !t.input_shape || JSON.stringify(t.input_shape) === JSON.stringify(ds.input_shape);
  return shapeOk && (!t.num_classes || t.num_classes === ds.num_classes);
}

// Teachers that fit the chosen dataset first, uploaded ones before models trained here.
function fillTeachers() {
  const ds = selectedDataset();
  const keep = $("#f-teacher").value;
  const sorted = [...teachers].sort((a, b) => (fits(b, ds) - fits(a, ds)) || (!!a.source_experiment - !!b.source_experiment));
  options($("#f-teacher"), sorted, (t) => `${t.name} · ${fmtCount(t.num_params)} params${fits(t, ds) ? "" : " (does not fit this dataset)"}`,
    "no teacher yet: upload or train one");
  if (keep && sorted.some((t) => String(t.id) === keep)) $("#f-teacher").value = keep;
}

async function init() {
  try {
    [datasets, teachers] = await Promise.all([apiGet("/api/datasets/").then(items), apiGet("/api/checkpoints/").then(items)]);
  } catch (e) { showError($("#form-msg"), `Could not load your datasets and teachers: ${e.message}`); }
  datasets = datasets.filter((d) => !d.status || d.status === "ready");
  options($("#f-dataset"), datasets, (d) => `${d.name} · ${d.num_samples ?? "?"} samples, ${d.num_classes ?? "?"} classes`, "no dataset yet: upload one");
  if (!datasets.length) $("#dataset-help").replaceChildren("No datasets yet: ", el("a", { href: "/datasets/", text: "upload one" }), ".");

  $("#f-dataset").addEventListener("change", fillTeachers);
  if (q.get("clone")) {
    try {
      const exp = await apiGet(`/api/experiments/${encodeURIComponent(q.get("clone"))}/`);
      base = { ...(exp.config || {}) };
      fill(base);
      fillTeachers();
      if (base.teacher) $("#f-teacher").value = base.teacher;
      $("#f-name").value = `${exp.config?.name || exp.name || "experiment"}-copy`;
      $("#form-title").textContent = "Clone and edit";
      $("#clone-note").replaceChildren(el("div", { class: "alert note" }, "Pre-filled from ", el("a", { href: `/experiments/${exp.id}/`, text: `experiment #${exp.id} (${exp.name || exp.config?.name || ""})` }), ". Change what you want and launch."));
    } catch (e) { showError($("#clone-note"), `Could not clone: ${e.message}`); }
  } else {
    // Shortcuts from other pages: ?kind=train&name=teacher, ?teacher=7, ?dataset=3
    if (q.get("kind")) $("#f-kind").value = q.get("kind");
    if (q.get("name")) $("#f-name").value = q.get("name");
    if (q.get("dataset")) $("#f-dataset").value = q.get("dataset");
    else if (q.get("teacher")) {
      // "Distil this teacher": start from a dataset it fits, preferably the one it was trained on.
      const t = teachers.find((x) => String(x.id) === q.get("teacher"));
      const d = t && (datasets.find((x) => x.id === t.dataset && fits(t, x)) || datasets.find((x) => fits(t, x)));
      if (d) $("#f-dataset").value = d.id;
    }
    fillTeachers();
    if (q.get("teacher")) $("#f-teacher").value = q.get("teacher");
    if (q.get("kind") === "train" && q.get("name") === "teacher") { $("#f-hidden").value = "256, 128"; }
  }
  refresh();
}

$("#exp-form").addEventListener("input", refresh);
$("#exp-form").addEventListener("change", refresh);

$("#exp-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const msg = $("#form-msg");
  msg.replaceChildren();
  const c = config();
  if (!c.dataset && c.dataset !== 0) { showError(msg, "Pick a dataset (upload one on the Datasets page)."); return; }
  if (c.kind === "distill" && !c.teacher) { showError(msg, "Distillation needs a teacher: upload one or train one first."); return; }
  const s = sweep();
  if (s && [...(s.temperature || []), ...(s.alpha || [])].some((v) => Number.isNaN(v))) { showError(msg, "Sweep values must be numbers separated by commas."); return; }
  const btn = $("#launch-btn");
  btn.disabled = true;
  try {
    const res = await apiSend("POST", "/api/experiments/", s ? { ...c, sweep: s } : c);
    if (res.ids) location.href = `/compare/?ids=${res.ids.join(",")}`;
    else location.href = `/experiments/${res.id}/`;
  } catch (e) {
    showError(msg, e.message);
    btn.disabled = false;
  }
});

init();
