// Experiments list: status, progress with ETA, headline metrics, filters, and selection for comparison.
import { $, ACTIVE, apiGet, badge, el, fmtCount, fmtDate, fmtDuration, fmtPct, items, progressBar } from "kd/api.js";

const selected = new Set();
let all = [];
let datasetNames = {};

// The list gives the dataset as {"id", "name"}.
function datasetOf(e) { const d = e.dataset ?? e.config?.dataset; return d && typeof d === "object" ? d.id : d; }
function datasetName(e) { const d = e.dataset; return d && typeof d === "object" ? d.name : (datasetNames[datasetOf(e)] ?? datasetOf(e) ?? "–"); }

// Experiments launched by one sweep share a group: link them to one comparison.
function sweepLink(e) {
  if (!e.sweep_group) return null;
  const members = all.filter((x) => x.sweep_group === e.sweep_group).map((x) => x.id);
  return el("div", { class: "small muted" }, `sweep of ${members.length} · `,
    el("a", { href: `/compare/?ids=${members.sort((a, b) => a - b).join(",")}`, text: "compare" }));
}

function render() {
  const st = $("#flt-status").value, kind = $("#flt-kind").value, ds = $("#flt-dataset").value;
  const rows = all.filter((e) => (!st || e.status === st) && (!kind || e.kind === kind) && (!ds || String(datasetOf(e)) === ds));
  $("#count").textContent = `${rows.length} of ${all.length}`;
  const tbody = $("#exp-table tbody");
  if (!rows.length) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: 10, class: "muted" }, all.length ? "Nothing matches these filters." : el("span", {}, "No experiments yet. ", el("a", { href: "/experiments/new/", text: "Launch one" }), "."))));
  } else {
    tbody.replaceChildren(...rows.map((e) => {
      const m = e.metrics || {};
      const eta = e.eta_s ?? m.eta_s;
      const prog = e.status === "running" || e.status === "queued"
        ? el("div", { class: "progresscell" }, progressBar(e.progress), el("div", { class: "small muted", text: `${Math.round((e.progress || 0) * 100)}%${eta ? ` · ${fmtDuration(eta)} left` : ""}` }))
        : el("div", { class: "progresscell" }, progressBar(e.status === "succeeded" ? 1 : e.progress, false, e.status));
      const cb = el("input", { type: "checkbox", class: "pick", "aria-label": `select ${e.name}`, value: e.id });
      cb.checked = selected.has(e.id);
      cb.addEventListener("change", () => { cb.checked ? selected.add(e.id) : selected.delete(e.id); updateCompare(); });
      return el("tr", { "data-id": e.id, "data-status": e.status },
        el("td", {}, cb),
        el("td", {}, el("a", { href: `/experiments/${e.id}/`, text: e.name || `#${e.id}` }), sweepLink(e),
          el("div", { class: "show-sm", style: "margin-top:.2rem" }, badge(e.status))),
        el("td", { class: "hide-sm" }, el("span", { class: "badge kind", text: e.kind })),
        el("td", { class: "hide-sm", text: datasetName(e) }),
        el("td", { class: "hide-sm" }, badge(e.status)),
        el("td", {}, prog),
        el("td", { class: "num", text: fmtPct(m.val_acc) }),
        el("td", { class: "num hide-sm", text: fmtPct(m.test_acc) }),
        el("td", { class: "num hide-sm", text: fmtCount(m.student_params) }),
        el("td", { class: "hide-sm small", text: fmtDate(e.created) }));
    }));
  }
  updateCompare();
}

function updateCompare() {
  const btn = $("#compare-btn");
  btn.disabled = selected.size < 1;
  btn.textContent = selected.size ? `Compare ${selected.size} selected` : "Compare selected";
}

$("#compare-btn").addEventListener("click", () => { location.href = `/compare/?ids=${[...selected].join(",")}`; });
$("#select-all").addEventListener("change", (ev) => {
  for (const cb of document.querySelectorAll("#exp-table .pick")) {
    cb.checked = ev.target.checked;
    const id = Number(cb.value);
    cb.checked ? selected.add(id) : selected.delete(id);
  }
  updateCompare();
});
for (const id of ["#flt-status", "#flt-kind", "#flt-dataset"]) $(id).addEventListener("change", () => {
  const p = new URLSearchParams();
  for (const [k, s] of [["status", "#flt-status"], ["kind", "#flt-kind"], ["dataset", "#flt-dataset"]]) if ($(s).value) p.set(k, $(s).value);
  history.replaceState(null, "", p.toString() ? `?${p}` : location.pathname);
  render();
});

async function load() {
  try {
    all = items(await apiGet("/api/experiments/"));
    render();
  } catch (e) {
    $("#exp-table tbody").replaceChildren(el("tr", {}, el("td", { colspan: 10 }, el("div", { class: "alert error", text: e.message }))));
  }
  // Poll quickly while something moves, slowly otherwise.
  setTimeout(load, all.some((e) => ACTIVE.has(e.status)) ? 2000 : 8000);
}

async function init() {
  try {
    const ds = items(await apiGet("/api/datasets/"));
    datasetNames = Object.fromEntries(ds.map((d) => [d.id, d.name]));
    $("#flt-dataset").append(...ds.map((d) => el("option", { value: d.id, text: d.name })));
  } catch { /* the filter just lists no datasets */ }
  const q = new URLSearchParams(location.search);
  for (const [k, s] of [["status", "#flt-status"], ["kind", "#flt-kind"], ["dataset", "#flt-dataset"]]) if (q.get(k)) $(s).value = q.get(k);
  load();
}

init();
