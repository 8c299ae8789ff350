// Teachers page: upload a checkpoint (format from the extension; a spec editor and the input normalisation for weights).
import { $, apiGet, apiSend, el, fmtCount, items, showError, uploadWithProgress } from "kd/api.js";

const FORMATS = { safetensors: "safetensors", pt: "state dict", pth: "state dict", ts: "TorchScript", onnx: "ONNX" };
const fileInput = $("#ck-file");
const archField = $("#arch-field");
const archText = $("#ck-arch");
const archErr = $("#arch-err");
const msg = $("#upload-msg");
const preField = $("#pre-field");
const preSelect = $("#ck-pre");
const preErr = $("#pre-err");
// The zoo's own architectures, and the libraries whose models a plain state dict may come from.
const ZOO = ["mlp", "cnn", "resnet"];
const LIBRARIES = ["torchvision", "timm"];
const IMAGENET = { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

function ext(name) { const m = /\.([a-z]+)$/i.exec(name || ""); return m ? m[1].toLowerCase() : ""; }

function onFile() {
  const f = fileInput.files[0];
  const e = ext(f?.name);
  msg.replaceChildren(); // a refusal was about the previous file
  $("#ck-format").textContent = f ? (FORMATS[e] || `unsupported (.${e})`) : "–";
  // A state dict carries no architecture; a safetensors file may (ours do), so its spec is optional.
  const weights = e === "pt" || e === "pth" || e === "safetensors";
  archField.classList.toggle("hidden", !weights);
  // Only weights can need it: a TorchScript or ONNX program carries its own preprocessing.
  preField.classList.toggle("hidden", !weights);
  $("#arch-help").firstChild.textContent = e === "safetensors"
    ? "Optional for safetensors: needed only when the file carries no model spec in its metadata, e.g. "
    : "A bare state dict holds only weights: say which model they belong to, e.g. ";
  archText.dataset.optional = e === "safetensors" ? "1" : "";
  if (e === "safetensors" && archText.dataset.touched !== "1") archText.value = "";
  if ((e === "pt" || e === "pth") && !archText.value.trim()) archText.value = '{"arch": "mlp", "hidden": [128]}';
  validateArch();
  validatePre();
}
fileInput.addEventListener("change", onFile);
archText.addEventListener("input", () => { archText.dataset.touched = "1"; validateArch(); });

function validateArch() {
  archErr.textContent = "";
  const text = archText.value.trim();
  if (!text) return archText.dataset.optional === "1" ? null : "required";
  try {
    const spec = JSON.parse(text);
    if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw new Error("the spec must be a JSON object");
    if (LIBRARIES.includes(spec.arch)) {
      // The server's check (kd_core.config): only arch, name and kwargs; the name is the library's.
      const unknown = Object.keys(spec).filter((k) => !["arch", "name", "kwargs"].includes(k));
      if (unknown.length) throw new Error(`unknown field(s) for arch ${spec.arch}: ${unknown.join(", ")}`);
      if (typeof spec.name !== "string" || !/^[A-Za-z0-9_.-]{1,100}$/.test(spec.name)) {
        throw new Error(`"name" must be a ${spec.arch} model name such as ${spec.arch === "torchvision" ? "resnet18" : "mobilenetv3_small_100"}`);
      }
      if (spec.kwargs !== undefined && spec.kwargs !== null && (typeof spec.kwargs !== "object" || Array.isArray(spec.kwargs))) {
        throw new Error('"kwargs" must be an object of builder arguments');
      }
    } else if (!ZOO.includes(spec.arch)) {
      throw new Error('"arch" must be "mlp", "cnn", "resnet", "torchvision" or "timm"');
    }
    return spec;
  } catch (e) { archErr.textContent = `Spec: ${e.message}`; return undefined; }
}

// Comma- or space-separated numbers; NaN marks a word that is not one.
function numbers(text) { return text.split(/[\s,]+/).filter(Boolean).map((t) => (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(t) ? Number(t) : NaN)); }

// Channels of the chosen dataset's inputs (the first dimension of its shape), when one is chosen.
function datasetChannels() {
  const shape = datasetShapes.get(Number($("#ck-dataset").value));
  return Array.isArray(shape) && shape.length ? shape[0] : null;
}

// Mirrors kd_core.config.validate_preprocessing (and, with a dataset chosen, its channel check):
// undefined when refused (the reason is shown next to the field), null for none.
function validatePre() {
  preErr.textContent = "";
  const custom = preSelect.value === "custom";
  $("#pre-custom").classList.toggle("hidden", !custom);
  for (const id of ["#ck-pre", "#ck-pre-mean", "#ck-pre-std"]) $(id).removeAttribute("aria-invalid");
  if (preSelect.value === "") return null;
  const value = custom ? { mean: numbers($("#ck-pre-mean").value), std: numbers($("#ck-pre-std").value) } : IMAGENET;
  const channels = datasetChannels();
  for (const part of ["mean", "std"]) {
    const list = value[part];
    const why = !list.length || list.length > 4096 ? "one number per input channel, separated by commas"
      : list.some((v) => !Number.isFinite(v)) ? `finite numbers only${part === "std" ? ", all positive" : ""}`
        : part === "std" && list.some((v) => v <= 0) ? "positive numbers only (it divides)"
          : channels && list.length !== 1 && list.length !== channels ? `1 or ${channels} numbers: the chosen dataset's inputs have ${channels} channel${channels === 1 ? "" : "s"}`
            : "";
    if (why) {
      preErr.textContent = `Preprocessing ${part}: ${why}.`;
      (custom ? $(part === "mean" ? "#ck-pre-mean" : "#ck-pre-std") : preSelect).setAttribute("aria-invalid", "true");
      return undefined;
    }
  }
  return value;
}
preSelect.addEventListener("change", validatePre);
for (const id of ["#ck-pre-mean", "#ck-pre-std", "#ck-dataset"]) $(id).addEventListener("input", validatePre);

// A refusal that names a field is shown next to it too (the whole message stays under the button).
function showFieldError(message) {
  if (!preField.classList.contains("hidden") && /preprocessing|normalis/i.test(message)) preErr.textContent = message;
  else if (!archField.classList.contains("hidden") && /'arch|spec|architecture/i.test(message)) archErr.textContent = message;
}

// A large upload is inspected by a worker (202 "inspecting"): wait for it to be ready or refused.
async function settled(ck) {
  const started = Date.now();
  while (ck.status === "inspecting" && Date.now() - started < 15 * 60_000) {
    $("#upload-pct").textContent = "inspecting…";
    await new Promise((r) => setTimeout(r, 1500));
    ck = await apiGet(`/api/checkpoints/${ck.id}/`);
  }
  if (ck.status === "failed") throw new Error(ck.error || "the file was refused");
  return ck;
}

function describePre(p) {
  if (!p) return null;
  const same = (a, b) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]) < 1e-9);
  const imagenet = same(p.mean, IMAGENET.mean) && same(p.std, IMAGENET.std);
  return `${imagenet ? "ImageNet: " : ""}mean ${p.mean.join(", ")} / std ${p.std.join(", ")}`;
}

$("#upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = fileInput.files[0];
  if (!f) { showError(msg, "Choose a file first."); return; }
  const e = ext(f.name);
  if (!FORMATS[e]) { showError(msg, "The file must end in .safetensors, .pt, .pth, .ts or .onnx."); return; }
  const fd = new FormData();
  fd.append("file", f);
  fd.append("name", $("#ck-name").value.trim() || f.name.replace(/\.[^.]+$/, ""));
  if (!archField.classList.contains("hidden")) {
    const spec = validateArch();
    if (spec === undefined) return;
    if (spec === "required") { archErr.textContent = "A state dict needs its architecture spec."; return; }
    if (spec) fd.append("arch", JSON.stringify(spec));
    const pre = validatePre();
    if (pre === undefined) { preSelect.focus(); return; }
    if (pre) fd.append("preprocessing", JSON.stringify(pre));
  }
  if ($("#ck-dataset").value) fd.append("dataset", $("#ck-dataset").value);
  const bar = $("#upload-progress");
  bar.classList.remove("hidden");
  $("#upload-btn").disabled = true;
  msg.replaceChildren();
  archErr.textContent = "";
  preErr.textContent = "";
  try {
    let ck = await uploadWithProgress("/api/checkpoints/", fd, (p) => {
      bar.firstElementChild.style.width = `${(p * 100).toFixed(1)}%`;
      $("#upload-pct").textContent = p < 1 ? `${Math.round(p * 100)}%` : "inspecting…";
    });
    if (ck.status === "inspecting") loadList();
    ck = await settled(ck);
    msg.replaceChildren(el("div", { class: "alert ok", text: `Teacher “${ck.name}” is ready.` }));
    $("#upload-form").reset();
    $("#ck-format").textContent = "–";
    archField.classList.add("hidden");
    preField.classList.add("hidden");
    validatePre();
    showFound(ck);
    loadList();
  } catch (err) {
    msg.replaceChildren(el("div", { class: "alert error", role: "alert", id: "upload-error" }, el("strong", { text: "Refused: " }), err.message));
    showFieldError(err.message);
    loadList();
  } finally {
    bar.classList.add("hidden");
    $("#upload-pct").textContent = "";
    $("#upload-btn").disabled = false;
  }
});

// An ONNX file may leave a dimension open (null or a name such as "batch"): shown as "any", never "null".
function shape(s) { return Array.isArray(s) ? `(${s.map((d) => (typeof d === "number" ? d : "any")).join(" × ")})` : "–"; }
let datasetNames = new Map();
let datasetShapes = new Map();
function stat(v, l) { return el("div", { class: "stat" }, el("div", { class: "v", text: v }), el("div", { class: "l", text: l })); }

function showFound(ck) {
  $("#found").replaceChildren(
    el("h3", { text: ck.name }),
    el("div", { class: "stats", id: "ck-stats" }, stat(fmtCount(ck.num_params), "parameters"),
      stat(shape(ck.input_shape), "input shape"), stat(ck.num_classes ?? "–", "classes"), stat(ck.format ?? "–", "format")),
    ck.arch ? el("pre", { style: "margin-top:.8rem", text: JSON.stringify(ck.arch) })
      : el("p", { class: "small muted", text: ck.format === "onnx" || ck.format === "torchscript" ? "A program (ONNX/TorchScript): it runs as it is, in the sandbox; no architecture spec is needed." : "No architecture spec recorded." }),
    ck.preprocessing ? el("p", { class: "small", id: "ck-pre-shown", text: `Input normalisation, applied inside the teacher: ${describePre(ck.preprocessing)}` }) : null,
    Array.isArray(ck.class_names) && ck.class_names.length ? el("p", { class: "small", text: `Classes, in output order: ${ck.class_names.slice(0, 20).join(", ")}${ck.class_names.length > 20 ? ", …" : ""}` }) : null,
    ck.dataset ? el("p", { class: "small", id: "ck-for", text: `For dataset “${datasetNames.get(ck.dataset) ?? `#${ck.dataset}`}”: “Distill this teacher” starts from it.` }) : null,
    el("div", { class: "row", style: "margin-top:1rem" },
      el("a", { class: "btn", href: `/experiments/new/?kind=distill&teacher=${ck.id}`, text: "Distill this teacher →" })));
}

function row(c) {
  return el("tr", { "data-id": c.id },
    el("td", {}, el("a", { href: "#", text: c.name, onclick: (e) => { e.preventDefault(); showFound(c); } }),
      el("div", { class: "small muted show-sm", text: `${fmtCount(c.num_params)} params · ${shape(c.input_shape)} · ${c.num_classes ?? "?"} classes${c.preprocessing ? " · normalised inputs" : ""}` })),
    el("td", { class: "hide-sm" }, c.format ?? "–",
      c.arch?.name ? el("div", { class: "small muted", text: `${c.arch.arch}/${c.arch.name}` }) : null,
      c.preprocessing ? el("div", { class: "small muted", title: describePre(c.preprocessing), text: "normalised inputs" }) : null), el("td", { class: "num hide-sm", text: fmtCount(c.num_params) }),
    el("td", { class: "mono hide-sm", text: shape(c.input_shape) }), el("td", { class: "num hide-sm", text: c.num_classes ?? "–" }),
    el("td", { class: "hide-sm" }, c.source_experiment ? el("a", { href: `/experiments/${c.source_experiment}/`, text: `experiment #${c.source_experiment}` })
      : c.status === "inspecting" ? "uploaded, being inspected…" : c.status === "failed" ? el("span", { class: "error", text: `refused: ${c.error}` })
        : c.dataset ? `uploaded for “${datasetNames.get(c.dataset) ?? `#${c.dataset}`}”` : "uploaded"),
    el("td", { class: "num actions" },
      c.status === "ready" || !c.status ? el("a", { class: "btn small secondary", href: `/experiments/new/?kind=distill&teacher=${c.id}`, text: "Distill" }) : null, " ",
      c.source_experiment ? null : el("button", { class: "btn small danger", type: "button", text: "Delete", onclick: async () => {
        if (!confirm(`Delete teacher “${c.name}”? Experiments that used it keep their results.`)) return;
        try { await apiSend("DELETE", `/api/checkpoints/${c.id}/`); loadList(); } catch (e) { alert(e.message); }
      } })));
}

// Uploaded teachers first; models trained here (every finished run has one) apart, the latest few shown,
// so a long history does not bury what the user uploaded on purpose.
const TRAINED_SHOWN = 5;
async function loadList() {
  const tbody = $("#ck-table tbody");
  try {
    const list = items(await apiGet("/api/checkpoints/"));
    const uploaded = list.filter((c) => !c.source_experiment);
    const trained = list.filter((c) => c.source_experiment).sort((a, b) => (a.role === "teacher" ? 0 : 1) - (b.role === "teacher" ? 0 : 1));
    tbody.replaceChildren(...(uploaded.length ? uploaded.map(row)
      : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No uploaded teachers yet: upload a trained model above, or use one trained here (below)." }))]));
    const all = $("#trained-all");
    const showAll = all.dataset.open === "1";
    $("#trained-table tbody").replaceChildren(...(trained.length ? (showAll ? trained : trained.slice(0, TRAINED_SHOWN)).map(row)
      : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "None yet: every finished experiment's model appears here. ", el("a", { href: "/experiments/new/?kind=train&name=teacher", text: "Train a teacher" }), ".")) ]));
    $("#trained-count").textContent = trained.length ? ` (${trained.length})` : "";
    all.classList.toggle("hidden", trained.length <= TRAINED_SHOWN);
    all.textContent = showAll ? "Show the latest 5" : `Show all ${trained.length}`;
  } catch (e) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, el("div", { class: "alert error", text: e.message }))));
  }
}
$("#trained-all").addEventListener("click", () => { $("#trained-all").dataset.open = $("#trained-all").dataset.open === "1" ? "" : "1"; loadList(); });

async function loadDatasets() {
  try {
    const list = items(await apiGet("/api/datasets/"));
    datasetNames = new Map(list.map((d) => [d.id, d.name]));
    datasetShapes = new Map(list.map((d) => [d.id, d.input_shape]));
    $("#ck-dataset").append(...list.filter((d) => !d.status || d.status === "ready").map((d) => el("option", { value: d.id, text: `${d.name} (${Array.isArray(d.input_shape) ? d.input_shape.join("×") : "?"}, ${d.num_classes ?? "?"} classes)` })));
  } catch { /* optional field */ }
}

loadDatasets().then(loadList);
