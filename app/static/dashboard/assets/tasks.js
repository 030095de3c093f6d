// #/tasks (the list) and #/tasks/<name> (versions side by side, activate / roll back, the layer map of a
// version, and a try-it box that calls predict).

import { stratification } from "./adapter.js";
import { get, post, withQuery } from "./api.js";
import { layerMap, scoreBars } from "./charts.js";
import { evaluationsCard } from "./evaluations.js";
import {
  dl, emptyState, fmtBytes, fmtInt, fmtMetrics, fmtNum, fmtTime, h, problemBox, replace, shortId, table,
} from "./ui.js";

const LOWER_IS_BETTER = /loss|mse|mae|rmse|error/i;
const taskPath = (name) => `/v1/tasks/${encodeURIComponent(name)}`;

function paramsText(v) {
  if (!v || v.trainable_params === null || v.trainable_params === undefined) return "—";
  const frac = v.param_counts && v.param_counts.trainable_fraction;
  return `${fmtInt(v.trainable_params)}${frac ? ` (${(frac * 100).toFixed(2)}% of the base)` : ""}`;
}

function methodText(m) {
  if (!m) return "—";
  const parts = [m.name];
  if (m.name === "spafit") parts.push(`n1=${m.n1 ?? "L/3"}`, `n2=${m.n2 ?? "2L/3"}`);
  if (m.name !== "bitfit") parts.push(`rank ${m.rank}`);
  return parts.join(" ");
}

// ------------------------------------------------------------------------------------------------ list
export async function tasksView(main, { signal }) {
  const body = h("div", { class: "loading" }, "Loading tasks…");
  replace(main, h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Tasks"),
    h("a", { href: "#/new", class: "button" }, "New job")), body);
  const items = [];
  try {
    let cursor = null;
    do {
      const page = await get(withQuery("/v1/tasks", { limit: 100, cursor }), { signal });
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor && items.length < 1000);
  } catch (e) {
    if (e.name !== "AbortError") replace(body, problemBox(e, { title: "Could not list tasks" }));
    return;
  }
  if (!items.length) {
    replace(body, emptyState("No tasks yet: a task appears when its first fine-tuning job succeeds.",
      h("a", { href: "#/new", class: "button" }, "Start a fine-tuning job")));
    return;
  }
  replace(body, table(["Task", "Active version", "Metrics", "Trainable parameters", "Adapter size", "Versions", "Updated"],
    items.map((t) => {
      const v = t.active_version;
      return h("tr", { dataset: { task: t.name } },
        h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(t.name)}` }, t.name)),
        h("td", {}, v ? `v${v.version}` : h("span", { class: "muted" }, "none")),
        h("td", {}, fmtMetrics(v && v.metrics)),
        h("td", {}, paramsText(v)),
        h("td", {}, v ? fmtBytes(v.size_bytes) : "—"),
        h("td", {}, fmtInt(t.version_count)),
        h("td", {}, fmtTime(t.updated_at)));
    }), { caption: "Tasks, newest first", cls: "tasks-table" }));
}

// ------------------------------------------------------------------------------------------------ one task
async function allVersions(name, signal) {
  const out = [];
  let cursor = null;
  do {
    const page = await get(withQuery(`${taskPath(name)}/versions`, { limit: 100, cursor }), { signal });
    out.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && out.length < 1000);
  return out;
}

export async function taskView(main, { name, signal }) {
  replace(main, h("p", { class: "loading" }, "Loading task…"));
  let task, versions;
  try {
    [task, versions] = await Promise.all([get(taskPath(name), { signal }), allVersions(name, signal)]);
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(main, h("h1", { tabindex: -1 }, name), problemBox(e, { title: e.status === 404 ? "No such task" : "Could not load the task" }),
      h("p", {}, h("a", { href: "#/tasks" }, "All tasks")));
    return;
  }
  document.title = `${name} · SPAFIT`;
  const summary = h("div");
  const versionsBox = h("div");
  const activateStatus = h("div", { role: "status", "aria-live": "polite", class: "status-line" });
  const layersBox = h("div", { id: "layers" });
  const layerSelect = h("select", { id: "layers-version" });
  const tryBox = tryIt(name, () => task, signal);

  replace(main,
    h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "Tasks"), " / ", name),
    h("h1", { tabindex: -1 }, name),
    h("section", { class: "card", "aria-labelledby": "summary-h" }, h("h2", { id: "summary-h", class: "visually-hidden" }, "Summary"), summary),
    h("section", { class: "card", "aria-labelledby": "versions-h" }, h("h2", { id: "versions-h" }, "Versions"), activateStatus, versionsBox),
    evaluationsCard(versions),
    h("section", { class: "card", "aria-labelledby": "layers-h" },
      h("div", { class: "page-head" }, h("h2", { id: "layers-h" }, "Layers by SPAFIT group"),
        h("span", {}, h("label", { for: "layers-version" }, "Version "), layerSelect)),
      layersBox),
    tryBox);

  function renderSummary() {
    const v = task.active_version;
    replace(summary, dl([
      ["active version", v ? `v${v.version}` : "none"],
      ["versions", fmtInt(task.version_count)],
      ["task type", v ? v.task_type : "—"],
      ["labels", v && v.labels.length ? v.labels.join(", ") : "—"],
      ["metrics", fmtMetrics(v && v.metrics)],
      ["trainable parameters", paramsText(v)],
      ["adapter size", v ? fmtBytes(v.size_bytes) : "—"],
      ["base model", v ? v.base_model : "—"],
      ["created", fmtTime(task.created_at)], ["updated", fmtTime(task.updated_at)],
    ]));
  }

  function renderVersions() {
    const names = [...new Set(versions.flatMap((v) => Object.keys(v.metrics || {})))];
    const best = Object.fromEntries(names.map((n) => {
      const vals = versions.map((v) => (v.metrics || {})[n]).filter((x) => typeof x === "number");
      return [n, LOWER_IS_BETTER.test(n) ? Math.min(...vals) : Math.max(...vals)];
    }));
    const activeNo = task.active_version ? task.active_version.version : null;
    const rows = versions.map((v) => h("tr", { class: v.active ? "active" : null, dataset: { version: v.version } },
      h("th", { scope: "row" }, `v${v.version}`, v.active ? h("span", { class: "badge status-succeeded" }, "active") : null),
      names.map((n) => {
        const x = (v.metrics || {})[n];
        const isBest = versions.length > 1 && typeof x === "number" && x === best[n];
        return h("td", { class: isBest ? "best" : null, title: isBest ? `best ${n}` : null }, fmtNum(x));
      }),
      h("td", {}, methodText(v.method)),
      h("td", {}, paramsText(v)),
      h("td", {}, fmtBytes(v.size_bytes)),
      h("td", {}, v.job_id ? h("a", { href: `#/jobs/${v.job_id}`, class: "mono" }, shortId(v.job_id)) : "imported"),
      h("td", {}, fmtTime(v.created_at)),
      h("td", {}, v.active ? h("span", { class: "muted" }, "serving") : h("button", {
        type: "button", class: "secondary", dataset: { activate: v.version },
        onclick: () => activate(v.version),
      }, activeNo && v.version < activeNo ? `Roll back to v${v.version}` : `Activate v${v.version}`))));
    replace(versionsBox, table(["Version", ...names, "Method", "Trainable parameters", "Size", "Job", "Created", "Serving"], rows,
      { caption: "Versions, newest first; the best value of each metric is marked", cls: "versions-table" }));
  }

  async function activate(number) {
    replace(activateStatus, `Activating v${number}…`);
    try {
      task = await post(`${taskPath(name)}/versions/${number}/activate`, undefined, { signal });
      versions = await allVersions(name, signal);
      renderSummary();
      renderVersions();
      replace(activateStatus, `v${number} is now active: predict serves it.`);
    } catch (e) {
      replace(activateStatus, problemBox(e, { title: `Could not activate v${number}` }));
    }
  }

  async function renderLayers() {
    const v = versions.find((x) => String(x.version) === layerSelect.value);
    if (!v) { replace(layersBox, emptyState("No versions.")); return; }
    replace(layersBox, h("p", { class: "loading" }, `Reading the layer map of v${v.version}…`));
    try {
      const strat = await stratification(name, v, signal);
      const group3Bias = v.method && v.method.name !== "lora" && v.method.group3_bias !== false;
      const { svg: drawing, summary: text } = layerMap(strat.layer_groups, { group3Bias });
      const per = (v.param_counts && v.param_counts.per_group) || {};
      replace(layersBox, h("figure", { class: "layers-figure" }, drawing,
        h("figcaption", {}, `v${v.version}, ${methodText(v.method)}: ${text}.`)),
      dl([
        ["layers", `${strat.num_layers ?? strat.layer_groups.length} (n1=${strat.n1}, n2=${strat.n2})`],
        ["trained in bias-only layers", fmtInt(per["2"] ?? 0)],
        [group3Bias ? "trained in LoRA + bias layers" : "trained in LoRA layers", fmtInt(per["3"] ?? 0)],
        ["head", fmtInt(v.param_counts && v.param_counts.head)],
      ], "facts inline"));
    } catch (e) {
      if (e.name !== "AbortError") replace(layersBox, problemBox(e, { title: "Could not read the layer map" }));
    }
  }

  replace(layerSelect, versions.map((v) => h("option", { value: v.version, selected: v.active }, `v${v.version}${v.active ? " (active)" : ""}`)));
  layerSelect.addEventListener("change", renderLayers);
  renderSummary();
  renderVersions();
  renderLayers();
}

// ------------------------------------------------------------------------------------------------ try it
function tryIt(name, currentTask, signal) {
  const text = h("textarea", { id: "predict-text", rows: 3, required: true, placeholder: "a great film" });
  const pair = h("input", { id: "predict-pair", placeholder: "only for sentence-pair tasks" });
  const results = h("div", { id: "predict-results", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "predict-submit" }, "Predict");
  const form = h("form", {
    class: "try-form", onsubmit: async (ev) => {
      ev.preventDefault();
      const lines = text.value.split("\n").map((s) => s.trim()).filter(Boolean);
      if (!lines.length) { replace(results, problemBox(new Error("enter a text to classify"), { title: "Nothing to predict" })); return; }
      const second = pair.value.trim();
      const inputs = lines.map((t) => (second ? { text: t, text_pair: second } : t));
      button.disabled = true;
      replace(results, h("p", { class: "loading" }, "Predicting…"));
      try {
        const out = await post(`${taskPath(name)}/predict`, { inputs }, { signal });
        replace(results, h("p", { class: "muted" }, `answered by v${out.version}`),
          out.predictions.map((p, i) => predictionView(lines[i], p, currentTask())));
      } catch (e) {
        if (e.name !== "AbortError") replace(results, problemBox(e, { title: "Prediction failed" }));
      } finally {
        button.disabled = false;
      }
    },
  },
  h("label", { for: "predict-text" }, "Text (one input per line)"), text,
  h("label", { for: "predict-pair" }, "Second text (optional)"), pair,
  h("div", {}, button));
  return h("section", { class: "card", "aria-labelledby": "try-h" }, h("h2", { id: "try-h" }, "Try it"),
    h("p", { class: "muted" }, "Calls predict with this task's active version."), form, results);
}

function predictionView(input, p, task) {
  const type = task.active_version ? task.active_version.task_type : "single_label_classification";
  let head;
  if (type === "regression") head = `value ${fmtNum(p.value ?? p.score)}`;
  else if (type === "multi_label_classification") head = `labels: ${(p.labels || []).join(", ") || "none at or above 0.5"}`;
  else head = `${p.label} (${(p.score * 100).toFixed(1)}%)`;
  return h("div", { class: "prediction" },
    h("p", {}, h("q", {}, input), " → ", h("strong", { class: "predicted-label" }, head)),
    type === "regression" ? null : scoreBars(p.scores, { label: `Class scores for “${input}”` }));
}
