// #/new: upload (or pick) the datasets and read their validation report, name the task, pick the method and
// its parameters (the API's defaults filled in), submit.

import { ApiError, get, request, withQuery } from "./api.js";
import { HYPERPARAMETER_DEFAULTS, LORA_TARGETS, METHOD_DEFAULTS, METHOD_FIELDS } from "./defaults.js";
import { dl, fmtInt, h, problemBox, replace, table } from "./ui.js";

const TASK_NAME = "[a-z0-9][a-z0-9_\\-]{0,63}";
const METHODS = {
  spafit: "SPAFIT: layers [0, n1) frozen, [n1, n2) bias-only, [n2, L) LoRA + bias",
  lora: "LoRA on every layer (no biases)",
  bitfit: "BitFit: every bias of every layer",
};

// ------------------------------------------------------------------------------------------ the report
function reportView(report, { name, ok }) {
  const problems = report.problems || [];
  const errors = problems.filter((p) => p.severity === "error").length;
  const warnings = problems.length - errors;
  const counts = Object.entries(report.label_counts || {});
  const total = counts.reduce((a, [, n]) => a + n, 0);
  return h("div", { class: ["report", ok ? "report-ok" : "report-bad"], "data-ok": String(ok) },
    h("p", { class: "report-head" }, ok
      ? `${name}: valid, ${fmtInt(report.rows)} rows${warnings ? `, ${warnings} warning(s)` : ""}.`
      : `${name}: ${errors} error(s)${warnings ? ` and ${warnings} warning(s)` : ""}: fix them and upload again.`),
    dl([
      ["rows", h("span", { class: "report-rows" }, fmtInt(report.rows))],
      ["columns", report.columns.join(", ")],
      ["format", report.format],
      ["text fields", (report.text_fields || []).join(", ") || "—"],
      ["label field", report.label_field || "none"],
      report.truncated_rows ? ["rows not read", fmtInt(report.truncated_rows)] : null,
    ]),
    counts.length ? table(["Label", "Rows", "Share"], counts.map(([label, n]) => h("tr", {},
      h("td", {}, label), h("td", {}, fmtInt(n)),
      h("td", {}, h("meter", { min: 0, max: 1, value: total ? n / total : 0, "aria-label": `share of ${label}` }),
        ` ${total ? ((100 * n) / total).toFixed(1) : 0}%`))), { caption: "Label counts", cls: "labels-table" }) : null,
    problems.length ? table(["Line", "Column", "Severity", "Problem"], problems.map((p) => h("tr", { class: `sev-${p.severity}` },
      h("td", {}, p.line ?? "—"), h("td", {}, p.column ?? "—"), h("td", {}, p.severity), h("td", {}, p.message))),
    { caption: "Problems", cls: "problems-table" }) : null);
}

/** A dataset chooser: upload a file (validated by the service on upload) or pick one uploaded before. */
function datasetPicker(role, legend, existing, { required }) {
  const state = { dataset: null };
  const file = h("input", { type: "file", id: `${role}-file`, accept: ".csv,.tsv,.tab,.jsonl,.ndjson,.json" });
  const pick = h("select", { id: `${role}-existing` },
    h("option", { value: "" }, required ? "— upload a file, or pick one —" : "— none —"),
    existing.map((d) => h("option", { value: d.id }, `${d.name} (${fmtInt(d.rows)} rows, ${d.id.slice(0, 8)})`)));
  const out = h("div", { class: "report-box", "aria-live": "polite", id: `${role}-report` });

  file.addEventListener("change", async () => {
    const f = file.files[0];
    if (!f) return;
    pick.value = "";
    state.dataset = null;
    replace(out, h("p", { class: "loading" }, `Uploading and checking ${f.name}…`));
    const form = new FormData();
    form.append("file", f, f.name);
    try {
      state.dataset = await request("POST", "/v1/datasets", { body: form });
      replace(out, reportView(state.dataset.report, { name: f.name, ok: true }));
    } catch (e) {
      const report = e instanceof ApiError && e.problem.report;
      replace(out, report ? [problemBox(e, { title: "The dataset has problems" }), reportView(report, { name: f.name, ok: false })]
        : problemBox(e, { title: `Could not upload ${f.name}` }));
    }
  });
  pick.addEventListener("change", () => {
    const d = existing.find((x) => x.id === pick.value);
    file.value = "";
    state.dataset = d || null;
    replace(out, d ? reportView(d.report, { name: d.name, ok: true }) : null);
  });
  state.element = h("fieldset", { class: "dataset" }, h("legend", {}, legend),
    h("div", { class: "field" }, h("label", { for: `${role}-file` }, "Upload a file (CSV, TSV or JSON Lines)"), file),
    existing.length ? h("div", { class: "field" }, h("label", { for: `${role}-existing` }, "or use an uploaded dataset"), pick) : null,
    out);
  return state;
}

// ------------------------------------------------------------------------------------------ the form
function numberField(name, label, value, attrs = {}, hint = null) {
  const id = name.replace(/\./g, "-");
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    h("input", { id, name, type: attrs.type || "number", value: value ?? "", ...attrs, "aria-describedby": hint ? `${id}-hint` : null }),
    hint ? h("small", { id: `${id}-hint`, class: "hint" }, hint) : null);
}

// Idempotency keys: crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
const newKey = () => [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
const numberOrNull = (v) => (v.trim() === "" ? null : Number(v));
const layerIndex = (v) => (v.trim() === "" ? null : v.includes(".") ? parseFloat(v) : parseInt(v, 10));

export async function newJobView(main, { signal }) {
  replace(main, h("h1", { tabindex: -1 }, "New fine-tuning job"), h("p", { class: "loading" }, "Loading…"));
  let existing = [], tasks = [];
  try {
    [existing, tasks] = await Promise.all([
      // Only ready datasets can train (a Hub import is `importing` until the worker has read it).
      get(withQuery("/v1/datasets", { limit: 100 }), { signal }).then((p) => p.items.filter((d) => (d.state ?? "ready") === "ready")),
      get(withQuery("/v1/tasks", { limit: 100 }), { signal }).then((p) => p.items),
    ]);
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(main, h("h1", { tabindex: -1 }, "New fine-tuning job"), problemBox(e, { title: "Cannot start jobs with this key" }));
    return;
  }
  const train = datasetPicker("train", "Training data", existing, { required: true });
  const validation = datasetPicker("validation", "Validation data (optional: metrics per epoch)", existing, { required: false });

  const taskInput = h("input", { id: "task", name: "task", required: true, pattern: TASK_NAME, maxlength: 64, list: "task-names",
    placeholder: "sentiment", autocomplete: "off", "aria-describedby": "task-hint" });
  const methodRadios = Object.entries(METHODS).map(([name, text]) => h("div", { class: "radio" },
    h("input", { type: "radio", name: "method.name", id: `method-${name}`, value: name, checked: name === METHOD_DEFAULTS.name }),
    h("label", { for: `method-${name}` }, h("strong", {}, name), ` — ${text}`)));
  const targets = LORA_TARGETS.all.map((t) => h("span", { class: "check" },
    h("input", { type: "checkbox", id: `target-${t}`, name: "method.targets", value: t, checked: LORA_TARGETS.default.includes(t) }),
    h("label", { for: `target-${t}` }, t)));
  const M = METHOD_DEFAULTS, HP = HYPERPARAMETER_DEFAULTS;
  const methodFields = {
    n1: numberField("method.n1", "n1 (first bias-only layer)", M.n1, { type: "text", inputmode: "decimal", placeholder: "L/3" },
      "a layer index, or a fraction of the depth L such as 0.25; empty: L/3"),
    n2: numberField("method.n2", "n2 (first LoRA layer)", M.n2, { type: "text", inputmode: "decimal", placeholder: "2L/3" },
      "a layer index, or a fraction of L; empty: 2L/3"),
    rank: numberField("method.rank", "LoRA rank", M.rank, { min: 1, step: 1 }),
    alpha: numberField("method.alpha", "LoRA alpha", M.alpha, { min: 0, step: "any" }, "the update is scaled by alpha / rank"),
    dropout: numberField("method.dropout", "LoRA dropout", M.dropout, { min: 0, max: 0.99, step: "any" }),
    targets: h("fieldset", { class: "field checks" }, h("legend", {}, "LoRA targets"), targets),
    group3_bias: h("div", { class: "field check" },
      h("input", { type: "checkbox", id: "method-group3_bias", name: "method.group3_bias", checked: M.group3_bias }),
      h("label", { for: "method-group3_bias" }, "also train biases in the LoRA layers")),
  };
  const hp = [
    numberField("hyperparameters.epochs", "Epochs", HP.epochs, { min: 1, max: 100, step: 1 }),
    numberField("hyperparameters.batch_size", "Batch size", HP.batch_size, { min: 1, step: 1 }),
    numberField("hyperparameters.learning_rate", "Learning rate", HP.learning_rate, { min: 0, step: "any", placeholder: "1e-3" }, "empty: 1e-3 for adapters"),
    numberField("hyperparameters.head_learning_rate", "Head learning rate", HP.head_learning_rate, { min: 0, step: "any", placeholder: "learning rate" }),
    numberField("hyperparameters.bias_learning_rate", "Bias learning rate", HP.bias_learning_rate, { min: 0, step: "any", placeholder: "learning rate" }),
    numberField("hyperparameters.lora_learning_rate", "LoRA learning rate", HP.lora_learning_rate, { min: 0, step: "any", placeholder: "learning rate" }),
    numberField("hyperparameters.validation_fraction", "Validation share (without a validation set)", HP.validation_fraction, { min: 0, max: 0.5, step: "any" }),
    numberField("hyperparameters.max_seq_length", "Max sequence length", HP.max_seq_length, { min: 8, step: 1 }),
    numberField("hyperparameters.warmup_ratio", "Warm-up ratio", HP.warmup_ratio, { min: 0, max: 0.99, step: "any" }),
    numberField("hyperparameters.weight_decay", "Weight decay", HP.weight_decay, { min: 0, step: "any" }),
    numberField("hyperparameters.gradient_accumulation_steps", "Gradient accumulation steps", HP.gradient_accumulation_steps, { min: 1, step: 1 }),
    numberField("hyperparameters.max_grad_norm", "Max gradient norm", HP.max_grad_norm, { min: 0, step: "any" }, "empty: no clipping"),
    numberField("hyperparameters.early_stopping_patience", "Early-stopping patience (epochs)", HP.early_stopping_patience, { min: 1, step: 1, placeholder: "off" }),
    numberField("hyperparameters.seed", "Seed", HP.seed, { min: 0, step: 1 }),
    numberField("hyperparameters.checkpoint_every_steps", "Checkpoint every (steps)", HP.checkpoint_every_steps, { min: 1, step: 1, placeholder: "server default" }),
    h("div", { class: "field check" },
      h("input", { type: "checkbox", id: "hyperparameters-prefix_cache", name: "hyperparameters.prefix_cache", checked: HP.prefix_cache }),
      h("label", { for: "hyperparameters-prefix_cache" }, "prefix cache (SPAFIT: run the frozen layers once per example)")),
  ];
  const methodBox = h("fieldset", { class: "grid" }, h("legend", {}, "Method parameters"), Object.values(methodFields));
  const result = h("div", { id: "submit-result", "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Start fine-tuning");
  let idempotencyKey = newKey(); // a double click (or a retry after a timeout) makes one job

  const form = h("form", { id: "new-job", novalidate: true },
    h("section", { class: "card" }, h("h2", {}, "1. Data"), train.element, validation.element),
    h("section", { class: "card" }, h("h2", {}, "2. Task and method"),
      h("div", { class: "field" }, h("label", { for: "task" }, "Task name"), taskInput,
        h("small", { id: "task-hint", class: "hint" }, "lowercase letters, digits, - and _; a new version is added if the task exists"),
        h("datalist", { id: "task-names" }, tasks.map((t) => h("option", { value: t.name })))),
      h("fieldset", { class: "radios" }, h("legend", {}, "Method"), methodRadios),
      methodBox),
    h("section", { class: "card" }, h("h2", {}, "3. Training"), h("fieldset", { class: "grid" }, h("legend", { class: "visually-hidden" }, "Hyperparameters"), hp)),
    h("div", { class: "actions" }, submit), result);
  replace(main, h("h1", { tabindex: -1 }, "New fine-tuning job"), form);

  const methodName = () => form.querySelector('input[name="method.name"]:checked').value;
  const showMethodFields = () => {
    const used = new Set(METHOD_FIELDS[methodName()]);
    for (const [k, el] of Object.entries(methodFields)) el.hidden = !used.has(k);
    methodBox.hidden = used.size === 0;
  };
  form.addEventListener("change", (ev) => { if (ev.target.name === "method.name") showMethodFields(); });
  showMethodFields();

  const value = (name) => form.elements.namedItem(name);
  function body() {
    const name = methodName();
    const method = { name };
    for (const k of METHOD_FIELDS[name]) {
      if (k === "n1" || k === "n2") method[k] = layerIndex(value(`method.${k}`).value);
      else if (k === "targets") method.targets = [...form.querySelectorAll('input[name="method.targets"]:checked')].map((c) => c.value);
      else if (k === "group3_bias") method.group3_bias = value("method.group3_bias").checked;
      else method[k] = numberOrNull(value(`method.${k}`).value);
    }
    const hyper = {};
    for (const k of Object.keys(HYPERPARAMETER_DEFAULTS)) {
      const el = value(`hyperparameters.${k}`);
      hyper[k] = el.type === "checkbox" ? el.checked : numberOrNull(el.value);
    }
    const drop = (o) => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null));
    // Only what the user changed: the server applies its own defaults, some of which depend on the base model
    // (the default max_seq_length is shortened to what the backbone has positions for; 128 sent as given is a 422).
    const changed = (o, defaults) => Object.fromEntries(Object.entries(o).filter(([k, v]) => v !== defaults[k]));
    return {
      task: taskInput.value.trim(),
      train_dataset: train.dataset && train.dataset.id,
      validation_dataset: validation.dataset ? validation.dataset.id : null,
      method: drop(method),
      hyperparameters: changed(drop(hyper), HYPERPARAMETER_DEFAULTS),
    };
  }

  function markInvalid(problem) {
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
    const fields = [problem.field, ...(problem.errors || []).map((e) => e.field)].filter(Boolean).map((f) => f.replace(/^body\./, ""));
    let first = null;
    for (const f of fields) {
      const el = form.querySelector(`[name="${CSS.escape(f)}"]`) || (f === "train_dataset" ? value("train-file") : null);
      if (el) { el.setAttribute("aria-invalid", "true"); first ??= el; }
    }
    if (first) first.focus();
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!train.dataset) {
      replace(result, problemBox(new Error("upload a valid training dataset (or pick one) first"), { title: "No training data" }));
      document.getElementById("train-file").focus();
      return;
    }
    if (!taskInput.value.trim()) {
      replace(result, problemBox(new Error("give the task a name"), { title: "No task name" }));
      taskInput.focus();
      return;
    }
    submit.disabled = true;
    replace(result, h("p", { class: "loading" }, "Submitting…"));
    try {
      const job = await request("POST", "/v1/jobs", { json: body(), headers: { "Idempotency-Key": idempotencyKey }, signal });
      idempotencyKey = newKey();
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (e.name === "AbortError") return;
      replace(result, problemBox(e, { title: "The job was not started" }));
      if (e instanceof ApiError) markInvalid(e.problem);
      if (e.status === 409) idempotencyKey = newKey();
    } finally {
      submit.disabled = false;
    }
  });
}
