// #/jobs (the list, live) and #/jobs/<id> (one job: live curves, eval per epoch, configuration, events, cancel).

import { ApiError, get, post, streamEvents, withQuery } from "./api.js";
import { lineChart } from "./charts.js";
import {
  FINAL, dl, emptyState, fmtDuration, fmtInt, fmtMetrics, fmtNum, fmtTime, h, problemBox, replace, shortId,
  statusBadge, table, throttled,
} from "./ui.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const MAX_STREAMS = 4; // browsers allow ~6 connections per host: leave room for the other calls
const REFRESH_MS = 5000;

/** Apply one event to a job as the list and the page know it. */
function applyEvent(job, e) {
  if (e.type === "progress") {
    job.progress = { step: e.data.step, total_steps: e.data.total_steps, epoch: e.data.epoch, eta_seconds: e.data.eta_seconds };
  } else if (e.type === "eval") {
    job.metrics = e.data.metrics;
  } else if (e.type === "status" && e.data.status) {
    job.status = e.data.status;
    if (e.data.error) job.error = e.data.error;
    if (e.data.adapter_version) job.adapter_version = e.data.adapter_version;
  }
}

function progressCell(job, label) {
  const p = job.progress || {};
  if (!p.total_steps) return h("span", { class: "muted" }, job.status === "queued" ? "waiting" : "—");
  const pct = Math.round((100 * (p.step || 0)) / p.total_steps);
  return h("span", { class: "progress-cell" },
    h("progress", { max: p.total_steps, value: p.step || 0, "aria-label": label }),
    h("span", { class: "progress-text" }, `${fmtInt(p.step)}/${fmtInt(p.total_steps)} (${pct}%)`));
}

const etaText = (job) => (job.status === "running" && job.progress ? fmtDuration(job.progress.eta_seconds) : "—");

// ------------------------------------------------------------------------------------------------ list
export async function jobsView(main, { query, signal }) {
  const status = query.get("status") || "";
  const task = query.get("task") || "";
  const statusSelect = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const taskInput = h("input", { id: "filter-task", name: "task", value: task, placeholder: "any task", maxlength: 64 });
  const go = () => { location.hash = withQuery("#/jobs", { status: statusSelect.value, task: taskInput.value.trim() }); };
  statusSelect.addEventListener("change", go);
  const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (ev) => { ev.preventDefault(); go(); } },
    h("label", { for: "filter-status" }, "Status"), statusSelect,
    h("label", { for: "filter-task" }, "Task"), taskInput,
    h("button", { type: "submit" }, "Filter"),
    status || task ? h("a", { href: "#/jobs", class: "button secondary" }, "Clear") : null);
  const announce = h("p", { class: "visually-hidden", "aria-live": "polite" });
  const body = h("div", { class: "loading" }, "Loading jobs…");
  replace(main, h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Jobs"),
    h("a", { href: "#/new", class: "button" }, "New job")), filters, announce, body);

  const rows = new Map(); // id -> {job, tr}
  const streams = new Map(); // id -> AbortController
  const tbody = h("tbody");
  let cursor = null;
  const more = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => load(cursor) }, "Load more");

  function render(entry) {
    const { job, tr } = entry;
    tr.dataset.status = job.status;
    replace(tr,
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, shortId(job.id))),
      h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(job.task)}` }, job.task)),
      h("td", {}, job.kind),
      h("td", {}, statusBadge(job.status), job.cancel_requested && !FINAL.has(job.status) ? h("span", { class: "muted" }, " cancelling") : null),
      h("td", { class: "progress-col" }, progressCell(job, `Progress of job ${shortId(job.id)}`)),
      h("td", { class: "eta" }, etaText(job)),
      h("td", {}, fmtMetrics(job.metrics)),
      h("td", {}, fmtTime(job.created_at)));
  }

  function upsert(job, { atTop = false } = {}) {
    let entry = rows.get(job.id);
    if (!entry) {
      entry = { job, tr: h("tr", { dataset: { jobId: job.id } }) };
      rows.set(job.id, entry);
      if (atTop) tbody.prepend(entry.tr); else tbody.append(entry.tr);
    } else if (streams.has(job.id)) {
      return; // the stream is fresher than the listing
    } else {
      if (entry.job.status !== job.status) announce.textContent = `Job ${shortId(job.id)} is ${job.status}.`;
      entry.job = job;
    }
    render(entry);
    watch(entry);
  }

  function watch(entry) {
    const id = entry.job.id;
    if (FINAL.has(entry.job.status) || streams.has(id) || streams.size >= MAX_STREAMS || signal.aborted) return;
    const ctrl = new AbortController();
    signal.addEventListener("abort", () => ctrl.abort(), { once: true });
    streams.set(id, ctrl);
    const redraw = throttled(() => render(entry));
    streamEvents(id, 0, (e) => {
      const before = entry.job.status;
      applyEvent(entry.job, e);
      if (entry.job.status !== before) announce.textContent = `Job ${shortId(id)} is ${entry.job.status}.`;
      redraw();
    }, ctrl.signal).catch(() => {}).finally(async () => {
      streams.delete(id);
      if (signal.aborted) return;
      try { entry.job = await get(`/v1/jobs/${id}`, { signal }); render(entry); } catch { /* next refresh */ }
      for (const other of rows.values()) watch(other); // a slot is free
    });
  }

  async function load(after) {
    let page;
    try {
      page = await get(withQuery("/v1/jobs", { status, task, limit: 50, cursor: after }), { signal });
    } catch (e) {
      if (e.name !== "AbortError") replace(body, problemBox(e, { title: "Could not list jobs" }));
      return;
    }
    if (!after) {
      if (!page.items.length) {
        replace(body, status || task
          ? emptyState("No jobs match these filters.", h("a", { href: "#/jobs" }, "Show all jobs"))
          : emptyState("No jobs yet.", h("a", { href: "#/new", class: "button" }, "Start a fine-tuning job")));
        return;
      }
      replace(body, table(["Job", "Task", "Kind", "Status", "Progress", "ETA", "Metrics", "Created"], tbody,
        { caption: "Jobs, newest first", cls: "jobs-table" }), more);
    }
    page.items.forEach((job) => upsert(job));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  }

  await load(null);
  // New jobs and state changes of the jobs no stream is watching.
  const timer = setInterval(async () => {
    try {
      const page = await get(withQuery("/v1/jobs", { status, task, limit: 50 }), { signal });
      if (!rows.size && page.items.length) { await load(null); return; }
      [...page.items].reverse().forEach((job) => upsert(job, { atTop: true }));
    } catch { /* shown on the next navigation */ }
  }, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer), { once: true });
}

// ------------------------------------------------------------------------------------------------ one job
function eventSummary(e) {
  const d = e.data || {};
  switch (e.type) {
    case "status": {
      const parts = [d.status];
      if (d.attempt) parts.push(`attempt ${d.attempt}${d.resume ? ", resuming" : ""}`);
      if (d.adapter_version) parts.push(`adapter version ${d.adapter_version}`);
      if (d.error) parts.push(`${d.error.type}: ${d.error.message}`);
      if (d.reason) parts.push(d.reason);
      return parts.join(" · ");
    }
    case "progress":
      return `step ${d.step}/${d.total_steps} · epoch ${fmtNum(d.epoch, 2)} · loss ${fmtNum(d.loss)} · lr ${fmtNum(d.lr)}`;
    case "eval":
      return `epoch ${d.epoch}: ${fmtMetrics(d.metrics)}${d.is_best ? " (best so far)" : ""}`;
    case "checkpoint":
      return `checkpoint at step ${d.step} (${fmtInt(d.bytes)} bytes)`;
    case "resumed":
      return `resumed from step ${d.step}`;
    case "early_stop":
      return `stopped early at epoch ${d.epoch} (best epoch ${d.best_epoch})`;
    case "cancel_requested":
      return "cancel requested: the job stops at its next step";
    case "log":
      return d.message || JSON.stringify(d);
    default:
      return JSON.stringify(d);
  }
}

function configSection(job) {
  const method = { ...job.method };
  const sweep = method.sweep;
  delete method.sweep;
  const kv = (obj) => Object.entries(obj).map(([k, v]) => [k, v === null ? "default" : Array.isArray(v) ? v.join(", ") : String(v)]);
  return h("section", { class: "card", "aria-labelledby": "config-h" },
    h("h2", { id: "config-h" }, "Configuration"),
    h("div", { class: "columns" },
      h("div", {}, h("h3", {}, "Method"), dl(kv(method))),
      h("div", {}, h("h3", {}, "Hyperparameters"), dl(kv(job.hyperparameters))),
      h("div", {}, h("h3", {}, "Data"), dl([
        ["task type", job.task_type], ["base model", job.base_model],
        ["train dataset", h("span", { class: "mono" }, job.train_dataset)],
        ["validation dataset", job.validation_dataset ? h("span", { class: "mono" }, job.validation_dataset) : "none"],
        ["text fields", (job.text_fields || []).join(", ") || "inferred"], ["label field", job.label_field || "inferred"],
      ]))),
    sweep ? h("details", {}, h("summary", {}, "Sweep"), h("pre", {}, JSON.stringify(sweep, null, 2))) : null);
}

export async function jobView(main, { id, signal }) {
  replace(main, h("p", { class: "loading" }, "Loading job…"));
  let job;
  try {
    job = await get(`/v1/jobs/${encodeURIComponent(id)}`, { signal });
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(main, h("h1", { tabindex: -1 }, "Job"), problemBox(e, { title: e.status === 404 ? "No such job" : "Could not load the job" }),
      h("p", {}, h("a", { href: "#/jobs" }, "All jobs")));
    return;
  }
  const events = [];
  const losses = new Map(); // step -> loss (a resumed job repeats steps: the later value wins)
  const rates = new Map();
  const evals = [];

  const badge = h("span");
  const summary = h("div");
  const live = h("p", { class: "visually-hidden", "aria-live": "polite" });
  const errorBox = h("div");
  const actions = h("div", { class: "actions" });
  const lossBox = h("div", { class: "chart-box", id: "loss-chart" });
  const lrBox = h("div", { class: "chart-box", id: "lr-chart" });
  const evalBox = h("div", { id: "eval" });
  const showProgress = h("input", { type: "checkbox", id: "show-progress" });
  const logBody = h("tbody");
  const logWrap = h("div", { class: "log" });

  replace(main,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", h("span", { class: "mono" }, shortId(job.id))),
    h("div", { class: "page-head" },
      h("h1", { tabindex: -1 }, "Job ", h("span", { class: "mono" }, shortId(job.id)), " ", badge), actions),
    live, errorBox,
    h("section", { class: "card", "aria-labelledby": "summary-h" }, h("h2", { id: "summary-h", class: "visually-hidden" }, "Summary"), summary),
    h("section", { class: "card", "aria-labelledby": "curves-h" }, h("h2", { id: "curves-h" }, "Training curves"),
      h("div", { class: "columns two" },
        h("figure", {}, h("figcaption", {}, "Training loss"), lossBox),
        h("figure", {}, h("figcaption", {}, "Learning rate"), lrBox))),
    h("section", { class: "card", "aria-labelledby": "eval-h" }, h("h2", { id: "eval-h" }, "Evaluation per epoch"), evalBox),
    configSection(job),
    h("section", { class: "card", "aria-labelledby": "log-h" },
      h("div", { class: "page-head" }, h("h2", { id: "log-h" }, "Events"),
        h("span", {}, showProgress, h("label", { for: "show-progress" }, " show progress events"))),
      logWrap));
  document.title = `Job ${shortId(job.id)} · SPAFIT`;

  let milestone = -1;
  function renderSummary() {
    replace(badge, statusBadge(job.status));
    const p = job.progress || {};
    const quarter = p.total_steps ? Math.floor((4 * (p.step || 0)) / p.total_steps) : -1;
    if (quarter !== milestone || live.dataset.status !== job.status) {
      milestone = quarter;
      live.dataset.status = job.status;
      live.textContent = `Job ${job.status}${p.total_steps ? `, step ${p.step} of ${p.total_steps}` : ""}.`;
    }
    replace(summary, dl([
      ["task", h("a", { href: `#/tasks/${encodeURIComponent(job.task)}` }, job.task)],
      ["kind", job.kind],
      ["status", [statusBadge(job.status), job.cancel_requested && !FINAL.has(job.status) ? " cancel requested" : ""]],
      ["progress", progressCell(job, "Training progress")],
      ["epoch", p.epoch !== undefined && p.epoch !== null ? fmtNum(p.epoch, 2) : "—"],
      ["ETA", h("span", { class: "eta" }, etaText(job))],
      ["metrics", fmtMetrics(job.metrics)],
      ["adapter version", job.adapter_version
        ? h("a", { href: `#/tasks/${encodeURIComponent(job.task)}` }, `v${job.adapter_version}`) : "—"],
      ["attempts", String(job.attempts)],
      ["created", fmtTime(job.created_at)], ["started", fmtTime(job.started_at)], ["finished", fmtTime(job.finished_at)],
      job.parent_job ? ["sweep", h("a", { href: `#/jobs/${job.parent_job}` }, shortId(job.parent_job))] : null,
    ]));
    if (job.status === "failed" && job.error) {
      replace(errorBox, h("div", { class: "problem", role: "alert", id: "job-error" },
        h("p", { class: "problem-title" }, "The job failed"),
        h("p", { class: "problem-detail" }, job.error.message),
        h("p", { class: "muted" }, `error type: ${job.error.type}`)));
    } else {
      replace(errorBox);
    }
    renderActions();
  }

  let confirming = false;
  function renderActions() {
    if (FINAL.has(job.status)) { replace(actions); return; }
    if (job.cancel_requested) { replace(actions, h("button", { type: "button", disabled: true }, "Cancelling…")); return; }
    if (!confirming) {
      replace(actions, h("button", { type: "button", class: "danger", id: "cancel-job", onclick: () => { confirming = true; renderActions(); } }, "Cancel job"));
      return;
    }
    const status = h("span", { role: "status" });
    replace(actions, h("span", { class: "confirm" }, "Cancel this job? ",
      h("button", {
        type: "button", class: "danger", id: "confirm-cancel", onclick: async (ev) => {
          ev.target.disabled = true;
          try {
            job = await post(`/v1/jobs/${job.id}/cancel`, undefined, { signal });
            confirming = false;
            renderSummary();
          } catch (e) {
            replace(status, problemBox(e, { title: "Could not cancel" }));
            ev.target.disabled = false;
          }
        },
      }, "Yes, cancel it"),
      h("button", { type: "button", class: "secondary", onclick: () => { confirming = false; renderActions(); } }, "Keep it"),
      status));
    actions.querySelector("#confirm-cancel").focus();
  }

  function renderCharts() {
    const byStep = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
    const empty = FINAL.has(job.status) ? "No training steps were recorded" : "No steps yet";
    replace(lossBox, lineChart({ label: "Training loss by step", series: [{ name: "loss", points: byStep(losses), cls: "loss" }], xLabel: "step", yLabel: "loss", empty }));
    replace(lrBox, lineChart({ label: "Learning rate by step", series: [{ name: "learning rate", points: byStep(rates), cls: "lr" }], xLabel: "step", yLabel: "lr", empty }));
    if (!evals.length) {
      replace(evalBox, emptyState(!job.validation_dataset ? "No validation dataset: nothing is evaluated."
        : FINAL.has(job.status) ? "No epoch was evaluated." : "No evaluation yet: one comes at the end of each epoch."));
      return;
    }
    const names = [...new Set(evals.flatMap((e) => Object.keys(e.metrics || {})))];
    const best = evals.findLastIndex((e) => e.is_best); // is_best means "best so far": the last one is the best
    const rows = evals.map((e, i) => h("tr", { class: i === best ? "best" : null },
      h("td", {}, String(e.epoch)), h("td", {}, fmtInt(e.step)),
      names.map((n) => h("td", {}, fmtNum(e.metrics[n]))), h("td", {}, i === best ? "★ best" : "")));
    const series = names.map((n, i) => ({ name: n, cls: `series-${i}`, points: evals.map((e) => [e.epoch, e.metrics[n]]) }));
    replace(evalBox, h("div", { class: "columns two" },
      table(["Epoch", "Step", ...names, "Best"], rows, { caption: `Validation metrics (main: ${evals[evals.length - 1].main_metric || names[0]})`, cls: "eval-table" }),
      h("figure", {}, h("figcaption", {}, "Metrics by epoch"),
        lineChart({ label: "Validation metrics by epoch", series, xLabel: "epoch", yLabel: "metric", markers: true }))));
  }

  function renderLog() {
    const shown = events.filter((e) => showProgress.checked || e.type !== "progress").slice(-300);
    replace(logBody, shown.map((e) => h("tr", { class: `ev-${e.type}` },
      h("td", {}, String(e.seq)), h("td", {}, fmtTime(e.created_at)), h("td", {}, e.type), h("td", {}, eventSummary(e)))));
    if (!logWrap.firstChild) {
      replace(logWrap, table(["#", "Time", "Type", "Details"], logBody, { caption: "Events, oldest first", cls: "events-table" }));
    }
    logWrap.scrollTop = logWrap.scrollHeight;
  }
  showProgress.addEventListener("change", renderLog);

  const redraw = throttled(() => { renderSummary(); renderCharts(); renderLog(); });
  renderSummary(); renderCharts(); renderLog();

  let refetching = null;
  const refetch = () => {
    refetching ??= get(`/v1/jobs/${job.id}`, { signal }).then((j) => { job = j; redraw(); }).catch(() => {}).finally(() => { refetching = null; });
  };
  try {
    await streamEvents(job.id, 0, (e) => {
      events.push(e);
      applyEvent(job, e);
      if (e.type === "progress") {
        if (Number.isFinite(e.data.loss)) losses.set(e.data.step, e.data.loss);
        if (Number.isFinite(e.data.lr)) rates.set(e.data.step, e.data.lr);
      } else if (e.type === "eval") {
        evals.push(e.data);
      } else if (e.type === "status") {
        refetch(); // attempts, timestamps, the error, the adapter version
      }
      redraw();
    }, signal);
  } catch (e) {
    if (!signal.aborted) errorBox.append(problemBox(e, { title: e instanceof ApiError ? "The event stream stopped" : "Error" }));
  }
  if (!signal.aborted) refetch();
}
