// Live charts on uPlot: a deduplicating series store, step alignment, and panels that keep the user's zoom.
import uPlot from "uplot";
import { el } from "kd/api.js";

// Neighbours differ in hue and lightness, so runs 1 and 2 (or 2 and 5) never read as one colour.
export const PALETTE = ["#2f6fde", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#c92a2a", "#74b816", "#f59f00", "#364fc7", "#495057", "#d6336c", "#0b7285"];

// name -> sorted points; a (series, step) pair is stored once whatever order history and live messages arrive in.
export class SeriesStore {
  constructor() { this.series = new Map(); this.version = 0; }

  add(name, step, value) {
    if (typeof step !== "number" || !Number.isFinite(step)) return;
    const v = typeof value === "number" ? value : value === null ? null : Number(value);
    let s = this.series.get(name);
    if (!s) { s = { steps: [], values: [], index: new Map() }; this.series.set(name, s); }
    const i = s.index.get(step);
    if (i !== undefined) { if (s.values[i] !== v) { s.values[i] = v; this.version++; } return; }
    const n = s.steps.length;
    if (n === 0 || step > s.steps[n - 1]) {
      s.index.set(step, n); s.steps.push(step); s.values.push(v);
    } else {
      // Out of order (history arriving after live points): insert and reindex the tail.
      let lo = 0, hi = n;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (s.steps[mid] < step) lo = mid + 1; else hi = mid; }
      s.steps.splice(lo, 0, step); s.values.splice(lo, 0, v);
      for (let j = lo; j < s.steps.length; j++) s.index.set(s.steps[j], j);
    }
    this.version++;
  }

  addHistory(series) {
    for (const [name, pts] of Object.entries(series || {})) for (const p of pts) this.add(name, p[0], p[1]);
  }

  // {"type":"metric","step":S,"values":{...}} or {"type":"metrics","points":[{step, values}]}
  addMessage(msg) {
    if (msg.type === "metric") for (const [k, v] of Object.entries(msg.values || {})) this.add(k, msg.step, v);
    else if (msg.type === "metrics") for (const p of msg.points || []) for (const [k, v] of Object.entries(p.values || {})) this.add(k, p.step, v);
  }

  names() { return [...this.series.keys()]; }
  get(name) { return this.series.get(name); }
  count() { let n = 0; for (const s of this.series.values()) n += s.steps.length; return n; }
}

// Align several {xs, ys} onto one sorted x axis (uPlot wants one x array); gaps are null.
export function align(list) {
  if (!list.length) return [[]];
  // Fast path: series logged together share their steps (the usual case for losses).
  const x0 = list[0].xs;
  const same = list.every((s) => s.xs === x0 || (s.xs.length === x0.length && s.xs.every((x, i) => x === x0[i])));
  if (same) return [Float64Array.from(x0), ...list.map((s) => s.ys)];
  const set = new Set();
  for (const s of list) for (const x of s.xs) set.add(x);
  const xs = Float64Array.from(set).sort();
  const pos = new Map();
  xs.forEach((x, i) => pos.set(x, i));
  const out = [xs];
  for (const s of list) {
    const ys = new Array(xs.length).fill(null);
    for (let i = 0; i < s.xs.length; i++) ys[pos.get(s.xs[i])] = s.ys[i];
    out.push(ys);
  }
  return out;
}

// TensorBoard's smoothing: a debiased exponential moving average (weight 0 = raw).
export function ema(values, weight) {
  if (!weight) return values;
  const out = new Array(values.length);
  let last = 0, n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) { out[i] = v; continue; }
    last = last * weight + (1 - weight) * v;
    n++;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

function decadesOnly(u, splits) {
  return splits.map((v) => (v > 0 && Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-6 ? v : null));
}

function fmtTick(v, digits = 4) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a >= 1e6) return `${Number((v / 1e6).toPrecision(Math.max(3, digits - 1)))}M`;
  if (a >= 1e4) return `${Number((v / 1e3).toPrecision(Math.max(3, digits - 1)))}k`;
  if (a !== 0 && a < 1e-3) return v.toExponential(Math.max(1, digits - 3));
  return Number(v.toPrecision(digits)).toString();
}

// Axis labels: the fewest digits that tell neighbouring ticks apart (a learning rate decaying from
// 1e-3 to 9.8e-4 must not read "9.8e-4, 9.8e-4"), and one notation per axis.
export function fmtTicks(vals) {
  const shown = vals.filter((v) => v !== null && v !== undefined);
  const tiny = shown.some((v) => v !== 0 && Math.abs(v) < 1e-3);
  for (let d = 4; d <= 8; d++) {
    const fmt = (v) => (v === null || v === undefined ? "" : tiny && v !== 0 ? v.toExponential(Math.max(1, d - 3)) : fmtTick(v, d));
    const out = vals.map(fmt);
    const labels = out.filter(Boolean);
    if (new Set(labels).size === labels.length) return out;
  }
  return vals.map((v) => (v === null || v === undefined ? "" : String(v)));
}

// One chart card. update() takes labels + aligned data; the x zoom survives updates until double-click.
export class ChartPanel {
  constructor(parent, { key, title, xLabel = "step", logY = false, height = 230 }) {
    this.key = key;
    this.title = title;
    this.xLabel = xLabel;
    this.logY = logY;
    this.height = height;
    this.labels = null;
    this.zoomed = false;
    this.root = el("div", { class: "chart", "data-chart": key, "data-points": 0 },
      el("h3", { text: title }), this.body = el("div", { class: "chart-body" }));
    parent.append(this.root);
    this.body.addEventListener("mouseleave", () => setTimeout(() => this.showLatest(), 0));
    this.resizer = new ResizeObserver(() => { if (this.plot) this.plot.setSize(this.size()); });
    this.resizer.observe(this.root);
  }

  size() { return { width: Math.max(200, this.body.clientWidth || this.root.clientWidth - 24), height: this.height }; }

  build(labels, colors, data) {
    const keep = this.plot && this.zoomed ? { min: this.plot.scales.x.min, max: this.plot.scales.x.max } : null;
    if (this.plot) this.plot.destroy();
    const many = labels.length > 6;
    const opts = {
      ...this.size(),
      legend: { live: true },
      cursor: { drag: { x: true, y: false }, sync: { key: "kd" } },
      scales: { x: { time: false }, y: this.logY ? { distr: 3 } : {} },
      axes: [
        { label: this.xLabel, labelSize: 18, size: 32, values: (u, vals) => fmtTicks(vals), font: "11px system-ui", labelFont: "11px system-ui" },
        { size: 60, values: (u, vals) => fmtTicks(vals), font: "11px system-ui",
          // On a log axis, grid lines at the decades only: nine minor lines per decade read as grey bands.
          ...(this.logY ? { grid: { filter: decadesOnly }, ticks: { filter: decadesOnly } } : {}) },
      ],
      series: [{ label: this.xLabel, value: (u, v) => fmtTick(v, 6) },
        ...labels.map((label, i) => ({ label, stroke: colors[i], dash: this.dashes?.[i] || undefined, width: many ? 1 : 1.5, spanGaps: true, points: { show: false }, value: (u, v) => fmtTick(v) }))],
      hooks: {
        setScale: [(u, key) => {
          if (key !== "x") return;
          const xs = u.data[0];
          if (!xs || !xs.length) return;
          const span = (xs[xs.length - 1] - xs[0]) || 1;
          this.zoomed = u.scales.x.min > xs[0] + span * 1e-9 || u.scales.x.max < xs[xs.length - 1] - span * 1e-9;
          this.root.dataset.zoomed = this.zoomed ? "1" : "0";
        }],
      },
    };
    this.plot = new uPlot(opts, data, this.body);
    if (keep) { this.zoomed = true; this.plot.setScale("x", keep); }
    // uPlot finishes its first draw in a microtask, which resets the legend: fill it after that.
    setTimeout(() => this.showLatest(), 0);
  }

  update(labels, data, colors = labels.map((_, i) => PALETTE[i % PALETTE.length]), dashes = null) {
    this.dashes = dashes;
    let points = 0;
    for (let i = 1; i < data.length; i++) for (const v of data[i]) if (v !== null && v !== undefined) points++;
    this.root.dataset.points = points;
    const sig = labels.join("\u0000") + "|" + colors.join(",") + "|" + JSON.stringify(dashes);
    if (!this.plot || sig !== this.labels) {
      this.labels = sig;
      this.build(labels, colors, data);
      return;
    }
    // Keep the user's zoom: only autoscale when they have not zoomed in.
    this.plot.setData(data, !this.zoomed);
    setTimeout(() => this.showLatest(), 0);
  }

  // Off the chart, the legend shows the latest values rather than blanks (as TensorBoard and W&B do).
  showLatest() {
    const u = this.plot;
    if (!u || (u.cursor.left ?? -1) >= 0) return;
    const n = u.data[0]?.length || 0;
    if (!n) return;
    // Each series' own last point: a validation metric logged per epoch has gaps at the latest train step.
    const idxs = u.data.map((ys, i) => {
      if (i === 0) return n - 1;
      for (let j = ys.length - 1; j >= 0; j--) if (ys[j] !== null && ys[j] !== undefined) return j;
      return null;
    });
    u.setLegend({ idxs }, false);
  }

  setLogY(logY) { if (this.logY !== logY) { this.logY = logY; this.labels = null; } }
  setXLabel(x) { if (this.xLabel !== x) { this.xLabel = x; this.labels = null; this.zoomed = false; } }

  destroy() { this.resizer.disconnect(); if (this.plot) this.plot.destroy(); this.root.remove(); }
}

// Which panel a metric belongs on, from its name: replica{k}/train/loss -> "loss", val/acc -> "accuracy" ...
export function panelOf(name) {
  const base = name.replace(/^replica\d+\//, "").toLowerCase();
  if (/churn|disagree/.test(base)) return ["churn", "Churn (replica disagreement)"];
  if (/(^|[/_])lr$|learning_rate/.test(base)) return ["lr", "Learning rate"];
  if (/throughput|samples_per_s|per_sec|per_s$|speed/.test(base)) return ["throughput", "Throughput (samples/s)"];
  if (/agreement/.test(base)) return ["agreement", "Agreement with the teacher"];
  if (/acc/.test(base)) return ["accuracy", "Accuracy (train / val)"];
  // The train loss carries the T²-scaled soft term; validation loss gets its own scale.
  if (/^(val|test|ensemble\/val)\//.test(base) && /loss/.test(base)) return ["val_loss", "Validation loss"];
  if (/loss/.test(base)) return ["loss", "Training loss (total / hard / soft)"];
  if (/^epoch$|^time$|wall|elapsed|^progress$/.test(base)) return [null, null];
  if (/^exchange\//.test(base)) return ["exchange", "Exchange (step of the copies in use)"];
  return [`other:${base}`, base];
}

// Codistillation panels hold several replicas' series: one colour per replica, one dash per loss component,
// and the replicas' mean / ensemble in dark grey / black, so a dozen lines stay readable.
export function seriesStyle(names) {
  const perReplica = names.some((n) => /^replica\d+\//.test(n));
  return names.map((n, i) => {
    const m = /^replica(\d+)\//.exec(n);
    const dash = /loss_hard|\/hard/.test(n) ? [6, 3] : /loss_(soft|distill)/.test(n) ? [2, 3] : null;
    if (!perReplica) return { color: PALETTE[i % PALETTE.length], dash: null };
    if (m) return { color: PALETTE[Number(m[1]) % PALETTE.length], dash };
    return { color: /^ensemble\//.test(n) ? "#111" : "#868e96", dash };
  });
}

export const PANEL_ORDER = ["loss", "accuracy", "val_loss", "agreement", "churn", "lr", "throughput"];
