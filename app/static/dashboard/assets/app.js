// The dashboard's shell: the API key in the header (kept in sessionStorage), hash routing, one view at a
// time. Each view gets an AbortSignal that aborts its requests, streams and timers when it is left.

import { apiKey, probeAuth } from "./api.js";
import { batchView } from "./batch.js";
import { jobView, jobsView } from "./jobs.js";
import { newJobView } from "./newjob.js";
import { taskView, tasksView } from "./tasks.js";
import { h, problemBox, replace } from "./ui.js";

const ROUTES = [
  { path: /^\/jobs\/([^/]+)$/, nav: "jobs", view: jobView, args: (m) => ({ id: decodeURIComponent(m[1]) }) },
  { path: /^\/jobs$/, nav: "jobs", view: jobsView, title: "Jobs" },
  { path: /^\/tasks\/([^/]+)$/, nav: "tasks", view: taskView, args: (m) => ({ name: decodeURIComponent(m[1]) }) },
  { path: /^\/tasks$/, nav: "tasks", view: tasksView, title: "Tasks" },
  { path: /^\/new$/, nav: "new", view: newJobView, title: "New job" },
  { path: /^\/batch$/, nav: "batch", view: batchView, title: "Batch predictions" },
];

const main = document.getElementById("main");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const authState = document.getElementById("auth-state");
let auth = { mode: "unknown" };
let current = null;

async function checkAuth() {
  auth = await probeAuth();
  const key = apiKey.get();
  const messages = {
    off: "Auth is off (embedded mode): no key needed.",
    ok: `Using key ${key.slice(0, 14)}…`,
    none: "This service needs an API key.",
    bad: `Key refused: ${auth.error && auth.error.message}`,
    down: `Service unreachable: ${auth.error && auth.error.message}`,
  };
  authState.textContent = messages[auth.mode];
  authState.dataset.mode = auth.mode;
  document.body.dataset.auth = auth.mode;
}

function keyPrompt() {
  document.title = "API key needed · SPAFIT";
  replace(main, h("h1", { tabindex: -1 }, "API key needed"),
    auth.mode === "bad" ? problemBox(auth.error, { title: "The service refused this key" }) : null,
    h("p", {}, "Enter your API key in the field at the top of the page. It is kept in this browser tab only ",
      "(sessionStorage) and sent with every request; you see only your tenant's jobs, datasets and tasks."));
  keyInput.focus();
}

async function route({ focus = false } = {}) {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const [path, qs] = (location.hash || "#/jobs").slice(1).split("?");
  const match = ROUTES.map((r) => [r, path.match(r.path)]).find(([, m]) => m);
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (match && a.dataset.nav === match[0].nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (auth.mode === "none" || auth.mode === "bad") { keyPrompt(); return; }
  if (!match) {
    replace(main, h("h1", { tabindex: -1 }, "Page not found"), h("p", {}, h("a", { href: "#/jobs" }, "Go to the jobs")));
    return;
  }
  const [r, m] = match;
  document.title = `${r.title || "SPAFIT"} · SPAFIT`;
  if (focus) main.focus({ preventScroll: false });
  try {
    await r.view(main, { ...(r.args ? r.args(m) : {}), query: new URLSearchParams(qs || ""), signal });
  } catch (e) {
    if (!signal.aborted) replace(main, problemBox(e, { title: "Something went wrong" }));
  }
}

keyForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const value = keyInput.value.trim();
  if (value) apiKey.set(value);
  keyInput.value = "";
  await checkAuth();
  route();
});
document.getElementById("key-forget").addEventListener("click", async () => {
  apiKey.clear();
  await checkAuth();
  route();
});
window.addEventListener("hashchange", () => route({ focus: true }));

if (!location.hash) history.replaceState(null, "", "#/jobs");
await checkAuth();
route();
