// Datasets page: upload with a progress bar, then show what the inspection found (or why it was refused).
import { $, apiGet, apiSend, el, fmtCount, items, showError, uploadWithProgress } from "kd/api.js";

const form = $("#upload-form");
const fileInput = $("#ds-file");
const nameInput = $("#ds-name");
const labelField = $("#label-field");
const bar = $("#upload-progress");
const pct = $("#upload-pct");
const msg = $("#upload-msg");
const inspection = $("#inspection");

fileInput.addEventListener("change", () => {
  const f = fileInput.files[0];
  labelField.classList.toggle("hidden", !(f && /\.csv$/i.test(f.name)));
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
  msg.replaceChildren();
  bar.classList.remove("hidden");
  $("#upload-btn").disabled = true;
  const setP = (p) => { bar.firstElementChild.style.width = `${(p * 100).toFixed(1)}%`; pct.textContent = p < 1 ? `${Math.round(p * 100)}%` : "inspecting…"; };
  setP(0);
  try {
    const ds = await uploadWithProgress("/api/datasets/", fd, setP);
    // A large file answers 202 "inspecting": a worker reads it, and the list polls until it settles.
    msg.replaceChildren(ds.status === "inspecting"
      ? el("div", { class: "alert note", id: "upload-inspecting", text: `Dataset “${ds.name}” is uploaded; a worker is inspecting it.` })
      : el("div", { class: "alert ok", text: `Dataset “${ds.name}” is ready.` }));
    form.reset();
    nameInput.placeholder = "taken from the file name";
    labelField.classList.add("hidden");
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
  return el("div", { class: "tablewrap", id: "first-rows" }, el("table", {},
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", { text: c })))),
    el("tbody", {}, rows.slice(0, 10).map((r) => el("tr", {}, (Array.isArray(r) ? r : cols.map((c) => r[c])).map(cell))))));
}

async function show(id, known) {
  let ds = known;
  try { ds = await apiGet(`/api/datasets/${id}/`); } catch (e) { if (!ds) { showError(inspection, e.message); return; } }
  const parts = [el("h3", { text: ds.name })];
  if (ds.status === "inspecting") parts.push(el("div", { class: "alert note", id: "ds-inspecting", text: "Inspecting this file in the background; this page updates when it is done." }));
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
  if (counts) parts.push(el("h3", { text: "Class balance", style: "margin-top:1rem" }), balanceChart(counts));
  else if (ds.class_names?.length) parts.push(el("p", { class: "small muted", text: `Classes: ${ds.class_names.join(", ")}` }));
  const imgs = previewImages(ds);
  if (imgs) parts.push(el("h3", { text: "Samples", style: "margin-top:1rem" }), imgs);
  const rows = previewRows(ds);
  if (rows) parts.push(el("h3", { text: "First rows", style: "margin-top:1rem" }), rows);
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
    if (list.some((d) => d.status === "inspecting")) pollTimer = setTimeout(loadList, 2000);
    const shown = list.find((d) => String(d.id) === inspection.dataset.datasetId);
    if (shown && shown.status !== inspection.dataset.status) show(shown.id, shown);
    tbody.replaceChildren(...list.map((d) => el("tr", { "data-id": d.id },
      el("td", {}, el("a", { href: "#", text: d.name, onclick: (e) => { e.preventDefault(); show(d.id, d); } })),
      el("td", { text: d.format ?? "–" }), el("td", { class: "num", text: fmtCount(d.num_samples) }),
      el("td", { class: "num", text: d.num_classes ?? "–" }), el("td", { class: "mono", text: shape(d.input_shape) }),
      el("td", {}, el("span", { class: `badge ${d.status === "ready" ? "succeeded" : d.status === "failed" ? "failed" : d.status === "inspecting" ? "running" : "queued"}`, text: d.status ?? "ready" })),
      el("td", { class: "num" },
        (d.status ?? "ready") === "ready" ? el("a", { class: "btn small secondary", href: `/experiments/new/?dataset=${d.id}`, text: "Use" }) : null, " ",
        el("button", { class: "btn small danger", type: "button", text: "Delete", onclick: async () => {
          if (!confirm(`Delete dataset “${d.name}”?`)) return;
          try { await apiSend("DELETE", `/api/datasets/${d.id}/`); await loadList(); } catch (e) { alert(e.message); }
        } })))));
  } catch (e) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, el("div", { class: "alert error", text: e.message }))));
  }
}

loadList();
