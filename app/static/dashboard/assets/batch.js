// #/batch: the tenant's batch prediction jobs (POST /v1/batch-predictions) with progress and status, refreshed
// while any is going; a form to start one (one task or several over the same dataset: the fan-out path); and a
// download of each succeeded job's result file (fetched with the key, which a plain link cannot send).

import { get, post, request, withQuery } from "./api.js";
import {
  FINAL, fmtDuration, fmtInt, fmtTime, h, problemBox, replace, shortId, statusBadge, table,
} from "./ui.js";

const REFRESH_MS = 1000;

const tasksOf = (job) => ((job.hyperparameters || {}).tasks || [{ task: job.task, version: job.adapter_version }]);

function progressCell(job) {
  const p = job.progress || {};
  if (!p.total_steps) return h("span", { class: "muted" }, job.status === "queued" ? "waiting" : "—");
  const pct = Math.round((100 * (p.step || 0)) / p.total_steps);
  return h("span", { class: "progress-cell" },
    h("progress", { max: p.total_steps, value: p.step || 0, "aria-label": `Rows done of job ${shortId(job.id)}` }),
    h("span", { class: "progress-text" }, `${fmtInt(p.step)}/${fmtInt(p.total_steps)} rows (${pct}%)`));
}

async function download(job, button, signal) {
  button.disabled = true;
  try {
    const res = await request("GET", `/v1/batch-predictions/${job.id}/results`, { raw: true, signal });
    const ext = (job.hyperparameters || {}).format === "csv" ? "csv" : "jsonl";
    const url = URL.createObjectURL(await res.blob());
    const a = h("a", { href: url, download: `${job.id}.${ext}`, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (e) {
    if (e.name !== "AbortError") button.after(problemBox(e, { title: "Download failed" }));
  } finally {
    button.disabled = false;
  }
}

function row(job, signal) {
  const done = job.status === "succeeded";
  return h("tr", { dataset: { jobId: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, shortId(job.id))),
    h("td", { class: "batch-tasks" }, tasksOf(job).map((t, i) => [i ? ", " : "",
      h("a", { href: `#/tasks/${encodeURIComponent(t.task)}` }, t.task), t.version ? ` v${t.version}` : ""])),
    h("td", { class: "mono" }, shortId(job.train_dataset)),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "progress-col" }, progressCell(job)),
    h("td", {}, job.status === "running" && job.progress ? fmtDuration(job.progress.eta_seconds) : "—"),
    h("td", {}, fmtTime(job.created_at)),
    h("td", {}, done ? (() => {
      const b = h("button", { type: "button", class: "secondary download" }, "Download results");
      b.addEventListener("click", () => download(job, b, signal));
      return b;
    })() : job.error ? h("span", { class: "muted" }, job.error.message) : "—"));
}

function startForm(tasks, datasets, onStarted, signal) {
  const out = h("div", { id: "batch-form-result", "aria-live": "polite" });
  const checks = [...tasks].sort((a, b) => a.name.localeCompare(b.name)).map((t) => h("span", { class: "check" },
    h("input", { type: "checkbox", id: `batch-task-${t.name}`, name: "tasks", value: t.name }),
    h("label", { for: `batch-task-${t.name}` }, t.name)));
  const dataset = h("select", { id: "batch-dataset", name: "dataset", required: true },
    datasets.map((d) => h("option", { value: d.id }, `${d.name || shortId(d.id)} (${fmtInt(d.rows)} rows)`)));
  const format = h("select", { id: "batch-format", name: "format" },
    h("option", { value: "jsonl" }, "JSON Lines"), h("option", { value: "csv" }, "CSV"));
  const allScores = h("input", { type: "checkbox", id: "batch-all-scores", name: "all_scores" });
  const form = h("form", { id: "batch-form", class: "card", "aria-labelledby": "batch-form-h" },
    h("h2", { id: "batch-form-h" }, "Start a batch prediction"),
    h("fieldset", { class: "field checks" }, h("legend", {}, "Task(s): several run in one pass (fan-out)"), checks),
    h("div", { class: "field" }, h("label", { for: "batch-dataset" }, "Dataset"), dataset),
    h("div", { class: "field" }, h("label", { for: "batch-format" }, "Result format"), format),
    h("div", { class: "field check" }, allScores, h("label", { for: "batch-all-scores" }, "Every label's score")),
    h("button", { type: "submit", id: "batch-start" }, "Start"), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const chosen = checks.map((c) => c.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (!chosen.length) {
      replace(out, h("p", { class: "problem", role: "alert" }, "Pick at least one task."));
      return;
    }
    const body = { dataset: dataset.value, format: format.value, all_scores: allScores.checked };
    if (chosen.length === 1) body.task = chosen[0]; else body.tasks = chosen;
    try {
      const job = await post("/v1/batch-predictions", body, { signal });
      replace(out, h("p", { class: "muted" }, "Started job ", h("span", { class: "mono" }, shortId(job.id)), "."));
      onStarted(job);
    } catch (e) {
      if (e.name !== "AbortError") replace(out, problemBox(e, { title: "Could not start the batch prediction" }));
    }
  });
  return form;
}

export async function batchView(main, { signal }) {
  replace(main, h("h1", { tabindex: -1 }, "Batch predictions"), h("p", { class: "loading" }, "Loading…"));
  let tasks, datasets;
  try {
    [tasks, datasets] = await Promise.all([
      get(withQuery("/v1/tasks", { limit: 100 }), { signal }).then((p) => p.items),
      get(withQuery("/v1/datasets", { limit: 100 }), { signal })
        .then((p) => p.items.filter((d) => (d.state ?? "ready") === "ready")),
    ]);
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(main, h("h1", { tabindex: -1 }, "Batch predictions"), problemBox(e, { title: "Cannot list batch predictions" }));
    return;
  }
  const list = h("section", { id: "batch-jobs", "aria-labelledby": "batch-jobs-h" },
    h("h2", { id: "batch-jobs-h" }, "Jobs"), h("p", { class: "loading" }, "Loading jobs…"));
  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    let page;
    try {
      page = await get(withQuery("/v1/batch-predictions", { limit: 50 }), { signal });
    } catch (e) {
      if (e.name !== "AbortError") replace(list, h("h2", { id: "batch-jobs-h" }, "Jobs"), problemBox(e));
      return;
    }
    if (signal.aborted) return;
    replace(list, h("h2", { id: "batch-jobs-h" }, "Jobs"), page.items.length
      ? table(["Job", "Tasks", "Dataset", "Status", "Progress", "ETA", "Created", "Results"],
        page.items.map((j) => row(j, signal)), { cls: "batch-table" })
      : h("div", { class: "empty batch-empty" }, h("p", {}, "No batch predictions yet: start one above.")));
    if (page.items.some((j) => !FINAL.has(j.status))) timer = setTimeout(refresh, REFRESH_MS);
  }
  signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
  const form = tasks.length && datasets.length ? startForm(tasks, datasets, refresh, signal)
    : h("p", { class: "muted", id: "batch-form-missing" },
      "To start a batch prediction you need a task with a trained version and an uploaded dataset.");
  replace(main, h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Batch predictions")), form, list);
  await refresh();
}
