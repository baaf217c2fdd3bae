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
// - Why the core failed to load decides what happens next. A network failure (the glue or the
//   wasm not fetched: a TypeError, or a non-2xx) may pass: the calls stay buffered (at most
//   MAX_BUFFERED, the rest counted as `buffer_full`) and loading is tried again on `online` and
//   after 1 s, 4 s and 16 s; while `navigator.onLine` is false the tries are not counted. Anything
//   else (a CSP without 'wasm-unsafe-eval', which Chromium reports as a CompileError; a
//   LinkError; a missing WebAssembly), the fourth network failure in a row while online, a trap
//   (a Rust panic) or the page leaving before the core is ready hands over to the stub's own
//   sender ("no_wasm" mode, see the fallback below) for the rest of the page. A call that
//   trapped is sent again by the fallback with the same id; the relay stores an id once.
//
// build.mjs injects the file names: __GLUE__ and __WASM__ ("./trueup_agent.<hash>.js", …),
// __NPM_GLUE__ (the same literal for the npm build, so bundlers see and emit the files; unused
// by the loader) and __LOADER__ (true in loader.js).

const MAX_BUFFERED = 1000; // calls kept while the core loads; events the fallback keeps queued
const MAX_QUEUED = 512 * 1024; // bytes of events the fallback keeps queued (in localStorage)
const MAX_BODY = 60 * 1024; // one fallback request, under the browsers' 64 KiB keepalive budget
const MAX_EVENT = MAX_BODY - 2048; // room left for the batch header
const MAX_BATCH = 200; // events in one fallback request
const CORE_RETRY_MS = [1000, 4000, 16000]; // waits before loading the core again
const REQUEST_MS = 30_000; // a fallback request not answered by then has failed
const NO_WASM = "no_wasm";
const STORE_KEY = "trueup:nowasm"; // the fallback's ids, counters and queue (localStorage)
const SESSION_KEY = "trueup.sess"; // "<session> <last activity>", shared with the core (src/lib.rs)
const ANON_KEY = "trueup.anon"; // the visitor, shared with the core
const MAX_AGE_MS = 7 * 864e5; // the core's defaults (js/core.js DEFAULTS), unless init() says otherwise
const SESSION_MS = 18e5;
const CONSENT_KEY = "trueup.consent"; // "granted" or "denied", shared with the core (src/lib.rs)

let options; // as given to init(), once
let agent; // the wasm Agent once constructed (and not crashed)
let fb; // the fallback's state, once the core is given up: { held, consent, queued }
let buffer = []; // [method, args, ctx] while the core loads
let ready = Promise.resolve(); // settles when the Agent is constructed or the fallback took over
let step = ready; // the current try at loading the core: settles when that try is over
let wake = () => {}; // ends the wait before the next try (on `online`)
let glue; // the core's JS module once imported
let consentGiven; // the last consent(…) the core took, for a fallback taking over from it
const local = { buffer_full: 0, wasm_panic: 0, error: "" };

const inBrowser = () => typeof window == "object" && typeof document == "object";
const offline = () => navigator.onLine === false; // `true` proves nothing, `false` is reliable
const noop = () => {};
const guard = (fn, fallbackValue) => (...args) => {
  try {
    return fn(...args);
  } catch {
    return fallbackValue;
  }
};
const hex = (b) => (b + 256).toString(16).slice(1);

/**
 * A lowercase UUIDv7: 48 bits of milliseconds, version 7, variant 10, random bits. The random
 * part is the browser's `randomUUID` (a v4, random but for its version and variant; secure
 * contexts only, and 5× faster than building one here), else bytes of `getRandomValues`.
 */
export function uuidv7(ms = Date.now()) {
  let r = crypto.randomUUID?.();
  if (!r) {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[8] = (b[8] & 0x3f) | 0x80;
    r = Array.from(b, hex).join("").replace(/(.{8})(.{4})(.{4})(.{4})/, "$1-$2-$3-$4-");
  }
  const t = (ms >= 0 && ms < 2 ** 48 ? Math.floor(ms) : Date.now()).toString(16).padStart(12, "0");
  return `${t.slice(0, 8)}-${t.slice(8)}-7${r.slice(15)}`;
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
      if (method == "consent") consentTo(!!args[0]);
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
  fb = { held: [], consent: consentGiven ?? storedConsent() ?? (options.consent == "pending" ? undefined : true) };
  if (fb.consent === false) consentTo(false); // an earlier page's queue goes too
  const queued = buffer;
  buffer = [];
  for (const [method, args, ctx] of queued) fallback(method, args, ctx);
  later(); // and what an earlier page's fallback left queued
}

async function start(opts) {
  // The script-tag build resolves the files next to loader.js (options.assets); the npm build
  // keeps literal specifiers so that bundlers see the files and emit them.
  const base = opts.assets && new URL(String(opts.assets).replace(/\/?$/, "/"), location.href);
  for (let n = 0, k = 0; !fb && await (step = load(opts, base, n, k++));) {
    await new Promise((resolve) => {
      wake = resolve;
      if (!offline()) setTimeout(resolve, CORE_RETRY_MS[n++]);
    });
  }
}

/** One try at loading the core (after `n` counted failures); true when it is to be tried again. */
async function load(opts, base, n, k) {
  try {
    // A retry asks for the glue under another URL: browsers that keep a failed module import
    // in their module map would fail it again without fetching. (Bundlers need the npm build's
    // specifiers as literals.)
    const [imported, wasm] = __LOADER__ || base
      ? [() => import(new URL(__GLUE__ + (k ? "?retry=" + k : ""), base).href), new URL(__WASM__, base)]
      : [() => import(__NPM_GLUE__), new URL(__WASM__, import.meta.url)];
    glue ||= await imported();
    await glue.default({ module_or_path: wasm });
  } catch (e) {
    if (fb) return;
    local.error = String(e);
    // Not fetched (a TypeError; wasm-bindgen's "failed to fetch Wasm: 503 …"): try again.
    if ((e instanceof TypeError || /fetch/i.test(e && e.message)) &&
      (offline() || n < CORE_RETRY_MS.length)) return true;
    return giveUp(e);
  }
  if (fb) return; // the page left before the core was ready
  try {
    agent = new glue.Agent(opts);
    local.error = "";
    const queued = buffer;
    buffer = [];
    for (const [method, args, ctx] of queued) dispatch(method, args, ctx);
    pump(); // what an earlier page's fallback left queued
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
    addEventListener("pagehide", guard(() => {
      if (!agent && buffer.length) giveUp("page hidden before the core was ready");
      hidden();
    }));
    addEventListener("visibilitychange", guard(() => {
      if (document.visibilityState == "hidden") hidden();
      else beaconed.clear(), pump(true); // back: what was beaconed is sent again, for an answer
    }));
    addEventListener("online", guard(() => {
      wake();
      pump(true);
    }));
    // Consent given or refused in another tab is this tab's too (the core listens itself).
    addEventListener("storage", guard((e) => {
      const yes = e.key == CONSENT_KEY ? storedConsent() : undefined;
      if (fb && yes !== undefined && yes !== fb.consent) consentTo(yes);
    }));
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
const settle = (method) => guard(() => step
  .then(() => (agent ? viaAgent(method) : options && (fb && enqueue(), pump(true))))
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
    const out = { ...(s || (fb ? counters(current() || {}) : {
      device_id: "", enqueued: 0, sent: 0, acked: 0, retried: 0, pending: 0, dropped: {},
    })), buffered: buffer.length + (fb ? fb.held.length : 0) };
    if (local.buffer_full) out.buffer_full = local.buffer_full;
    if (local.wasm_panic) out.wasm_panic = local.wasm_panic;
    if (local.error) out.error = local.error;
    return out;
  })
  .catch(() => ({}));

// ---------------------------------------------------------------------------------------------
// The fallback ("no_wasm"): the stub sends events itself, in the v1 wire envelope. It is its own
// device (own device_id and seq), so the seq of the core and of the fallback never mix and a
// missing seq stays a counted loss.
//
// Calls become events (with their id and seq) in a queue of at most MAX_BUFFERED events and
// MAX_QUEUED bytes, kept with the counters in localStorage (per page without it). So a page that
// closes offline leaves its events to the next page of the site, whether that page runs the
// fallback or the core; and every change re-reads the stored copy first, so tabs in this mode
// share the device, the seq and the queue.
//
// It follows the core's rules where they apply, with the same options: when full, the oldest
// events go first (not those in flight; `dropped.queue_full`); events older than `maxAgeMs`
// are given up when a send comes (`dropped.expired`); a session lasts until `sessionTimeoutMs`
// without activity, in the core's own key (`trueup.sess`), and the visitor is the core's
// (`trueup.anon`), so either mode's events are one visitor's sessions. What it leaves out, as
// a smaller subset: a new session on a new campaign (it reads no attribution), the byte cap
// option (its own is MAX_QUEUED, within localStorage's quota), split streams per tab, and the
// rescue of events across tabs (its queue is already shared).
//
// It sends while `navigator.onLine` is not false: one request at a time, at most MAX_BATCH events
// and 60 KiB, by `fetch` with keepalive (which, unlike sendBeacon, reports failure). The relay's
// per-event answer settles each event: accepted or duplicate → acked, rejected → dropped. A
// network error, a timeout, an unreadable answer, 404, 408, 429 or 5xx keeps the events (same
// ids) and tries again after a backoff (full jitter from 1 s, capped at 5 min, at least
// Retry-After) or on `online`; 413 halves the batch (one event: dropped `too_large`); another 4xx
// drops them as `rejected`. On pagehide or when hidden (and online), what is queued goes by
// sendBeacon instead, and stays queued since no answer is read: the next page sends it again, or
// this one if it becomes visible again (the relay stores an id once).
//
// With consent "pending" it holds calls in memory, touching no storage, until consent(true);
// consent(false) discards them and empties the stored queue (dropped `consent`).

let store; // the fallback's { device, anon, user, seq, sent, acked, retried, dropped, q }
let inflight; // this page's request in flight (a promise)…
let sending = []; // …and its ids
let timer; // the retry
let failures = 0;
let limit = MAX_BATCH;
const beaconed = new Set(); // ids this page handed to sendBeacon

function fallback(method, args, ctx) {
  if (method == "consent") consentTo(!!args[0]);
  else if (fb.consent !== false) {
    // Held while consent is pending: at most MAX_BUFFERED, the oldest going first, counted
    // (`queue_full`) once consent is given, as in the core.
    if (fb.held.push([method, args, ctx]) > MAX_BUFFERED) fb.held.shift(), (fb.heldDrops = (fb.heldDrops || 0) + 1);
  }
  if (fb.consent) later();
}

function later() {
  if (!fb.queued) {
    fb.queued = true;
    queueMicrotask(guard(() => {
      fb.queued = false;
      enqueue();
      pump();
    }));
  }
}

/** The consent stored on this device by either mode (the core's key): true, false or undefined. */
function storedConsent() {
  const v = stored(CONSENT_KEY);
  return v == "granted" || (v == "denied" ? false : undefined);
}

/** Consent from either mode; refused, the fallback's queue goes too. */
function consentTo(yes) {
  if (fb) {
    fb.consent = yes;
    if (!yes) (fb.held = []), (fb.heldDrops = 0);
    keep(CONSENT_KEY, yes ? "granted" : "denied"); // for the core too
  } else {
    consentGiven = yes;
  }
  const s = current();
  if (!yes && s && s.q && s.q.length) {
    drop(s, "consent", s.q.length);
    s.q = [];
    save(s);
  }
  pump();
}

const storage = (kind) => {
  try {
    return window[kind];
  } catch {} // access itself can throw (sandboxed frames, blocked cookies)
};
/** Item `key` of localStorage, or undefined. */
const stored = (key) => {
  try {
    return storage("localStorage").getItem(key) ?? undefined;
  } catch {}
};
/** The latest copy: another tab in this mode may have changed it. */
const current = () => {
  try {
    return (store = JSON.parse(storage("localStorage").getItem(STORE_KEY)) || store);
  } catch {
    return store;
  }
};
/** Sets item `key` of localStorage, if it can. */
const keep = (key, value) => {
  try {
    storage("localStorage").setItem(key, value);
  } catch {}
};
const save = (s) => keep(STORE_KEY, JSON.stringify((store = s)));
/** A positive number option, else `d`, as the core resolves them. */
const option = (k, d) => (options[k] > 0 ? options[k] : d);
/**
 * The session of an event at `ts`, by the core's rule: the stored one (either mode's) goes on
 * until `sessionTimeoutMs` without activity, then a new one begins; kept for the core too.
 */
const sessionAt = (ts) => {
  let [sid, last] = (fb.sess ||= String(stored(SESSION_KEY) || "").split(" "));
  if (!sid || ts - (+last || 0) > option("sessionTimeoutMs", SESSION_MS)) sid = uuidv7(ts);
  keep(SESSION_KEY, (fb.sess = [sid, Math.max(+last || 0, ts)]).join(" "));
  return sid;
};
const drop = (s, reason, n = 1) => {
  const d = (s.dropped ||= {});
  d[reason] = (d[reason] || 0) + n;
};
const plainObject = (v) => (v && typeof v == "object" && !Array.isArray(v) ? v : undefined);
const allowed = () => options && (fb ? fb.consent : consentGiven ?? options.consent != "pending");

function counters(s) {
  const dropped = s.dropped || {};
  const lost = Object.values(dropped).reduce((a, b) => a + b, 0);
  const enqueued = s.seq || 0;
  const acked = s.acked || 0;
  return { device_id: s.device || "", enqueued, sent: s.sent || 0, acked, retried: s.retried || 0,
    pending: enqueued - acked - lost, dropped, degraded: NO_WASM };
}

/** The held calls become queued events, each [id, json, bytes, sent before]. */
function enqueue() {
  const held = fb.held;
  if (!fb.consent || !held.length) return;
  fb.held = [];
  // (The visitor is the core's, if it has one: either mode's events are one visitor's.)
  const s = current() || { device: uuidv7(), anon: stored(ANON_KEY) || uuidv7(), seq: 0 };
  const q = (s.q ||= []);
  let bytes = q.reduce((a, e) => a + e[2], 0);
  const enc = new TextEncoder();
  // (Each took a seq, as every event does: its gap is the counted loss.)
  if (fb.heldDrops) (s.seq = (s.seq || 0) + fb.heldDrops), drop(s, "queue_full", fb.heldDrops), (fb.heldDrops = 0);
  for (const [method, args, ctx] of held) {
    if (method == "reset") {
      s.user = undefined;
      s.anon = uuidv7();
      fb.sess = []; // and a new session, as in the core
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
        session_id: sessionAt(ctx.ts), device_id: s.device, seq: s.seq, props: plainObject(props) || {},
        context: { url: ctx.url, referrer: ctx.referrer || undefined, title: ctx.title || undefined,
          degraded: NO_WASM },
      });
      const n = enc.encode(json).length + 1;
      if (n > MAX_EVENT) {
        drop(s, "too_large");
        continue;
      }
      // Full: the oldest go first (not the batch in flight), as from the core's queue.
      for (let i = 0; i < q.length && (q.length >= MAX_BUFFERED || bytes + n > MAX_QUEUED);) {
        if (sending.includes(q[i][0])) i++;
        else bytes -= q.splice(i, 1)[0][2], drop(s, "queue_full");
      }
      if (q.length >= MAX_BUFFERED || bytes + n > MAX_QUEUED) drop(s, "queue_full");
      else q.push([ctx.id, json, n, 0, ctx.ts]), (bytes += n);
    } catch {
      drop(s, "unserializable"); // a cycle or a BigInt in props
    }
  }
  save(s);
}

/** Drops the events older than `maxAgeMs` (`expired`), as the core does when it sends. */
function expire(s) {
  const oldest = Date.now() - option("maxAgeMs", MAX_AGE_MS);
  const kept = (s.q || []).filter((e) => !(e[4] < oldest) || sending.includes(e[0]));
  if (s.q && kept.length < s.q.length) drop(s, "expired", s.q.length - kept.length), (s.q = kept);
}

/** The first events of `q` for one request, counted as sent (and retried when sent before). */
function take(s, q, max) {
  let n = 0;
  for (let used = 0; n < q.length && n < max && (used += q[n][2]) <= MAX_EVENT; n++) {
    s.retried = (s.retried || 0) + (q[n][3] || 0);
    q[n][3] = 1;
  }
  s.sent = (s.sent || 0) + n;
  const head = JSON.stringify({ v: 1, site: options.site, sent_at: Date.now(), counters: counters(s) });
  return [q.slice(0, n), head.slice(0, -1) + ',"events":[' + q.slice(0, n).map((e) => e[1]) + "]}"];
}

/** Sends the head of the queue unless offline, waiting for a retry, or already sending. */
const pump = guard((now) => {
  if (now) timer = clearTimeout(timer);
  if (inflight || timer || offline() || !allowed()) return inflight;
  const s = current();
  if (s) expire(s);
  const q = ((s && s.q) || []).filter((e) => !beaconed.has(e[0]));
  if (!q.length) return s && save(s);
  const [part, body] = take(s, q, limit);
  save(s);
  sending = part.map((e) => e[0]);
  const done = (wait) => {
    inflight = undefined;
    sending = [];
    if (wait >= 0) {
      failures++;
      timer = setTimeout(() => {
        timer = 0;
        pump();
      }, Math.max(Math.random() * Math.min(3e5, 500 * 2 ** failures), wait * 1000));
    } else {
      failures = 0;
      pump();
    }
  };
  return (inflight = fetch(options.endpoint || "/_r/q",
    { method: "POST", body, keepalive: true, signal: globalThis.AbortSignal?.timeout?.(REQUEST_MS) })
    .then(async (r) => {
      const status = r.status;
      if (status == 413 && part.length > 1) return (limit = part.length >> 1), -1;
      const verdicts = r.ok
        ? (await r.json()).results.map((x) => ({ accepted: 1, duplicate: 1, rejected: "rejected" })[x.status])
        : status == 413 ? ["too_large"]
        : status > 399 && status < 500 && ![404, 408, 429].includes(status) ? part.map(() => "rejected")
        : [];
      if (verdicts.length != part.length || !verdicts.every(Boolean)) {
        return +r.headers.get("retry-after") || 0; // NaN (an HTTP-date, none) → 0
      }
      const s = current();
      const by = new Map(sending.map((id, i) => [id, verdicts[i]]));
      s.q = (s.q || []).filter((e) => {
        const v = by.get(e[0]);
        if (!v) return true;
        if (v == 1) s.acked = (s.acked || 0) + 1;
        else drop(s, v);
      });
      save(s);
      limit = Math.min(MAX_BATCH, limit * 2);
      return -1;
    })
    .catch(() => 0) // a network error, a timeout, an unreadable answer
    .then(done));
});

/** On pagehide or hidden: what is queued (and not in flight) goes by sendBeacon too. */
function hidden() {
  if (fb) enqueue();
  const s = current();
  if (!s || offline() || !allowed()) return;
  expire(s);
  let q = (s.q || []).filter((e) => !beaconed.has(e[0]) && !sending.includes(e[0]));
  while (q.length) {
    const [part, body] = take(s, q, MAX_BATCH);
    if (!navigator.sendBeacon(options.endpoint || "/_r/q", body)) break; // a string goes as text/plain
    for (const e of part) beaconed.add(e[0]);
    q = q.slice(part.length);
  }
  save(s);
}
