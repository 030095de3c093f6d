// The task page's "Evaluations" card: each version's evaluations (POST .../versions/<v>/evaluate), grouped by
// dataset so versions evaluated on the same rows sit side by side, with their confusion matrices.

import { fmtNum, fmtTime, h, shortId, table } from "./ui.js";

function confusion(e) {
  const m = e.metrics || {};
  if (typeof m.confusion_matrix_omitted === "string") {  // kept up to 100 labels (worker/batch.py)
    return h("p", { class: "muted confusion-omitted" }, `v${e.version}: no confusion matrix (${m.confusion_matrix_omitted})`);
  }
  if (!Array.isArray(m.confusion_matrix)) return null;
  const labels = m.labels || m.confusion_matrix.map((_, i) => String(i));
  return h("figure", { class: "confusion", dataset: { version: e.version } },
    h("figcaption", {}, `v${e.version}: rows true label, columns predicted`),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, ""), labels.map((l) => h("th", { scope: "col" }, l)))),
      h("tbody", {}, m.confusion_matrix.map((row, i) => h("tr", {},
        h("th", { scope: "row" }, labels[i]), row.map((n, j) => h("td", { class: i === j ? "best" : null }, String(n))))))));
}

export function evaluationsCard(versions) {
  const evals = versions.flatMap((v) => (v.evaluations || []).map((e) => ({ ...e, version: v.version })));
  const card = h("section", { class: "card", id: "evaluations", "aria-labelledby": "evaluations-h" },
    h("h2", { id: "evaluations-h" }, "Evaluations"));
  if (!evals.length) {
    card.append(h("p", { class: "muted" }, "No evaluations yet: evaluate a version on a labelled dataset ",
      "(POST /v1/tasks/<task>/versions/<v>/evaluate, or `spafit evaluate`)."));
    return card;
  }
  const byDataset = new Map();
  for (const e of evals) {
    const latest = byDataset.get(e.dataset) || new Map();
    const seen = latest.get(e.version);
    if (!seen || seen.created_at < e.created_at) latest.set(e.version, e);
    byDataset.set(e.dataset, latest);
  }
  for (const [dataset, latest] of byDataset) {
    const rows = [...latest.values()].sort((a, b) => a.version - b.version);
    // A version trained (or evaluated) on a GLUE preset also has that preset's metric (MCC for CoLA, F1 and
    // accuracy for MRPC/QQP, Pearson/Spearman for STS-B): those columns come first, marked.
    const glue = rows.map((e) => e.metrics || {}).find((m) => m.glue_preset);
    const glueNames = glue ? glue.glue_metrics || [] : [];
    const names = [...new Set([...glueNames, ...rows.flatMap((e) => Object.keys(e.metrics || {})
      .filter((k) => typeof e.metrics[k] === "number"))])];
    card.append(
      h("h3", {}, "Dataset ", h("span", { class: "mono" }, shortId(dataset))),
      glue ? h("p", { class: "glue-note", dataset: { preset: glue.glue_preset } },
        `GLUE ${glue.glue_preset} preset: its metric${glueNames.length > 1 ? "s" : ""} ${glueNames.join(" and ")}`,
        ` (main: ${glue.main_metric}), then the generic ones.`) : null,
      table(["Version", ...names.map((n) => (glueNames.includes(n) ? `${n} (GLUE)` : n)), "Rows", "Job", "Evaluated"], rows.map((e) => h("tr", { dataset: { version: e.version } },
        h("th", { scope: "row" }, `v${e.version}`),
        names.map((n) => h("td", {}, fmtNum(e.metrics[n]))),
        h("td", {}, String(e.rows)),
        h("td", {}, e.job ? h("a", { href: `#/jobs/${e.job}`, class: "mono" }, shortId(e.job)) : "—"),
        h("td", {}, fmtTime(e.created_at)))),
      { caption: `Versions side by side on dataset ${shortId(dataset)} (the latest evaluation of each)`, cls: "evaluations-table" }),
      h("div", { class: "confusions" }, rows.map(confusion)));
  }
  return card;
}
