// Small inline-SVG drawings, no library: line charts (loss, learning rate, eval metrics), score bars and
// the layer map of an adapter. Sizes are in viewBox units; CSS scales the SVG to its container.

import { fmtNum, svg } from "./ui.js";

function niceStep(range, count) {
  const raw = range / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

function ticks(min, max, count, integer = false) {
  const step = integer ? Math.max(1, Math.round(niceStep(max - min, count))) : niceStep(max - min, count);
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** A line chart of `series` ([{name, points: [[x, y], ...], cls}]). The SVG's data-points attribute counts
 *  the points drawn (tests watch it grow). */
export function lineChart({ label, series, xLabel = "", yLabel = "", markers = false, empty = "No data yet", width = 640,
  height = 220 }) {
  const m = { l: 72, r: 14, t: series.length > 1 ? 28 : 12, b: 36 };
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const root = svg("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label,
    "data-points": all.length, preserveAspectRatio: "xMidYMid meet",
  }, svg("title", {}, label));
  if (!all.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" }, empty));
    return root;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);

  const grid = svg("g", { class: "chart-grid" });
  for (const v of ticks(y0, y1, 4)) {
    grid.append(svg("line", { x1: m.l, x2: width - m.r, y1: Y(v), y2: Y(v) }),
      svg("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, fmtNum(v, 4)));
  }
  for (const v of ticks(x0, x1, 6, all.every(([x]) => Number.isInteger(x)))) {
    grid.append(svg("text", { x: X(v), y: height - m.b + 16, "text-anchor": "middle" }, fmtNum(v, 2)));
  }
  grid.append(
    svg("line", { class: "chart-axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b }),
    svg("line", { class: "chart-axis", x1: m.l, x2: m.l, y1: m.t, y2: height - m.b }),
    svg("text", { x: (m.l + width - m.r) / 2, y: height - 4, "text-anchor": "middle", class: "chart-label" }, xLabel),
    svg("text", { x: 10, y: (m.t + height - m.b) / 2, "text-anchor": "middle", class: "chart-label",
      transform: `rotate(-90 10 ${(m.t + height - m.b) / 2})` }, yLabel));
  root.append(grid);

  series.forEach((s, i) => {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!pts.length) return;
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
    const g = svg("g", { class: ["chart-series", s.cls || `series-${i}`], "data-series": s.name });
    g.append(svg("path", { d }));
    if (markers || pts.length === 1) {
      for (const [x, y] of pts) g.append(svg("circle", { cx: X(x), cy: Y(y), r: 3.5 }, svg("title", {}, `${s.name}: ${fmtNum(y)} at ${fmtNum(x)}`)));
    }
    root.append(g);
  });
  if (series.length > 1) {
    const legend = svg("g", { class: "chart-legend" });
    series.forEach((s, i) => {
      const x = m.l + 10 + i * 130;
      legend.append(svg("rect", { x, y: 8, width: 12, height: 4, class: `legend-${s.cls || `series-${i}`}` }),
        svg("text", { x: x + 16, y: 14 }, s.name));
    });
    root.append(legend);
  }
  return root;
}

/** Horizontal bars of class scores ([{label, score}], best first), scores in [0, 1]. */
export function scoreBars(scores, { label = "Class scores", width = 520 } = {}) {
  const row = 26, labelW = 150, valueW = 64;
  const barW = width - labelW - valueW;
  const root = svg("svg", { class: "bars", viewBox: `0 0 ${width} ${scores.length * row + 4}`, role: "img", "aria-label": label },
    svg("title", {}, label));
  scores.forEach((s, i) => {
    const y = i * row + 2;
    const w = Math.max(1, Math.min(1, Math.max(0, s.score)) * barW);
    const name = s.label.length > 22 ? `${s.label.slice(0, 21)}…` : s.label;
    root.append(svg("g", { class: ["bar", i === 0 ? "bar-top" : ""], "data-label": s.label, "data-score": s.score },
      svg("title", {}, `${s.label}: ${(s.score * 100).toFixed(1)}%`),
      svg("text", { x: labelW - 8, y: y + 16, "text-anchor": "end" }, name),
      svg("rect", { class: "bar-track", x: labelW, y: y + 3, width: barW, height: row - 8, rx: 3 }),
      svg("rect", { class: "bar-fill", x: labelW, y: y + 3, width: w, height: row - 8, rx: 3 }),
      svg("text", { x: labelW + barW + 6, y: y + 16 }, `${(s.score * 100).toFixed(1)}%`)));
  });
  return root;
}

export const GROUPS = {
  1: { name: "frozen", cls: "g1" },
  2: { name: "bias-only", cls: "g2" },
  3: { name: "LoRA + bias", cls: "g3" },
};

function ranges(groups) {
  const out = [];
  groups.forEach((g, i) => {
    const last = out[out.length - 1];
    if (last && last.group === g) last.to = i;
    else out.push({ group: g, from: i, to: i });
  });
  return out;
}

/** The encoder's layers, embeddings to head, each coloured by its SPAFIT group (1 frozen, 2 bias-only,
 *  3 LoRA, + bias unless `group3Bias` is false). */
export function layerMap(groups, { group3Bias = true, width = 760 } = {}) {
  const names = { ...Object.fromEntries(Object.entries(GROUPS).map(([k, v]) => [k, v.name])) };
  if (!group3Bias) names[3] = "LoRA";
  const summary = ranges(groups).map((r) => `layers ${r.from}${r.to > r.from ? `–${r.to}` : ""} ${names[r.group]}`).join(", ");
  const L = groups.length;
  const endW = 74, gap = 3, top = 8, boxH = 54;
  const cell = Math.min(46, (width - 2 * endW - 2 * 10) / Math.max(1, L));
  const used = 2 * endW + 20 + cell * L;
  const x0 = (width - used) / 2;
  const height = top + boxH + 22 + 30;
  const root = svg("svg", { class: "layers", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${L} encoder layers: ${summary}`, "data-groups": groups.join("") },
  svg("title", {}, `${L} encoder layers: ${summary}`));
  root.append(svg("g", { class: "layer-end" },
    svg("rect", { x: x0, y: top, width: endW, height: boxH, rx: 4 }),
    svg("text", { x: x0 + endW / 2, y: top + boxH / 2 + 4, "text-anchor": "middle" }, "embeddings")));
  const labelEvery = cell >= 18 ? 1 : Math.ceil(18 / cell);
  groups.forEach((g, i) => {
    const x = x0 + endW + 10 + i * cell;
    root.append(svg("g", { class: ["layer", GROUPS[g]?.cls || "g0"], "data-layer": i, "data-group": g },
      svg("title", {}, `layer ${i}: ${names[g] || `group ${g}`}`),
      svg("rect", { x: x + gap / 2, y: top, width: cell - gap, height: boxH, rx: 3 }),
      i % labelEvery === 0 || i === L - 1
        ? svg("text", { x: x + cell / 2, y: top + boxH + 14, "text-anchor": "middle" }, String(i)) : null));
  });
  const hx = x0 + endW + 20 + cell * L;
  root.append(svg("g", { class: "layer-end layer-head" },
    svg("rect", { x: hx, y: top, width: endW, height: boxH, rx: 4 }),
    svg("text", { x: hx + endW / 2, y: top + boxH / 2 + 4, "text-anchor": "middle" }, "head")));
  const legend = svg("g", { class: "layer-legend" });
  let lx = 10;
  for (const g of [1, 2, 3]) {
    const n = groups.filter((v) => v === g).length;
    legend.append(svg("rect", { class: GROUPS[g].cls, x: lx, y: height - 20, width: 14, height: 14, rx: 2 }),
      svg("text", { x: lx + 20, y: height - 9 }, `${names[g]} (${n})`));
    lx += 180;
  }
  legend.append(svg("rect", { class: "swatch-head", x: lx, y: height - 20, width: 14, height: 14, rx: 2 }),
    svg("text", { x: lx + 20, y: height - 9 }, "head (trained)"));
  root.append(legend);
  return { svg: root, summary };
}
