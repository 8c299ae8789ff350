// New-experiment form: builds an ExperimentConfig (kd_core/config.py), shows student size live, launches (or sweeps).
import { $, apiGet, apiSend, el, fmtBytes, fmtCount, items, showError } from "kd/api.js";
import { paramCount } from "kd/params.js";

const q = new URLSearchParams(location.search);
let datasets = [];
let teachers = [];
// Config keys the form does not edit survive a clone unchanged.
let base = {};

const KIND_HELP = {
  distill: "The student learns from the teacher's outputs and the labels; the method is chosen under Distillation.",
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

// Each method's options as the form edits them (kd_core/config.py METHOD_OPTIONS; the inputs hold the papers' defaults).
const METHOD_FIELDS = {
  hinton: {},
  dkd: { alpha: "#f-dkd-alpha", beta: "#f-dkd-beta", warmup_epochs: "#f-dkd-warmup_epochs", ce_weight: "#f-ce_weight" },
  dist: { beta: "#f-dist-beta", gamma: "#f-dist-gamma", ce_weight: "#f-ce_weight" },
};
const METHOD_NAMES = { hinton: "Hinton KD", dkd: "DKD", dist: "DIST" };

// Methods ticked to run side by side (a sweep over `method`), or null when fewer than two are ticked.
function sweptMethods() {
  const m = [...document.querySelectorAll("input[name=sweep-method]:checked")].map((c) => c.value);
  return m.length >= 2 ? m : null;
}
// The methods this launch will run: the ticked ones, else the one chosen.
const methodsRun = () => sweptMethods() || [$("#f-method").value];

// Library models the architecture search has described: "torchvision/resnet18" -> {params, latency_ms}.
const libInfo = new Map();
let libQuery = null;

function librarySpec() {
  const text = $("#f-libname").value.trim();
  const [lib, name] = text.includes("/") ? text.split("/", 2) : ["torchvision", text];
  if (!name) throw new FieldError("#f-libname", "Library model: pick one from the list, e.g. “torchvision/resnet18”.");
  if (lib !== "torchvision" && lib !== "timm") throw new FieldError("#f-libname", `Library model: “${lib}” is not torchvision or timm.`);
  return { arch: lib, name, kwargs: {} };
}

// Search the server's architecture list (GET /api/architectures/) as the user types; the exact pick gets latency.
async function searchLibrary(exact) {
  const ds = selectedDataset();
  const text = $("#f-libname").value.trim();
  if (!ds || !/^\d+$/.test(String(ds.id))) return;
  const name = text.includes("/") ? text.split("/", 2)[1] : text;
  const key = `${ds.id}|${text}|${exact}`;
  if (libQuery === key) return;
  libQuery = key;
  const lib = text.includes("/") ? `&library=${encodeURIComponent(text.split("/", 2)[0])}` : "&library=torchvision";
  const url = exact
    ? `/api/architectures/?dataset=${ds.id}&q=${encodeURIComponent(name)}${lib}&limit=3&latency=1`
    : `/api/architectures/?dataset=${ds.id}&q=${encodeURIComponent(name)}${text.includes("/") ? lib : ""}&limit=40`;
  let body;
  try { body = await apiGet(url); } catch (e) { $("#lib-help").textContent = e.message; return; }
  const rows = (body.architectures || []).filter((r) => r.spec.name);
  for (const r of rows) libInfo.set(`${r.spec.arch}/${r.spec.name}`, { ...(libInfo.get(`${r.spec.arch}/${r.spec.name}`) || {}), ...r });
  if (!exact) {
    $("#lib-names").replaceChildren(...rows.map((r) => el("option", { value: `${r.spec.arch}/${r.spec.name}`,
      label: r.error ? "does not run at this size" : `${fmtCount(r.params)} parameters` })));
  }
  const missing = Object.keys(body.unavailable || {});
  if (missing.length) $("#lib-help").textContent = `Not installed on this server: ${missing.join(", ")}.`;
  updateSize();
}

function spec() {
  const arch = $("#f-arch").value;
  if (arch === "library") return librarySpec();
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
  for (const k of ["optimizer", "schedule", "augment", "keep"]) c[k] = $(`#f-${k}`).value;
  for (const k of ["method", "method_options", "logit_standardization"]) delete c[k];
  // The GPU path's settings are sent only when changed, so a default config stays short (and the server's defaults apply).
  for (const k of ["precision", "channels_last", "compile"]) delete c[k];
  if ($("#f-precision").value !== "auto") c.precision = $("#f-precision").value;
  for (const k of ["channels_last", "compile"]) if ($(`#f-${k}`).checked) c[k] = true;
  if (kind === "distill") {
    c.teacher = Number($("#f-teacher").value) || null;
    c.temperature = num("#f-temperature");
    const methods = methodsRun();
    // Side by side, each method runs with its paper's options (method_options belong to one method).
    if (!sweptMethods()) {
      c.method = methods[0];
      const opts = {};
      for (const [k, id] of Object.entries(METHOD_FIELDS[c.method])) opts[k] = num(id);
      if (Object.keys(opts).length) c.method_options = opts;
    }
    if (methods.includes("hinton")) {
      c.alpha = num("#f-alpha");
      c.soft_loss = $("#f-soft_loss").value;
    } else {
      delete c.alpha;
      delete c.soft_loss;
    }
    if (methods.some((m) => m !== "dist") && $("#f-logit_standardization").checked) c.logit_standardization = true;
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
  const a = methodsRun().includes("hinton") ? numList($("#f-sweep-a").value) : [];
  const m = sweptMethods();
  if (!t.length && !a.length && !m) return null;
  const s = {};
  if (m) s.method = m;
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
  if ($("#f-arch").value === "library") {
    let s;
    try { s = librarySpec(); } catch (e) { box.replaceChildren(el("div", { class: "small muted", text: e.message })); return; }
    const info = libInfo.get(`${s.arch}/${s.name}`);
    if (!info || info.params === undefined) {
      box.replaceChildren(el("div", { class: "small", style: info?.error ? "color:var(--bad)" : "", text: info?.error || "Looking up its size…" }));
      return;
    }
    if (info.latency_ms !== undefined) {
      $("#lib-help").textContent = `${fmtCount(info.params)} parameters · ${info.latency_ms.toFixed(2)} ms per sample on a CPU at ${ds.input_shape.join("×")}`;
    }
    n = info.params;
  } else try { n = paramCount(spec(), ds.input_shape, ds.num_classes); } catch (e) {
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
      ? `A ${fmtCount(n)}-parameter student (${n < tp ? `${(tp / n).toFixed(1)}× smaller than the teacher` : "not smaller than the teacher"}), ${num("#f-epochs") || "?"} epochs of ${methodsRun().map((m) => METHOD_NAMES[m]).join(" / ")} at T = ${num("#f-temperature") ?? "?"}${methodsRun().includes("hinton") ? `, alpha = ${num("#f-alpha") ?? "?"}` : ""}. Change anything below, or launch now.`
      : "Change anything below, or launch now.";
  }
}

// Optimisation steps the run will take, as the trainer counts them (kd_core batches_per_epoch), or null.
function estimatedSteps() {
  const ds = selectedDataset();
  const n = ds?.num_samples;
  const batch = num("#f-batch_size");
  const epochs = num("#f-epochs");
  if (!n || !(batch >= 1) || !(epochs >= 1)) return null;
  let train = Math.max(1, n - Math.round(n * (num("#f-val_fraction") ?? 0.1)) - Math.round(n * (num("#f-test_fraction") ?? 0.2)));
  if ($("#c-data").value === "disjoint") train = Math.max(1, Math.floor(train / Math.max(1, num("#c-replicas") || 1)));
  const full = Math.floor(train / batch), rest = train % batch;
  const perEpoch = full + (rest > 1 || (rest === 1 && full === 0) ? 1 : 0);
  const cap = num("#f-max_steps");
  return cap ? Math.min(cap, Math.round(epochs) * perEpoch) : Math.round(epochs) * perEpoch;
}

// Burn-in follows the run's length until the user types one: a quarter of the steps, at most 200 (the
// engine's default). A burn-in as long as the run would never codistill, so it is named before launch.
function updateBurnIn() {
  const box = $("#burn-in-note");
  if ($("#f-kind").value !== "codistill") { box.textContent = ""; return; }
  const steps = estimatedSteps();
  const input = $("#c-burn_in_steps");
  if (steps && input.dataset.touched !== "1") input.value = Math.min(200, Math.floor(steps / 4));
  const burn = num("#c-burn_in_steps");
  box.className = "help";
  if (!steps) { box.textContent = "Plain training before the distillation term starts."; return; }
  if (burn >= steps) {
    box.className = "help warn";
    box.textContent = `The run has about ${steps.toLocaleString("en-US")} steps: a burn-in of ${burn} means the replicas never learn from each other. Try ${Math.floor(steps / 4)}.`;
  } else {
    box.textContent = `Plain training for ${burn} of the run's ~${steps.toLocaleString("en-US")} steps, then the replicas learn from each other.`;
  }
}

function updateKind() {
  const kind = $("#f-kind").value;
  $("#kind-help").textContent = KIND_HELP[kind];
  $("#teacher-field").classList.toggle("hidden", kind !== "distill");
  $("#kd-block").classList.toggle("hidden", kind !== "distill");
  $("#codistill-block").classList.toggle("hidden", kind !== "codistill");
}

// The chosen method's one-line explanation (templates/_method_help.html) and only the options it reads.
function updateMethod() {
  const warmup = $("#f-dkd-warmup_epochs");
  const epochs = num("#f-epochs");
  if (warmup.dataset.touched !== "1" && epochs >= 1) warmup.value = Math.round((epochs * 20 / 240) * 100) / 100;
  const swept = sweptMethods();
  const methods = methodsRun();
  const standardizable = methods.some((m) => m !== "dist");
  // Side by side, the ticked methods replace the one chosen here: only their explanations stay.
  $("#f-method").classList.toggle("hidden", Boolean(swept));
  for (const li of document.querySelectorAll("#method-help li")) {
    li.hidden = li.dataset.method === "ls" ? !standardizable : !methods.includes(li.dataset.method);
  }
  $("#ls-field").classList.toggle("hidden", !standardizable);
  for (const f of document.querySelectorAll("#kd-block .method-opt")) {
    const shown = methods.some((m) => f.classList.contains(`opt-${m}`)) && (!swept || f.classList.contains("opt-hinton"));
    f.classList.toggle("hidden", !shown);
  }
}

function updateArch() {
  const arch = $("#f-arch").value;
  for (const f of document.querySelectorAll("#exp-form .field[class*='arch-']")) f.classList.toggle("hidden", !f.classList.contains(`arch-${arch}`));
}

function refresh() {
  updateKind();
  updateMethod();
  updateArch();
  updateSize();
  // The weight-decay advice matters only when weight decay is set.
  $("#wd-note").classList.toggle("hidden", !((num("#f-weight_decay") || 0) > 0));
  updateBurnIn();
  const s = sweep();
  const count = s ? Object.values(s).reduce((n, values) => n * values.length, 1) : 0;
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
  set("#f-method", c.method);
  if (c.logit_standardization !== undefined) $("#f-logit_standardization").checked = Boolean(c.logit_standardization);
  set("#f-precision", c.precision);
  for (const k of ["channels_last", "compile"]) if (c[k] !== undefined) $(`#f-${k}`).checked = Boolean(c[k]);
  for (const [k, v] of Object.entries(c.method_options || {})) {
    const id = METHOD_FIELDS[c.method || "hinton"]?.[k];
    if (!id) continue;
    set(id, v);
    if (k === "warmup_epochs") $(id).dataset.touched = "1";
  }
  for (const k of ["epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "seed", "augment", "keep", "temperature", "alpha", "soft_loss",
    "log_every", "max_steps", "momentum", "val_fraction", "test_fraction"]) set(`#f-${k}`, c[k]);
  const m = c.model || {};
  if (m.arch === "torchvision" || m.arch === "timm") {
    set("#f-arch", "library");
    set("#f-libname", `${m.arch}/${m.name}`);
  } else set("#f-arch", m.arch);
  if (m.hidden) set("#f-hidden", m.hidden.join(", "));
  if (m.channels) set("#f-channels", m.channels.join(", "));
  set("#f-dropout", m.dropout);
  set("#f-depth", m.depth);
  set("#f-width", m.width);
  for (const [k, v] of Object.entries(c.codistill || {})) set(`#c-${k}`, v);
  if (c.codistill?.burn_in_steps !== undefined) $("#c-burn_in_steps").dataset.touched = "1";
}

function options(select, list, label, emptyText) {
  select.replaceChildren(...(list.length ? list.map((x) => el("option", { value: x.id, text: label(x) })) : [el("option", { value: "", text: emptyText })]));
}

// A dimension an ONNX file leaves open (a name or null) fits any size.
function shapeFits(ts, ds) {
  if (!Array.isArray(ts) || !Array.isArray(ds)) return true;
  return ts.length === ds.length && ts.every((d, i) => typeof d !== "number" || d === ds[i]);
}
function fits(t, ds) {
  if (!ds || !t) return true;
  return shapeFits(t.input_shape, ds.input_shape) && (!t.num_classes || !ds.num_classes || t.num_classes === ds.num_classes);
}
const dims = (s) => (Array.isArray(s) ? s.map((d) => (typeof d === "number" ? d : "?")).join("×") : "?");
// Why a teacher cannot be distilled on a dataset, in the words the API uses.
function misfit(t, ds) {
  const why = [];
  if (t.num_classes && ds?.num_classes && t.num_classes !== ds.num_classes) why.push(`predicts ${t.num_classes} classes but “${ds.name}” has ${ds.num_classes}`);
  if (!shapeFits(t.input_shape, ds?.input_shape)) why.push(`takes inputs of shape ${dims(t.input_shape)} but “${ds.name}” has ${dims(ds.input_shape)}`);
  return `“${t.name}” ${why.join(" and ")}`;
}
function datasetName(id) { return datasets.find((d) => d.id === id)?.name; }

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
  const sorted = [...teachers].sort((a, b) => (teacherRank(b) - teacherRank(a)) || (acc(b) - acc(a)));
  const label = (t) => {
    const a = acc(t);
    const on = datasetName(t.dataset);
    return `${t.name} · ${fmtCount(t.num_params)} params${a >= 0 ? ` · ${(a * 100).toFixed(1)}% test acc` : ""}${on ? ` · for ${on}` : ""}`;
  };
  const ok = sorted.filter((t) => fits(t, ds));
  const bad = sorted.filter((t) => !fits(t, ds));
  const select = $("#f-teacher");
  // Teachers that cannot take this dataset are listed apart and cannot be picked.
  select.replaceChildren(
    ...(ok.length ? ok.map((t) => el("option", { value: t.id, text: label(t) }))
      : [el("option", { value: "", text: teachers.length ? "no teacher fits this dataset" : "no teacher yet: upload or train one" })]),
    bad.length ? el("optgroup", { label: "Do not fit this dataset", id: "misfit-teachers" },
      bad.map((t) => el("option", { value: t.id, disabled: true, text: `${label(t)} · ${misfit(t, ds).replace(`“${t.name}” `, "")}` }))) : null);
  if (keep && ok.some((t) => String(t.id) === keep)) select.value = keep;
  $("#teacher-help").textContent = ok.length ? "A model you uploaded or trained here." : teachers.length
    ? `None of your ${teachers.length} teacher(s) fits “${ds?.name ?? "this dataset"}”: pick another dataset, or train a teacher on this one.`
    : "No teacher yet: upload one on the Teachers page, or train one here.";
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

  $("#f-dataset").addEventListener("change", () => {
    fillTeachers();
    // The quick-launch card names one pairing; another dataset means the user decides below.
    if ($("#quick-launch")) $("#quick-launch").remove();
  });
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
    let paired = null;
    const wanted = teachers.find((x) => String(x.id) === q.get("teacher"));
    if (!q.get("dataset") && wanted) {
      // "Distill this teacher": the dataset it was trained on or uploaded for; else the only one it fits.
      const own = datasets.find((x) => x.id === wanted.dataset && fits(wanted, x));
      const fitting = datasets.filter((x) => fits(wanted, x));
      paired = own || (fitting.length === 1 ? fitting[0] : null);
      if (paired) $("#f-dataset").value = paired.id;
      else if (fitting.length) $("#f-dataset").value = fitting[0].id;
    }
    fillTeachers();
    if (wanted && fits(wanted, selectedDataset())) $("#f-teacher").value = wanted.id;
    const t = selectedTeacher();
    if (wanted && ($("#f-kind").value === "distill" || !q.get("kind"))) {
      $("#f-kind").value = "distill";
      const ds = selectedDataset();
      if (t && String(t.id) === q.get("teacher") && (paired || q.get("dataset"))) {
        // The teacher and its own dataset are known: the defaults are ready, so the launch button comes to the top.
        $("#clone-note").replaceChildren(el("div", { class: "card start", id: "quick-launch" },
          el("div", { class: "start-text" },
            el("h2", { text: `Distill “${t.name}” on “${ds.name}”` }),
            el("p", { id: "quick-summary" }),
            el("div", { id: "quick-msg", "aria-live": "polite" })),
          el("button", { class: "btn big", type: "submit", form: "exp-form", id: "quick-launch-btn", text: "Launch with these settings" })));
      } else if (t && String(t.id) === q.get("teacher")) {
        // It fits several datasets and none is recorded as its own: the user picks, nothing launches by itself.
        $("#clone-note").replaceChildren(el("div", { class: "alert note", id: "pair-note" },
          `“${wanted.name}” fits more than one of your datasets and none is recorded as the one it was trained on. `,
          `“${ds.name}” is selected: check the Dataset field below before launching.`));
      } else {
        const near = datasets.map((d) => misfit(wanted, d).replace(`“${wanted.name}” `, ""));
        $("#clone-note").replaceChildren(el("div", { class: "alert error", id: "pair-note", role: "alert" },
          el("strong", { text: `“${wanted.name}” fits none of your datasets. ` }),
          datasets.length ? `It ${near[0]}. ` : "You have no dataset yet. ",
          "Upload the dataset it was trained on (same columns or image size, same classes), or ", el("a", { href: "/teachers/", text: "upload a teacher" }), " made for one of yours."));
      }
    }
    if (q.get("kind") === "train" && q.get("name") === "teacher") { $("#f-hidden").value = "256, 128"; }
  }
  refresh();
}

$("#exp-form").addEventListener("input", refresh);
let libTimer = null;
$("#f-libname").addEventListener("input", () => { clearTimeout(libTimer); libTimer = setTimeout(() => searchLibrary(false), 250); });
$("#f-libname").addEventListener("change", () => searchLibrary(true));
$("#c-burn_in_steps").addEventListener("input", () => { $("#c-burn_in_steps").dataset.touched = "1"; });
$("#f-dkd-warmup_epochs").addEventListener("input", () => { $("#f-dkd-warmup_epochs").dataset.touched = "1"; });
$("#exp-form").addEventListener("change", refresh);

// --- errors where the eye is: every bad field marked, the message beside the button that was pressed ---

// A config key ('epochs', 'codistill.replicas', 'model.hidden') -> the form field that edits it.
function fieldFor(key) {
  if (key.startsWith("codistill.")) return $(`#c-${key.slice(10)}`);
  if (key === "model.name" || key.startsWith("model.kwargs")) return $("#f-libname");
  if (key.startsWith("model.")) return $(`#f-${key.slice(6)}`) || $("#f-arch");
  if (key === "model") return $("#f-arch");
  if (key.startsWith("method_options.")) return $(METHOD_FIELDS[$("#f-method").value]?.[key.slice(15)] || "#f-method");
  if (key === "method_options") return $("#f-method");
  return $(`#f-${key}`);
}

function labelOf(input) { return document.querySelector(`label[for="${input.id}"]`)?.textContent.trim() || input.id; }

function clearMarks() {
  for (const f of document.querySelectorAll("#exp-form .field.invalid")) f.classList.remove("invalid");
  for (const m of document.querySelectorAll("#exp-form .field-error")) m.remove();
  for (const i of document.querySelectorAll("#exp-form [aria-invalid]")) i.removeAttribute("aria-invalid");
}

// Mark each input with its own message; the hidden "Advanced" part opens when one of its fields is bad.
function mark(problems) {
  for (const [input, text] of problems) {
    const box = input.closest(".field");
    if (!box) continue;
    box.classList.add("invalid");
    input.setAttribute("aria-invalid", "true");
    box.append(el("div", { class: "field-error", text }));
    const details = input.closest("details");
    if (details) details.open = true;
  }
}

// The message next to the pressed button (the quick-launch card, or the bottom of the form), scrolled into view.
function report(text, problems, button) {
  clearMarks();
  mark(problems);
  const list = problems.length > 1 ? el("ul", {}, problems.map(([input, t]) => el("li", {}, el("strong", { text: `${labelOf(input)}: ` }), t))) : null;
  const box = el("div", { class: "alert error", role: "alert", id: "launch-error" }, el("div", { text }), list);
  const near = button?.id === "quick-launch-btn" ? $("#quick-msg") : $("#form-msg");
  $("#form-msg").replaceChildren();
  if ($("#quick-msg")) $("#quick-msg").replaceChildren();
  near.replaceChildren(box);
  box.scrollIntoView({ block: "center" });
  const first = problems.find(([input]) => input.offsetParent !== null)?.[0];
  if (first) first.focus({ preventScroll: true });
}

// What the browser can tell before asking the server: unreadable widths, empty numbers, a missing choice.
function localProblems() {
  const problems = [];
  for (const [id, label] of [["#f-hidden", "Hidden layers"], ["#f-channels", "Conv channels"]]) {
    if ($(id).closest(".field").classList.contains("hidden")) continue;
    try { widths(id, label); } catch (e) { problems.push([$(id), e.message.replace(`${label}: `, "")]); }
  }
  for (const input of document.querySelectorAll("#exp-form input[type=number]")) {
    if (input.required && input.value.trim() === "" && input.offsetParent !== null) problems.push([input, "enter a number"]);
  }
  if (!$("#f-dataset").value) problems.push([$("#f-dataset"), "pick a dataset (upload one on the Datasets page)"]);
  if ($("#f-kind").value === "distill") {
    const t = selectedTeacher();
    if (!t) problems.push([$("#f-teacher"), "distillation needs a teacher: upload one or train one first"]);
    else if (!fits(t, selectedDataset())) problems.push([$("#f-teacher"), misfit(t, selectedDataset())]);
  }
  const s = sweep();
  if (s && [...(s.temperature || []), ...(s.alpha || [])].some((v) => Number.isNaN(v))) problems.push([$("#f-sweep-t"), "sweep values must be numbers separated by commas"]);
  if ($("#f-kind").value === "distill" && sweptMethods()?.includes("dist") && $("#f-logit_standardization").checked) {
    problems.push([$("#f-logit_standardization"), "does not apply to DIST (its correlations ignore the logits' scale): untick it, or leave DIST out"]);
  }
  return problems;
}

$("#exp-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const button = ev.submitter || $("#launch-btn");
  const local = localProblems();
  if (local.length) {
    report(local.length > 1 ? `Not launched: ${local.length} fields need a look.` : `Not launched: ${labelOf(local[0][0])}: ${local[0][1]}.`, local, button);
    return;
  }
  const c = config();
  const s = sweep();
  clearMarks();
  $("#form-msg").replaceChildren();
  const buttons = [$("#launch-btn"), $("#quick-launch-btn")].filter(Boolean);
  const labels = buttons.map((b) => b.textContent);
  for (const b of buttons) b.disabled = true;
  button.textContent = "Launching…";
  try {
    const res = await apiSend("POST", "/api/experiments/", s ? { ...c, sweep: s } : c);
    if (res.ids) location.href = `/compare/?ids=${res.ids.join(",")}`;
    else location.href = `/experiments/${res.id}/`;
  } catch (e) {
    // The API names every bad config key in `fields`; older answers name one key at the start of `error`.
    const fields = e.fields || {};
    const key = /^'([\w.]+)'/.exec(e.message)?.[1];
    if (!Object.keys(fields).length && key) fields[key] = e.message;
    const problems = Object.entries(fields).map(([k, text]) => [fieldFor(k), text]).filter(([input]) => input);
    const all = problems.length > 1 && problems.length === Object.keys(fields).length;
    report(all ? `Not launched: ${problems.length} fields need a look.` : `Not launched: ${e.message}`, problems, button);
    buttons.forEach((b, i) => { b.disabled = false; b.textContent = labels[i]; });
  }
});

init();
