// The one place the dashboard talks to the service. Every call goes to the public /v1 API (or a health
// endpoint) with the key from sessionStorage; a failure is an ApiError carrying the problem+json body.

const KEY_STORAGE = "spafit.apiKey";
const API_PATH = /^\/(v1\/|healthz$|readyz$)/;

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE) || "",
  set: (value) => sessionStorage.setItem(KEY_STORAGE, value),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem; // {type, title, status, detail, field?, errors?, ...}
  }
}

async function problemOf(res) {
  try {
    const body = await res.json();
    if (body && typeof body === "object") return body;
  } catch { /* not JSON: fall through */ }
  return { title: res.statusText || "Error", status: res.status, detail: `HTTP ${res.status} from ${res.url}` };
}

/** fetch() an API path. Options: json (a body to send as JSON), body, headers, signal, anonymous (send no
 *  key), raw (return the Response). Resolves to the parsed JSON (null for 204). */
export async function request(method, path, { json, body, headers, signal, anonymous = false, raw = false } = {}) {
  if (!API_PATH.test(path.split("?")[0])) throw new Error(`not an API path: ${path}`);
  const h = new Headers(headers);
  const key = apiKey.get();
  if (key && !anonymous) h.set("Authorization", `Bearer ${key}`);
  if (json !== undefined) {
    h.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(path, { method, headers: h, body, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { title: "Service unreachable", detail: `the request did not reach the service (${e.message})` });
  }
  if (!res.ok) throw new ApiError(res.status, await problemOf(res));
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

export const get = (path, opts) => request("GET", path, opts);
export const post = (path, json, opts) => request("POST", path, { ...opts, json });

/** path?k=v for the parameters that have a value. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** How the service wants to be called: {mode: "off"} (auth off, embedded mode), {mode: "ok"}, {mode: "none"}
 *  (a key is needed and none is set) or {mode: "bad", error} (the key was refused). A request without a key
 *  that succeeds means auth is off. */
export async function probeAuth() {
  try {
    await get("/v1/tasks?limit=1", { anonymous: true });
    return { mode: "off" };
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) return { mode: "down", error: e };
  }
  if (!apiKey.get()) return { mode: "none" };
  try {
    await get("/v1/tasks?limit=1");
    return { mode: "ok" };
  } catch (e) {
    return { mode: e.status === 401 ? "bad" : "down", error: e };
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

function parseBlock(block) {
  const msg = { event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment (keep-alive)
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") msg.event = value;
    else if (field === "id") msg.id = value;
    else if (field === "data") msg.data += value;
  }
  return msg;
}

/** A job's events, live: the text/event-stream of GET /v1/jobs/{id}/events read with fetch() (EventSource
 *  cannot send the key header). Calls onEvent({seq, type, data, created_at}) in order, from seq `after` on;
 *  reconnects from the last seq if the connection drops; resolves when the job is final and every event has
 *  been delivered, or when `signal` aborts. */
export async function streamEvents(jobId, after, onEvent, signal) {
  let seq = after;
  for (let failures = 0; !signal.aborted;) {
    try {
      const res = await request("GET", withQuery(`/v1/jobs/${jobId}/events`, { after: seq }),
        { headers: { Accept: "text/event-stream" }, signal, raw: true });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      let reconnect = false;
      while (!reconnect) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        for (let i; (i = buf.indexOf("\n\n")) >= 0;) {
          const msg = parseBlock(buf.slice(0, i));
          buf = buf.slice(i + 2);
          if (msg.event === "end") return;
          if (msg.event === "reconnect") { reconnect = true; break; } // the stream's time is up: resume now
          if (!msg.data || !msg.id) continue; // job events carry their seq as the id
          const event = JSON.parse(msg.data);
          seq = event.seq;
          failures = 0;
          onEvent(event);
        }
      }
      if (reconnect) { reader.cancel().catch(() => {}); continue; }
    } catch (e) {
      if (signal.aborted || e.name === "AbortError") return;
      // 429: this tenant's open streams are at their cap; back off and try again. Other 4xx: gone, or the key
      // changed.
      if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) throw e;
      failures += 1;
    }
    await sleep(Math.min(500 * 2 ** failures, 10000), signal); // dropped: resume from the last seq
  }
}
