// The browser I/O the wasm core asks for (`Host` in src/lib.rs) and the requests it sends: ids,
// Storage, an event's JSON, the v1 batch body, fetch and sendBeacon. No function here throws:
// an exception thrown through the core would leave it mid-call.
//
// Self-contained (no imports): core.js bundles it, and the Rust tests in Chromium import it as is.

const str = (v) => (typeof v == "string" && v) || undefined;
/** The size of a text in UTF-8 bytes (what the keepalive budget and the relay count). */
const bytes = (s) => new TextEncoder().encode(s).length;
const storage = (session) => (session ? sessionStorage : localStorage);

/** The v1 batch body: the events' JSON texts (records `{s}`) joined, with the site and counters. */
export const body = (site, records, counters) =>
  JSON.stringify({ v: 1, site, sent_at: Date.now(), counters: counters?.device_id ? counters : undefined })
    .slice(0, -1) + ',"events":[' + records.map((r) => r.s) + "]}";

/**
 * POSTs a CORS-simple `text/plain` body with keepalive; `[status, Retry-After (parsed, NaN when
 * absent), the JSON answer of a 2xx]`, or `[]` for a network error or when `ms` passed. A body
 * over the keepalive limit (64 KiB) is not sent: `[413]`, so the batch is split.
 */
export async function post(url, text, ms) {
  if (bytes(text) > 65536) return [413];
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), ms);
  try {
    const r = await fetch(url, { method: "POST", body: text, keepalive: true, signal: abort.signal });
    return [r.status, parseFloat(r.headers.get("retry-after")), r.ok ? await r.json().catch(() => {}) : undefined];
  } catch {
    return [];
  } finally {
    clearTimeout(timer);
  }
}

/** The URL the page was loaded with (unaffected by later `history.replaceState`) and the referrer. */
export function landing() {
  let href = location.href;
  try {
    const nav = performance.getEntriesByType("navigation")[0].name;
    if (/^http/.test(nav)) href = nav;
  } catch {}
  return [href, document.referrer];
}

/** The core's `Host`, for options `o` (`endpoint`, `site`). */
export const host = (o) => ({
  uuid: () => (crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2) + Date.now().toString(36)),
  load(session, key) {
    try {
      return storage(session).getItem("trueup." + key);
    } catch {
      return null;
    }
  },
  keep(session, key, value) {
    try {
      if (value === undefined) storage(session).removeItem("trueup." + key);
      else storage(session).setItem("trueup." + key, typeof value == "object" ? JSON.stringify(value) : value);
    } catch {} // access itself can throw (sandboxed frames, blocked cookies), and the quota
  },
  event(i, name, schema, t, seq, props, c, ids, extra) {
    try {
      const s = JSON.stringify({ id: i, name, schema, ts: t, source: "client", ...ids, seq, props,
        context: { url: str(c.url), referrer: str(c.referrer), title: str(c.title), ...extra } });
      return { i, s, b: bytes(s), t };
    } catch {} // a cycle or a BigInt in props
  },
  restamp(r, ids) {
    try {
      const e = JSON.parse(r.s);
      delete e.user_id;
      const s = JSON.stringify(Object.assign(e, ids));
      return { ...r, s, b: bytes(s) };
    } catch {
      return r;
    }
  },
  beacon(records) {
    try {
      return navigator.sendBeacon(o.endpoint, body(o.site, records)); // a string goes as text/plain
    } catch {
      return false;
    }
  },
});
