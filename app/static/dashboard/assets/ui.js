// DOM helpers and formatting. Text always goes in as text nodes (never innerHTML): data from the API
// cannot become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string" && !(el instanceof SVGElement)) el[k] = v; // checked, value, disabled
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// ------------------------------------------------------------------------------------------ formatting
const intFmt = new Intl.NumberFormat("en");

export const fmtInt = (n) => (n === null || n === undefined ? "—" : intFmt.format(n));

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  if (x === null || x === undefined) return "—";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return fmtInt(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? x.toExponential(2) : String(Number(x.toFixed(digits)));
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return h("time", { datetime: iso, title: d.toISOString() }, d.toLocaleString());
}

export const shortId = (id) => String(id).slice(0, 8);

/** "accuracy 0.91 · f1 0.9" */
export function fmtMetrics(metrics) {
  if (!metrics || !Object.keys(metrics).length) return "—";
  return Object.entries(metrics).filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${fmtNum(v, 3)}`).join(" · ") || "—";
}

// ------------------------------------------------------------------------------------------ components
export const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return h("span", { class: ["badge", `status-${status}`], dataset: { status } }, status);
}

/** A problem+json (or any error) in words: the detail, plus each listed error with its line or field. */
export function problemBox(err, { title } = {}) {
  const p = err && err.problem ? err.problem : { detail: err && err.message ? err.message : String(err) };
  const items = (p.errors || []).map((e) => {
    const where = e.line ? `line ${e.line}` : e.field || (Array.isArray(e.loc) ? e.loc.join(".") : "");
    const text = e.message || e.msg || JSON.stringify(e);
    return h("li", {}, where && !text.startsWith(where) ? h("strong", {}, `${where}: `) : null, text);
  });
  return h("div", { class: "problem", role: "alert" },
    h("p", { class: "problem-title" }, title || p.title || "Error", err && err.status ? ` (HTTP ${err.status})` : ""),
    p.detail ? h("p", { class: "problem-detail" }, p.detail) : null,
    items.length ? h("ul", {}, items) : null);
}

export function emptyState(text, ...extra) {
  return h("div", { class: "empty" }, h("p", {}, text), ...extra);
}

/** A definition list from [term, value] pairs (values may be nodes). */
export function dl(pairs, cls = "facts") {
  return h("dl", { class: cls }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

export function table(headers, rows, { caption, cls } = {}) {
  return h("div", { class: "table-wrap" },
    h("table", { class: cls },
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((c) => h("th", { scope: "col" }, c)))),
      rows instanceof HTMLTableSectionElement ? rows : h("tbody", {}, rows)));
}

/** Re-run `fn` at most once per animation frame, however often it is asked for. */
export function throttled(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; fn(); });
  };
}
