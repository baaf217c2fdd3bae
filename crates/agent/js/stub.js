// trueup's stub: what a page calls first, on the npm path (`import { track } from "trueup"`)
// and, bundled into loader.js, on the <script> path.
//
// What it promises:
// - Nothing throws into the host page: every export catches everything.
// - Importing it touches no `window` or `document` and loads nothing, so it is safe in SSR; where
//   there is no `window` and `document`, every call does nothing.
// - A call gets its context when it is made: a fresh UUIDv7 id (the idempotency key), Date.now(),
//   the URL, referrer and title. Calls made before the wasm core is ready are buffered with that
//   context and handed to `Agent.call` in call order, exactly once, when the Agent is
//   constructed; later calls go straight to it.
// - When the core cannot load (a CSP without 'wasm-unsafe-eval', network, MIME, instantiation)
//   or traps (a Rust panic), or the page is leaving before it is ready, the stub sends the events
//   itself ("no_wasm" mode, see the fallback below) instead of losing them. A call that trapped is
//   sent again by the fallback with the same id; the relay stores an id once.
//
// build.mjs injects the file names: __GLUE__ and __WASM__ ("./trueup_agent.<hash>.js", …),
// __NPM_GLUE__ (the same literal for the npm build, so bundlers see and emit the files; unused
// by the loader) and __LOADER__ (true in loader.js).

const MAX_BUFFERED = 1000; // calls kept while the core loads; more are counted as buffer_full
const MAX_BODY = 60 * 1024; // one fallback request, under the browsers' 64 KiB keepalive budget
const MAX_EVENT = MAX_BODY - 2048; // room left for the batch header
const NO_WASM = "no_wasm";
const STORE_KEY = "trueup:nowasm"; // the fallback's ids and counters (localStorage)
const SESSION_KEY = "trueup:nowasm:sid"; // its session id (sessionStorage)

let options; // as given to init(), once
let agent; // the wasm Agent once constructed (and not crashed)
let fb; // the fallback's state, once the core is given up
let buffer = []; // [method, args, ctx] while the core loads
let ready = Promise.resolve(); // settles when the Agent is constructed or the fallback took over
let consentGiven; // the last consent(…) the core took, for a fallback taking over from it
const local = { buffer_full: 0, wasm_panic: 0, error: "" };

const inBrowser = () => typeof window == "object" && typeof document == "object";
const noop = () => {};
const guard = (fn, fallbackValue) => (...args) => {
  try {
    return fn(...args);
  } catch {
    return fallbackValue;
  }
};
const hex = (b) => (b + 256).toString(16).slice(1);

/** A lowercase UUIDv7: 48 bits of milliseconds, version 7, variant 10, random bits. */
export function uuidv7(ms = Date.now()) {
  const b = crypto.getRandomValues(new Uint8Array(16));
  for (let i = 5; i >= 0; i--, ms = Math.floor(ms / 256)) b[i] = ms % 256;
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, hex).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * One call with its call-time context. The <script> loader calls this directly for the calls the
 * page snippet queued, with the timestamp, URL, referrer and title the snippet captured; not part
 * of the public API.
 */
export const _replay = guard((method, args, ts, url, referrer, title) => {
  if (!inBrowser()) return; // SSR: read no browser global at all
  ts ??= Date.now();
  dispatch(method, args, {
    id: uuidv7(ts),
    ts,
    url: url ?? location.href,
    referrer: referrer ?? document.referrer,
    title: title ?? document.title,
  });
});

function dispatch(method, args, ctx) {
  if (agent) {
    try {
      agent.call(method, args, ctx);
      if (method == "consent") consentGiven = !!args[0];
      return;
    } catch (e) {
      crashed(e); // and this call goes to the fallback below
    }
  }
  if (fb) fallback(method, args, ctx);
  else if (buffer.length < MAX_BUFFERED) buffer.push([method, args, ctx]);
  else local.buffer_full++;
}

/** A call into the core threw: Agent's methods never throw, so it trapped. Stop using it. */
function crashed(e) {
  local.wasm_panic++;
  agent = undefined;
  giveUp(e);
}

/** Hands over to the fallback for good, with what is buffered, in order. */
function giveUp(why) {
  if (fb) return;
  local.error ||= String(why);
  fb = { held: [], consent: consentGiven ?? (options.consent == "pending" ? undefined : true) };
  const queued = buffer;
  buffer = [];
  for (const [method, args, ctx] of queued) fallback(method, args, ctx);
}

async function start(opts) {
  try {
    // The script-tag build resolves the files next to loader.js (options.assets); the npm build
    // keeps literal specifiers so that bundlers see the files and emit them.
    const base = opts.assets && new URL(String(opts.assets).replace(/\/?$/, "/"), location.href);
    const [glue, wasm] = __LOADER__ || base
      ? [import(new URL(__GLUE__, base).href), new URL(__WASM__, base)]
      : [import(__NPM_GLUE__), new URL(__WASM__, import.meta.url)];
    const mod = await glue;
    await mod.default({ module_or_path: wasm });
    if (fb) return; // the page left before the core was ready
    agent = new mod.Agent(opts);
    const queued = buffer;
    buffer = [];
    for (const [method, args, ctx] of queued) dispatch(method, args, ctx);
  } catch (e) {
    giveUp(e);
  }
}

/**
 * Starts the agent: loads the wasm core and hands it `options` untouched. Once per page; later
 * calls return the first call's promise. Resolves (never rejects) when the core is running or
 * the fallback took over.
 */
export const init = guard((opts) => {
  if (!options && inBrowser() && opts && opts.site) {
    options = opts;
    // Leaving before the core is ready: send what is buffered now rather than lose it (and,
    // should the page come back from the back/forward cache, go on without the core).
    addEventListener("pagehide", () => {
      if (!agent && buffer.length) {
        giveUp("page hidden before the core was ready");
        send();
      }
    }, { once: true });
    ready = start(opts);
  }
  return ready;
}, ready);

const call = (method) => (...args) => _replay(method, args);
/** Records an event `name` with `props` (an object). */
export const track = call("track");
/** Records a page view (`page_view`), with optional `props`. */
export const page = call("page");
/** Ties the visitor to `userId` from now on and records an `identify` event with `traits`. */
export const identify = call("identify");
/** Forgets the user (logout): later events get a new anonymous id and no user id. */
export const reset = call("reset");
/** Grants (true) or refuses (false) consent; with consent "pending", nothing is stored or sent. */
export const consent = call("consent");

const viaAgent = (method) => {
  if (agent) {
    try {
      return agent[method]();
    } catch (e) {
      crashed(e);
    }
  }
};
// The core's promises reject only if it trapped inside them.
const trapped = (e) => e instanceof WebAssembly.RuntimeError && crashed(e);
const settle = (method) => guard(() => ready
  .then(() => (agent ? viaAgent(method) : fb && send()))
  .catch(trapped)
  .then(noop, noop), Promise.resolve());
/** Sends what is queued now; resolves when that attempt is over. Never rejects. */
export const flush = settle("flush");
/** Flushes and stops the core's timers and listeners. Never rejects. */
export const shutdown = settle("shutdown");

/** First- and last-touch attribution ({} until the core is running, and in the fallback). */
export const attribution = guard(() => viaAgent("attribution") || {}, {});

/**
 * A promise of the loss counters (`enqueued = acked + dropped + pending`; the core keeps them
 * in IndexedDB), plus the stub's own: `buffered`, and `buffer_full`, `wasm_panic`, `error`
 * when they happened. Never rejects.
 */
export const stats = () => Promise.resolve()
  .then(() => viaAgent("stats"))
  .catch(trapped)
  .then((s) => {
    const out = { ...(s || (fb ? counters(fb.store || {}) : {
      device_id: "", enqueued: 0, sent: 0, acked: 0, retried: 0, pending: 0, dropped: {},
    })), buffered: buffer.length + (fb ? fb.held.length : 0) };
    if (local.buffer_full) out.buffer_full = local.buffer_full;
    if (local.wasm_panic) out.wasm_panic = local.wasm_panic;
    if (fb) out.error = local.error;
    return out;
  })
  .catch(() => ({}));

// ---------------------------------------------------------------------------------------------
// The fallback ("no_wasm"): the stub sends events itself, in the v1 wire envelope, by
// sendBeacon (fetch with keepalive when that refuses, then a plain fetch), batched per microtask,
// each body under 60 KiB. It is its own device (own device_id and seq, kept in localStorage, or
// per page without it), so the seq of the core and of the fallback never mix and a missing seq
// stays a counted loss. It cannot see the relay's answers, so events it sent stay `pending`;
// requests that fail are counted as dropped `send_failed`. With consent "pending" it holds calls
// in memory, touching no storage, until consent(true); consent(false) discards them.

function fallback(method, args, ctx) {
  if (method == "consent") {
    fb.consent = !!args[0];
    if (!fb.consent) fb.held = [];
  } else if (fb.consent !== false) {
    fb.held.push([method, args, ctx]);
  }
  if (!fb.queued && fb.consent) {
    fb.queued = true;
    queueMicrotask(send);
  }
}

const storage = (kind) => {
  try {
    return window[kind];
  } catch {} // access itself can throw (sandboxed frames, blocked cookies)
};
const load = () => {
  try {
    return JSON.parse(storage("localStorage").getItem(STORE_KEY)) || undefined;
  } catch {}
};
const save = (s) => {
  try {
    storage("localStorage").setItem(STORE_KEY, JSON.stringify(s));
  } catch {}
};
const sessionId = () => {
  const ss = storage("sessionStorage");
  let sid;
  try {
    sid = ss.getItem(SESSION_KEY) || (ss.setItem(SESSION_KEY, (sid = uuidv7())), sid);
  } catch {}
  return sid || (fb.sid ||= uuidv7());
};
const drop = (s, reason, n = 1) => {
  const d = (s.dropped ||= {});
  d[reason] = (d[reason] || 0) + n;
};
const plainObject = (v) => (v && typeof v == "object" && !Array.isArray(v) ? v : undefined);

function counters(s) {
  const dropped = s.dropped || {};
  const lost = Object.values(dropped).reduce((a, b) => a + b, 0);
  const enqueued = s.seq || 0;
  return { device_id: s.device || "", enqueued, sent: s.sent || 0, acked: 0, retried: 0,
    pending: enqueued - lost, dropped, degraded: NO_WASM };
}

function send() {
  if (!fb || !fb.consent) return;
  fb.queued = false;
  const held = fb.held;
  fb.held = [];
  if (!held.length) return;
  // Re-read each time: another tab in the same mode may have used seq numbers meanwhile.
  const s = (fb.store = load() || fb.store || { device: uuidv7(), anon: uuidv7(), seq: 0 });
  const sid = sessionId();
  const enc = new TextEncoder();
  const events = [];
  for (const [method, args, ctx] of held) {
    if (method == "reset") {
      s.user = undefined;
      s.anon = uuidv7();
      continue;
    }
    if (method == "identify" && args[0] != null) s.user = String(args[0]);
    const [name, schema, props] = method == "track" ? [String(args[0]), "event/1", args[1]]
      : method == "page" ? ["page_view", "page_view/1", args[0]]
      : method == "identify" ? ["identify", "identify/1", { traits: plainObject(args[1]) }]
      : [];
    if (!name) continue;
    s.seq = (s.seq || 0) + 1;
    try {
      const json = JSON.stringify({
        id: ctx.id, name, schema, ts: ctx.ts, source: "client", anon_id: s.anon, user_id: s.user,
        session_id: sid, device_id: s.device, seq: s.seq, props: plainObject(props) || {},
        context: { url: ctx.url, referrer: ctx.referrer || undefined, title: ctx.title || undefined,
          degraded: NO_WASM },
      });
      const bytes = enc.encode(json).length + 1;
      if (bytes > MAX_EVENT) drop(s, "too_large");
      else events.push([json, bytes]);
    } catch {
      drop(s, "unserializable"); // a cycle or a BigInt in props
    }
  }
  s.sent = (s.sent || 0) + events.length;
  save(s);
  const head = JSON.stringify({ v: 1, site: options.site, sent_at: Date.now(), counters: counters(s) })
    .slice(0, -1) + ',"events":[';
  const room = MAX_BODY - enc.encode(head).length - 2;
  let part = [];
  let used = 0;
  const post = () => {
    if (part.length) postBody(head + part.join(",") + "]}", part.length);
    part = [];
    used = 0;
  };
  for (const [json, bytes] of events) {
    if (used + bytes > room) post();
    part.push(json);
    used += bytes;
  }
  post();
}

function postBody(body, n) {
  const url = options.endpoint || "/_r/q";
  try {
    if (navigator.sendBeacon(url, body)) return; // a string body goes as text/plain
  } catch {}
  const lost = () => {
    const s = (fb.store = load() || fb.store); // count into the latest copy
    drop(s, "send_failed", n);
    save(s);
  };
  const attempt = (keepalive) => fetch(url, { method: "POST", body, keepalive });
  attempt(true)
    .catch(() => attempt(false)) // over the keepalive budget
    .then((r) => r.ok || lost(), lost);
}
