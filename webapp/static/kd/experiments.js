// Experiments list: status, progress with ETA, headline metrics, filters, and selection for comparison.
import { $, ACTIVE, apiGet, apiSend, badge, el, fmtCount, fmtDate, fmtDuration, fmtPct, items, progressBar } from "kd/api.js";
import { paramCount } from "kd/params.js";

const selected = new Set();
let all = [];
let datasetNames = {};
let teachers = [];
let datasetCount = null;

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
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: 11, class: "muted" }, all.length ? "Nothing matches these filters." : el("span", {}, "No experiments yet. ", el("a", { href: "/experiments/new/", text: "Launch one" }), "."))));
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
          e.status === "failed" && e.error ? el("div", { class: "small row-error", title: e.error, text: e.error }) : null,
          el("div", { class: "show-sm", style: "margin-top:.2rem" }, badge(e.status))),
        el("td", { class: "hide-sm" }, el("span", { class: "badge kind", text: e.kind })),
        el("td", { class: "hide-sm", text: datasetName(e) }),
        el("td", { class: "hide-sm" }, badge(e.status)),
        el("td", {}, prog),
        el("td", { class: "num", text: fmtPct(m.val_acc) }),
        el("td", { class: "num hide-sm" }, fmtPct(m.test_acc), teacherDelta(e)),
        el("td", { class: "num hide-sm", text: fmtCount(m.student_params) }),
        el("td", { class: "hide-sm small", text: fmtDate(e.created) }),
        el("td", { class: "num" }, distilLink(e, "btn small secondary hide-sm"), stopButton(e)));
    }));
  }
  updateCompare();
  renderStartHere();
}

// A distilled student's accuracy means little without its teacher's: show the gap under it.
function teacherDelta(e) {
  const m = e.metrics || {};
  if (e.kind !== "distill" || typeof m.test_acc !== "number" || typeof m.teacher_acc !== "number") return null;
  const d = (m.test_acc - m.teacher_acc) * 100;
  return el("div", { class: "small muted", title: `teacher: ${fmtPct(m.teacher_acc)}`, text: `${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(1)} vs teacher` });
}

// A queued or running job can be stopped from the list, after a question that names it.
function stopButton(e) {
  if (e.status !== "queued" && e.status !== "running") return null;
  return el("button", { class: "btn small danger", type: "button", "data-stop": e.id, text: "Stop…", onclick: async (ev) => {
    if (!confirmStop(e)) return;
    ev.target.disabled = true;
    try { await apiSend("POST", `/api/experiments/${e.id}/cancel/`); } catch (err) { alert(`Could not stop “${e.name}”: ${err.message}`); }
    window.dispatchEvent(new Event("kd:jobs-changed"));
    load();
  } });
}

function confirmStop(e) {
  return confirm(`Stop “${e.name}” (#${e.id})?\n\nIt ends as cancelled${e.status === "running" ? " and keeps the best model it has so far" : ""}. This cannot be resumed; clone it to run again.`);
}

// A finished train experiment's model is a teacher: offer to distill it from its row.
function teacherOf(e) { return teachers.find((t) => t.source_experiment === e.id); }
function distilLink(e, cls) {
  const t = e.kind === "train" && e.status === "succeeded" ? teacherOf(e) : null;
  return t ? el("a", { class: cls, href: `/experiments/new/?kind=distill&teacher=${t.id}`, "data-distil": t.id, title: `Distill “${e.name}” into a smaller student`, text: "Distill" }) : null;
}

// The form's default student (mlp, one hidden layer of 64), sized against this teacher.
function defaultStudent(t) {
  let n = null;
  try { n = paramCount({ arch: "mlp", hidden: [64] }, t.input_shape, t.num_classes); } catch { /* unknown shape */ }
  if (!n || !t.num_params) return "a small student";
  return n < t.num_params ? `a ${fmtCount(n)}-parameter student, ${(t.num_params / n).toFixed(1)}× smaller` : `a ${fmtCount(n)}-parameter student`;
}

// First run: say plainly what to do next, until the user has launched a distillation of their own.
function renderStartHere() {
  const box = $("#start-here");
  if (all.some((e) => e.kind === "distill" || e.kind === "codistill")) { box.replaceChildren(); return; }
  const ready = all.find((e) => e.kind === "train" && e.status === "succeeded" && teacherOf(e));
  const t = ready ? teacherOf(ready) : teachers[0];
  if (t) {
    const acc = ready?.metrics?.test_acc;
    box.replaceChildren(el("section", { class: "card start", id: "start-distil" },
      el("div", { class: "start-text" },
        el("h2", { text: "Next: distill your teacher into a smaller model" }),
        el("p", {}, "“", el("strong", { text: t.name }), "” is ready",
          acc !== undefined ? ` (${fmtPct(acc)} test accuracy, ${fmtCount(t.num_params)} parameters)` : ` (${fmtCount(t.num_params)} parameters)`,
          `. One click opens a distillation with sensible defaults: ${defaultStudent(t)}, trained on the teacher's softened outputs (T = 4, alpha = 0.9).`)),
      el("a", { class: "btn big", id: "distil-now", href: `/experiments/new/?kind=distill&teacher=${t.id}`, text: "Distill it now →" })));
    return;
  }
  const training = all.find((e) => e.kind === "train" && ACTIVE.has(e.status));
  if (training) {
    box.replaceChildren(el("section", { class: "card start", id: "start-wait" },
      el("div", { class: "start-text" },
        el("h2", { text: "Your teacher is being trained" }),
        el("p", {}, el("a", { href: `/experiments/${training.id}/`, text: training.name || `#${training.id}` }),
          ` is ${training.status === "queued" ? "waiting for a worker" : `${Math.round((training.progress || 0) * 100)}% done`}.`,
          " When it finishes, a “Distill it now” button appears here; or upload a trained model on the ",
          el("a", { href: "/teachers/", text: "Teachers page" }), ".")),
      el("div", { class: "start-progress" }, progressBar(training.progress))));
    return;
  }
  if (datasetCount === 0) {
    box.replaceChildren(el("section", { class: "card start", id: "start-data" },
      el("div", { class: "start-text" }, el("h2", { text: "Start with data" }),
        el("p", { text: "Upload a dataset (NPZ, CSV or a ZIP of images), then train or upload a teacher to distill." })),
      el("a", { class: "btn big", href: "/datasets/", text: "Upload a dataset →" })));
    return;
  }
  box.replaceChildren(el("section", { class: "card start", id: "start-teacher" },
    el("div", { class: "start-text" }, el("h2", { text: "You need a teacher to distill" }),
      el("p", {}, "Train one here (a few minutes on a CPU for small data) or upload a trained model on the ",
        el("a", { href: "/teachers/", text: "Teachers page" }), ".")),
    el("a", { class: "btn big", href: "/experiments/new/?kind=train&name=teacher", text: "Train a teacher →" })));
}

function updateCompare() {
  const btn = $("#compare-btn");
  btn.disabled = selected.size < 1;
  btn.textContent = selected.size ? `Compare ${selected.size} selected` : "Compare selected";
  // The button at the top is out of sight below a long list: a bar at the bottom of the screen repeats it.
  $("#compare-bar").classList.toggle("hidden", selected.size < 1);
  $("#compare-bar-text").textContent = `${selected.size} selected`;
}

$("#compare-btn").addEventListener("click", () => { location.href = `/compare/?ids=${[...selected].join(",")}`; });
$("#compare-bar-btn").addEventListener("click", () => { location.href = `/compare/?ids=${[...selected].join(",")}`; });
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
    const [list, cks] = await Promise.all([apiGet("/api/experiments/"), apiGet("/api/checkpoints/").catch(() => null)]);
    all = items(list);
    if (cks) teachers = items(cks);
    render();
  } catch (e) {
    $("#exp-table tbody").replaceChildren(el("tr", {}, el("td", { colspan: 11 }, el("div", { class: "alert error", text: e.message }))));
  }
  // Poll quickly while something moves, slowly otherwise.
  setTimeout(load, all.some((e) => ACTIVE.has(e.status)) ? 2000 : 8000);
}

async function init() {
  try {
    const ds = items(await apiGet("/api/datasets/"));
    datasetNames = Object.fromEntries(ds.map((d) => [d.id, d.name]));
    datasetCount = ds.length;
    $("#flt-dataset").append(...ds.map((d) => el("option", { value: d.id, text: d.name })));
  } catch { /* the filter just lists no datasets */ }
  const q = new URLSearchParams(location.search);
  for (const [k, s] of [["status", "#flt-status"], ["kind", "#flt-kind"], ["dataset", "#flt-dataset"]]) if (q.get(k)) $(s).value = q.get(k);
  load();
}

init();
