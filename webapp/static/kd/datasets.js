// Datasets page: upload (or import from the server) with a progress bar, watch ingestion, then show what it found.
import { $, apiGet, apiSend, el, fmtCount, items, progressBar, showError, uploadWithProgress } from "kd/api.js";

const form = $("#upload-form");
const fileInput = $("#ds-file");
const nameInput = $("#ds-name");
const labelField = $("#label-field");
const sizeField = $("#size-field");
const bar = $("#upload-progress");
const pct = $("#upload-pct");
const msg = $("#upload-msg");
const inspection = $("#inspection");

fileInput.addEventListener("change", () => {
  const f = fileInput.files[0];
  labelField.classList.toggle("hidden", !(f && /\.csv$/i.test(f.name)));
  sizeField.classList.toggle("hidden", !(f && /\.zip$/i.test(f.name)));
  if (f && !nameInput.value) nameInput.placeholder = f.name.replace(/\.[^.]+$/, "");
});

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = fileInput.files[0];
  if (!f) { showError(msg, "Choose a file first."); return; }
  if (!/\.(npz|csv|zip)$/i.test(f.name)) { showError(msg, "The file must end in .npz, .csv or .zip."); return; }
  const fd = new FormData();
  fd.append("file", f);
  fd.append("name", nameInput.value.trim() || f.name.replace(/\.[^.]+$/, ""));
  if (/\.csv$/i.test(f.name)) fd.append("label_column", $("#ds-label").value.trim() || "label");
  // Left empty, the server's default side applies; a bad value is refused by the API in words.
  if (/\.zip$/i.test(f.name) && $("#ds-size").value.trim()) fd.append("image_size", $("#ds-size").value.trim());
  msg.replaceChildren();
  bar.classList.remove("hidden");
  $("#upload-btn").disabled = true;
  const setP = (p) => { bar.firstElementChild.style.width = `${(p * 100).toFixed(1)}%`; pct.textContent = p < 1 ? `${Math.round(p * 100)}%` : "ingesting…"; };
  setP(0);
  try {
    const ds = await uploadWithProgress("/api/datasets/", fd, setP);
    // A large file answers 202 "ingesting": a worker writes its store, and the list polls until it settles.
    msg.replaceChildren(ds.status === "ingesting"
      ? el("div", { class: "alert note", id: "upload-ingesting", text: `Dataset “${ds.name}” is uploaded; a worker is ingesting it.` })
      : el("div", { class: "alert ok", text: `Dataset “${ds.name}” is ready.` }));
    form.reset();
    nameInput.placeholder = "taken from the file name";
    labelField.classList.add("hidden");
    sizeField.classList.add("hidden");
    await loadList();
    await show(ds.id, ds);
  } catch (e) {
    // The API's reason, verbatim: it names what is wrong with the file.
    msg.replaceChildren(el("div", { class: "alert error", role: "alert", id: "upload-error" },
      el("strong", { text: "Refused: " }), e.message));
  } finally {
    bar.classList.add("hidden");
    pct.textContent = "";
    $("#upload-btn").disabled = false;
  }
});

const importForm = $("#import-form");
importForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#import-msg");
  const path = $("#imp-path").value.trim();
  if (!path) { showError(out, "Give a path under the server's import folder."); return; }
  $("#import-btn").disabled = true;
  try {
    const size = $("#imp-size").value.trim();
    const ds = await apiSend("POST", "/api/datasets/", { name: $("#imp-name").value.trim() || undefined, import_path: path, image_size: size || undefined });
    out.replaceChildren(el("div", { class: "alert note", id: "import-ingesting", text: `Dataset “${ds.name}” is registered; a worker is ingesting it in place.` }));
    importForm.reset();
    await loadList();
    await show(ds.id, ds);
  } catch (e) {
    out.replaceChildren(el("div", { class: "alert error", role: "alert", id: "import-error" }, el("strong", { text: "Refused: " }), e.message));
  } finally {
    $("#import-btn").disabled = false;
  }
});

function shape(s) { return Array.isArray(s) ? `(${s.join(" × ")})` : (s ?? "–"); }

function classCounts(ds) {
  const src = ds.class_counts || ds.inspection?.class_counts || ds.class_balance || ds.inspection?.class_balance;
  if (!src) return null;
  const names = ds.class_names || ds.inspection?.class_names || [];
  if (Array.isArray(src) && !src.length) return null;
  if (Array.isArray(src)) return src.map((n, i) => [names[i] ?? String(i), n]);
  return Object.entries(src);
}

function balanceChart(pairs) {
  const max = Math.max(1, ...pairs.map(([, n]) => n));
  return el("div", { class: "bars", id: "class-balance" }, pairs.slice(0, 100).map(([name, n]) =>
    el("div", { class: "bar" },
      el("span", { class: "name", title: name, text: name }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `width:${(100 * n / max).toFixed(1)}%` })),
      el("span", { class: "n", text: fmtCount(n) }))));
}

function previewImages(ds) {
  const p = ds.preview || ds.inspection?.preview;
  // kd_core's inspection: {"kind": "image", "samples": [{"label", "png"}]}
  const imgs = p && (Array.isArray(p) ? p : (p.samples || p.images));
  if (!Array.isArray(imgs) || !imgs.length || (typeof imgs[0] !== "string" && !imgs[0]?.png && !imgs[0]?.image)) return null;
  const names = ds.class_names || [];
  return el("div", { class: "thumbs", id: "sample-grid" }, imgs.slice(0, 48).map((it) => {
    const src = typeof it === "string" ? it : (it.png || it.image);
    const url = src.startsWith("data:") ? src : `data:image/png;base64,${src}`;
    const lab = typeof it === "object" ? (it.label_name ?? (typeof it.label === "number" ? names[it.label] : it.label) ?? undefined) : undefined;
    return el("figure", {}, el("img", { src: url, alt: lab !== undefined ? `sample of ${lab}` : "sample" }),
      lab !== undefined ? el("figcaption", { text: lab }) : null);
  }));
}

function previewRows(ds) {
  const p = ds.preview || ds.inspection?.preview || {};
  const rows = ds.rows || ds.first_rows || ds.inspection?.rows || ds.inspection?.first_rows || p.rows;
  if (!Array.isArray(rows) || !rows.length) return null;
  const cols = ds.columns || ds.inspection?.columns || p.columns || (Array.isArray(rows[0]) ? rows[0].map((_, i) => `c${i}`) : Object.keys(rows[0]));
  const cell = (v) => el("td", { class: typeof v === "number" ? "num" : "", text: typeof v === "number" ? Number(v.toPrecision(5)) : String(v) });
  return el("div", { class: "tablewrap", id: "first-rows" }, el("table", { class: "keep-case" },
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", { text: c })))),
    el("tbody", {}, rows.slice(0, 10).map((r) => el("tr", {}, (Array.isArray(r) ? r : cols.map((c) => r[c])).map(cell))))));
}

// Answers can arrive out of order (the list's first pick, then an upload): only the latest request draws.
let showSeq = 0;
async function show(id, known) {
  const seq = ++showSeq;
  inspection.dataset.datasetId = id;
  let ds = known;
  try { ds = await apiGet(`/api/datasets/${id}/`); } catch (e) { if (!ds) { if (seq === showSeq) showError(inspection, e.message); return; } }
  if (seq !== showSeq) return;
  const parts = [el("h3", { text: ds.name })];
  if (ds.status === "ingesting") {
    parts.push(el("div", { class: "alert note", id: "ds-ingesting" },
      `Ingesting in the background: ${Math.round((ds.progress || 0) * 100)}% done; this page updates when it is ready.`,
      progressBar(ds.progress, true, "running")));
  }
  if (ds.error || ds.status === "failed" || ds.status === "refused") {
    parts.push(el("div", { class: "alert error", text: ds.error || "This dataset was refused." }));
  }
  parts.push(el("div", { class: "stats", id: "ds-stats" },
    stat(fmtCount(ds.num_samples), "samples"), stat(ds.num_classes ?? "–", "classes"),
    stat(shape(ds.input_shape), "input shape"), stat(ds.format ?? "–", "format")));
  const info = { ...(ds.inspection || {}), ...ds };
  if (info.splits) parts.push(el("p", { class: "small muted", style: "margin:.6rem 0 0", text: `Splits: ${fmtCount(info.splits.train)} train · ${fmtCount(info.splits.val)} val · ${fmtCount(info.splits.test)} test` }));
  for (const w of info.warnings || []) parts.push(el("div", { class: "alert note small", text: w }));
  const counts = classCounts(ds);
  // kd_core counts the training split only: say so, with how much of the file that is.
  const trainNote = info.splits ? ` (training split: ${fmtCount(info.splits.train)} of ${fmtCount(ds.num_samples)} samples)` : " (training split)";
  if (counts) parts.push(el("h3", { text: "Class balance", style: "margin-top:1rem" }, el("span", { class: "small muted", id: "balance-note", text: trainNote })), balanceChart(counts));
  else if (ds.class_names?.length) parts.push(el("p", { class: "small muted", text: `Classes: ${ds.class_names.join(", ")}` }));
  const imgs = previewImages(ds);
  if (imgs) parts.push(el("h3", { text: "Samples", style: "margin-top:1rem" }, el("span", { class: "small muted", text: " from the training split, a few per class" })), imgs);
  const rows = previewRows(ds);
  if (rows) parts.push(el("h3", { text: "Sample rows", style: "margin-top:1rem" }, el("span", { class: "small muted", id: "rows-note", text: " from the training split, not in file order; columns in file order" })), rows,
    el("p", { class: "small muted" }, "Every row with its line in the file: ", el("a", { href: `/api/datasets/${ds.id}/index/?format=csv`, text: "index.csv" }), "."));
  inspection.replaceChildren(...parts);
  inspection.dataset.datasetId = ds.id;
  inspection.dataset.status = ds.status ?? "ready";
}

let pollTimer = null;

function stat(v, l) { return el("div", { class: "stat" }, el("div", { class: "v", text: v }), el("div", { class: "l", text: l })); }

async function loadList() {
  const tbody = $("#ds-table tbody");
  try {
    const list = items(await apiGet("/api/datasets/"));
    if (!list.length) { tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No datasets yet. The built-in ones (digits, synthetic) need no upload." }))); return; }
    // Show the newest dataset's inspection until the user picks one.
    if (!inspection.dataset.datasetId) show(list[0].id, list[0]);
    clearTimeout(pollTimer);
    // Ingesting datasets: poll each second, redrawing the shown one as its progress moves.
    if (list.some((d) => d.status === "ingesting")) pollTimer = setTimeout(loadList, 1000);
    const shown = list.find((d) => String(d.id) === inspection.dataset.datasetId);
    if (shown && (shown.status !== inspection.dataset.status || shown.status === "ingesting")) show(shown.id, shown);
    tbody.replaceChildren(...list.map((d) => el("tr", { "data-id": d.id },
      el("td", {}, el("a", { href: "#", text: d.name, onclick: (e) => { e.preventDefault(); show(d.id, d); } })),
      el("td", { class: "hide-sm", text: d.format ?? "–" }), el("td", { class: "num hide-sm", text: fmtCount(d.num_samples) }),
      el("td", { class: "num hide-sm", text: d.num_classes ?? "–" }), el("td", { class: "mono hide-sm", text: shape(d.input_shape) }),
      el("td", {}, el("span", { class: `badge ${d.status === "ready" ? "succeeded" : d.status === "failed" ? "failed" : d.status === "ingesting" ? "running" : "queued"}`, text: d.status === "ingesting" ? `ingesting ${Math.round((d.progress || 0) * 100)}%` : (d.status ?? "ready") })),
      el("td", { class: "num" },
        (d.status ?? "ready") === "ready" ? el("a", { class: "btn small secondary", href: `/experiments/new/?dataset=${d.id}`, text: "Use" }) : null, " ",
        el("button", { class: "btn small danger", type: "button", text: "Delete", onclick: () => removeDataset(d) })))));
  } catch (e) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, el("div", { class: "alert error", text: e.message }))));
  }
}

// Deleting names the experiments that used the dataset (they keep their results, not the data).
async function removeDataset(d) {
  let used = [];
  try { used = items(await apiGet(`/api/experiments/?dataset=${d.id}&limit=1000`)); } catch { /* the plain question then */ }
  const names = used.slice(0, 8).map((e) => `  • ${e.name} (#${e.id}, ${e.status})`).join("\n");
  const more = used.length > 8 ? `\n  … and ${used.length - 8} more` : "";
  const question = used.length
    ? `Delete dataset “${d.name}”?\n\n${used.length} experiment(s) used it:\n${names}${more}\n\nThey keep their metrics and models, but cannot be re-run or cloned on it.`
    : `Delete dataset “${d.name}”? No experiment uses it.`;
  if (!confirm(question)) return;
  try {
    await apiSend("DELETE", `/api/datasets/${d.id}/`);
    if (inspection.dataset.datasetId === String(d.id)) {
      inspection.dataset.datasetId = "deleted"; // not replaced by another dataset behind the user's back
      inspection.replaceChildren(el("div", { class: "empty", text: `Dataset “${d.name}” was deleted.` }));
    }
    await loadList();
  } catch (e) { alert(e.message); }
}

loadList();
