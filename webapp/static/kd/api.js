// Shared helpers: JSON API calls with the session cookie + CSRF header, formatting, small DOM utilities.

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (meta && meta.content) return meta.content;
  const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return m ? decodeURIComponent(m[1]) : "";
}

// `fields`: the API's per-field messages (config key -> text) when it names several bad fields at once.
export class ApiError extends Error {
  constructor(message, status, fields) { super(message); this.status = status; this.fields = fields || null; }
}

async function parse(resp) {
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) {
    const msg = (data && (data.error || data.detail)) || `${resp.status} ${resp.statusText}`;
    throw new ApiError(msg, resp.status, data && typeof data.fields === "object" ? data.fields : null);
  }
  return data;
}

export async function apiGet(url) {
  const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  return parse(resp);
}

export async function apiSend(method, url, body) {
  const headers = { Accept: "application/json", "X-CSRFToken": csrfToken() };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(url, { method, credentials: "same-origin", headers, body: payload });
  return parse(resp);
}

// List endpoints may answer a bare array or an object wrapping one; accept both.
export function items(data) {
  if (Array.isArray(data)) return data;
  if (!data || typeof data !== "object") return [];
  for (const key of ["results", "items", "experiments", "datasets", "checkpoints", "data"]) {
    if (Array.isArray(data[key])) return data[key];
  }
  return [];
}

// Multipart upload with progress (fetch cannot report upload progress).
export function uploadWithProgress(url, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("X-CSRFToken", csrfToken());
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError((data && data.error) || `${xhr.status} ${xhr.statusText}`, xhr.status));
    };
    xhr.onerror = () => reject(new ApiError("network error: the upload did not reach the server", 0));
    xhr.send(formData);
  });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || v === "" || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

export function fmtPct(v) {
  if (v === null || v === undefined || typeof v !== "number") return "–";
  return (v * 100).toFixed(1) + "%";
}

export function fmtCount(n) {
  if (typeof n !== "number") return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "B";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n.toLocaleString("en-US");
}

export function fmtBytes(n) {
  if (typeof n !== "number") return "–";
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(2) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(2) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

export function fmtDuration(s) {
  if (typeof s !== "number" || !Number.isFinite(s) || s < 0) return "";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function badge(status) {
  return el("span", { class: `badge ${status}`, "data-status": status, text: status });
}

export function progressBar(progress, big = false, status = "") {
  const p = Math.max(0, Math.min(1, Number(progress) || 0));
  const bar = el("div", { class: `progress${big ? " big" : ""} ${status}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(p * 100) });
  bar.append(el("span", { style: `width:${(p * 100).toFixed(1)}%` }));
  return bar;
}

export function showError(container, message) {
  container.replaceChildren(el("div", { class: "alert error", role: "alert", text: message }));
}

export const ACTIVE = new Set(["queued", "running"]);
