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
  train: "Train a model on the labels alone: a baseline, or a teacher to distill later.",
  codistill: "Anil et al. 2018: replicas train together and each learns from the others' predictions.",
};

const num = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
const intList = (text) => text.split(/[\s,]+/).filter(Boolean).map(Number);
const numList = (text) => text.split(/[\s,;]+/).filter(Boolean).map(Number);

// A width list the user typed: whole numbers >= 1, or an error that names the field.
function widths(id, label) {
  const text = $(id).value;
  const vs = intList(text);
  const bad = text.split(/[\s,]+/).filter(Boolean).find((t) => !/^\d+$/.test(t) || Number(t) < 1);
  if (bad !== undefined) throw new FieldError(id, `${label}: “${bad}” is not a whole number ≥ 1 (write widths like “128, 64”).`);
  return vs;
}

class FieldError extends Error { constructor(field, message) { super(message); this.field = field; } }

function spec() {
  const arch = $("#f-arch").value;
  if (arch === "resnet") return { arch, depth: Number($("#f-depth").value), width: Number($("#f-width").value) };
  const s = { arch, hidden: widths("#f-hidden", "Hidden layers") };
  if (arch === "cnn") {
    s.channels = widths("#f-channels", "Conv channels");
    if (!s.channels.length) throw new FieldError("#f-channels", "Conv channels: give at least one width, e.g. “16, 32”.");
  }
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
  // The quick-launch summary says what the defaults will do, in the same numbers as the size box.
  if ($("#quick-summary")) {
    $("#quick-summary").textContent = tp
      ? `A ${fmtCount(n)}-parameter student (${n < tp ? `${(tp / n).toFixed(1)}× smaller than the teacher` : "not smaller than the teacher"}), ${num("#f-epochs") || "?"} epochs at T = ${num("#f-temperature") ?? "?"}, alpha = ${num("#f-alpha") ?? "?"}. Change anything below, or launch now.`
      : "Change anything below, or launch now.";
  }
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
  try {
    $("#config-preview").textContent = JSON.stringify(s ? { ...config(), sweep: s } : config(), null, 2);
  } catch (e) { $("#config-preview").textContent = e.message; }
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

// What each trained-here teacher came from (kind, test accuracy): a good default and an informed choice.
let sources = new Map();
function sourceOf(t) { return t.source_experiment ? sources.get(t.source_experiment) : null; }
function teacherRank(t) {
  const src = sourceOf(t);
  if (!t.source_experiment) return 2; // uploaded on purpose as a teacher
  return src?.kind === "train" ? 1 : 0; // a model trained on labels before a distilled student
}

// Teachers that fit the chosen dataset first; then uploaded ones, then models trained on labels here, best first.
function fillTeachers() {
  const ds = selectedDataset();
  const keep = $("#f-teacher").value;
  const acc = (t) => sourceOf(t)?.metrics?.test_acc ?? -1;
  const sorted = [...teachers].sort((a, b) => (fits(b, ds) - fits(a, ds)) || (teacherRank(b) - teacherRank(a)) || (acc(b) - acc(a)));
  options($("#f-teacher"), sorted, (t) => {
    const a = acc(t);
    return `${t.name} · ${fmtCount(t.num_params)} params${a >= 0 ? ` · ${(a * 100).toFixed(1)}% test acc` : ""}${fits(t, ds) ? "" : " (does not fit this dataset)"}`;
  }, "no teacher yet: upload or train one");
  if (keep && sorted.some((t) => String(t.id) === keep)) $("#f-teacher").value = keep;
}

async function init() {
  try {
    let exps;
    [datasets, teachers, exps] = await Promise.all([apiGet("/api/datasets/").then(items), apiGet("/api/checkpoints/").then(items),
      apiGet("/api/experiments/").then(items).catch(() => [])]);
    sources = new Map(exps.map((e) => [e.id, e]));
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
      // "Distill this teacher": start from a dataset it fits, preferably the one it was trained on.
      const t = teachers.find((x) => String(x.id) === q.get("teacher"));
      const d = t && (datasets.find((x) => x.id === t.dataset && fits(t, x)) || datasets.find((x) => fits(t, x)));
      if (d) $("#f-dataset").value = d.id;
    }
    fillTeachers();
    if (q.get("teacher")) $("#f-teacher").value = q.get("teacher");
    // Arriving from "Distill it now": the defaults are ready, so the launch button comes to the top of the form.
    const t = selectedTeacher();
    if (q.get("teacher") && t && String(t.id) === q.get("teacher") && ($("#f-kind").value === "distill" || !q.get("kind"))) {
      $("#f-kind").value = "distill";
      $("#clone-note").replaceChildren(el("div", { class: "card start", id: "quick-launch" },
        el("div", { class: "start-text" },
          el("h2", { text: `Distill “${t.name}”` }),
          el("p", { id: "quick-summary" })),
        el("button", { class: "btn big", type: "submit", form: "exp-form", id: "quick-launch-btn", text: "Launch with these settings" })));
    }
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
  let c;
  try { c = config(); } catch (e) {
    if (!(e instanceof FieldError)) throw e;
    showError(msg, e.message);
    $(e.field).focus();
    return;
  }
  // Empty number fields would silently fall back to the server's defaults: name them instead.
  const empty = [...document.querySelectorAll("#exp-form input[type=number]")].find((i) => i.required && i.value.trim() === "" && i.offsetParent !== null);
  if (empty) { showError(msg, `${document.querySelector(`label[for="${empty.id}"]`)?.textContent || empty.id}: enter a number.`); empty.focus(); return; }
  if (!c.dataset && c.dataset !== 0) { showError(msg, "Pick a dataset (upload one on the Datasets page)."); return; }
  if (c.kind === "distill" && !c.teacher) { showError(msg, "Distillation needs a teacher: upload one or train one first."); return; }
  const s = sweep();
  if (s && [...(s.temperature || []), ...(s.alpha || [])].some((v) => Number.isNaN(v))) { showError(msg, "Sweep values must be numbers separated by commas."); return; }
  const btn = $("#launch-btn");
  const label = btn.textContent;
  btn.disabled = true;
  btn.textContent = "Launching…";
  if ($("#quick-launch-btn")) $("#quick-launch-btn").disabled = true;
  try {
    const res = await apiSend("POST", "/api/experiments/", s ? { ...c, sweep: s } : c);
    if (res.ids) location.href = `/compare/?ids=${res.ids.join(",")}`;
    else location.href = `/experiments/${res.id}/`;
  } catch (e) {
    showError(msg, `Not launched: ${e.message}`);
    // The API names the config key at fault ('epochs', 'codistill.replicas'): take the user to that field.
    const key = /^'([\w.]+)'/.exec(e.message)?.[1];
    const field = key && ($(`#f-${key}`) || $(`#c-${key.replace(/^codistill\./, "")}`) || (key.startsWith("model.") ? $(`#f-${key.slice(6)}`) : null));
    if (field) field.focus();
    btn.disabled = false;
    btn.textContent = label;
    if ($("#quick-launch-btn")) $("#quick-launch-btn").disabled = false;
  }
});

init();
