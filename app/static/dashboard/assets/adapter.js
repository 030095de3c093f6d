// Which SPAFIT group each encoder layer of an adapter version is in. The version's JSON carries it when the
// service includes the adapter config's `stratification`; otherwise it is read from adapter_config.json in
// the version's archive (GET /v1/tasks/{task}/adapter?version=N), unzipped here with the browser's own
// DecompressionStream: no zip library.

import { request, withQuery } from "./api.js";

const cache = new Map(); // version id -> {num_layers, n1, n2, layer_groups}

export async function stratification(task, version, signal) {
  const inline = version.stratification || (version.config && version.config.stratification);
  if (inline && Array.isArray(inline.layer_groups)) return inline;
  if (!cache.has(version.id)) {
    const res = await request("GET", withQuery(`/v1/tasks/${encodeURIComponent(task)}/adapter`, { version: version.version }),
      { raw: true, signal });
    const config = JSON.parse(await zipEntry(await res.arrayBuffer(), "adapter_config.json"));
    if (!config.stratification || !Array.isArray(config.stratification.layer_groups)) {
      throw new Error("this adapter's config records no layer groups");
    }
    cache.set(version.id, config.stratification);
  }
  return cache.get(version.id);
}

/** The text of one file in a zip archive (stored or deflated; no zip64). */
export async function zipEntry(buffer, name) {
  const view = new DataView(buffer);
  let eocd = -1;
  for (let i = buffer.byteLength - 22; i >= Math.max(0, buffer.byteLength - 65557); i--) {
    if (view.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new Error("the adapter archive is not a zip file");
  const count = view.getUint16(eocd + 10, true);
  let p = view.getUint32(eocd + 16, true);
  const decoder = new TextDecoder();
  for (let n = 0; n < count; n++) {
    if (view.getUint32(p, true) !== 0x02014b50) throw new Error("the adapter archive's directory is damaged");
    const method = view.getUint16(p + 10, true);
    const size = view.getUint32(p + 20, true);
    const nameLen = view.getUint16(p + 28, true);
    const skip = nameLen + view.getUint16(p + 30, true) + view.getUint16(p + 32, true);
    const local = view.getUint32(p + 42, true);
    const entry = decoder.decode(new Uint8Array(buffer, p + 46, nameLen));
    if (entry === name || entry.endsWith(`/${name}`)) {
      const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
      const bytes = new Uint8Array(buffer, start, size);
      if (method === 0) return decoder.decode(bytes);
      if (method !== 8) throw new Error(`unsupported zip compression method ${method}`);
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
      return new Response(stream).text();
    }
    p += 46 + skip;
  }
  throw new Error(`${name} is not in the adapter archive`);
}
